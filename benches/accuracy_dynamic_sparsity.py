"""Accuracy of dynamic sparsity (query-aware page selection at decode) on one model: dense, page
selection at two token budgets and both selection granularities, and selection with streaming
heads, by passkey retrieval (NIAH grid) and decode-mode perplexity, all through the engine.

    python benches/accuracy_dynamic_sparsity.py \\
        --output benches/results/accuracy-dynamic-sparsity-bundled.json   # and its .md

Defaults: the bundled model (8K context), fp32 on CPU, pages of 64 tokens (so budgets of 1024
and 512 tokens are 16 and 8 pages), a new selection every 4 decode steps, logical pages of 16
tokens; the static-sparsity system streams 0.5 of the KV heads with the model's shipped
`attn_pattern/`, windows as `accuracy_static_sparsity.py` uses (sink 64 / local 512 tokens in
prefill, sink 64 / local 256 in decode).

Why decode-mode perplexity. Page selection acts on decode queries only: prompt log-probabilities
are computed at prefill, where every system here but the static one attends every key, so the
usual perplexity (`omniserve.eval.perplexity`) cannot tell dense from dynamic. NIAH answers are
generated in decode, so selection matters there; and for perplexity each text window's last
`--ppl-decode` tokens are *teacher-forced through decode steps*: the window's first tokens are
the prompt, and a stand-in for the runner's sampler (`TeacherForcing`, installed on this
script's own engine; the runner calls only its `bind_row` and `sample`) returns the text's next
token instead of a sample, with its log-probability under the model's logits. The scheduler
then feeds that token to the next decode step, exactly as a sampled one, so each scored token is
predicted by a decode step attending what page selection chose. The first forced token is
predicted by the prefill, so it is not scored. The same tokens are also scored from the prompt
log-probabilities of the whole window (prefill mode): for dense the two agree to rounding (a
check of the forcing), and for the dynamic systems prefill mode equals dense by construction.

Prints a markdown table and writes JSON with every number and setting, and the table as
markdown next to it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from omniserve.bench.sparsity_accuracy import add_common_args, engine_options, ints, write_json
from omniserve.engine.engine import Engine
from omniserve.eval.niah import run_niah
from omniserve.eval.perplexity import read_text
from omniserve.layers.sampler import SampleResult
from omniserve.runner.streaming import PATTERN_DIR
from omniserve.sampling_params import SamplingParams
from omniserve.training.evaluate import text_windows


class TeacherForcing:
    """Stands in for the runner's `Sampler`: a request's next token is the next one of its text
    (looked up by its prompt), with its log-probability under the raw logits. A request re-bound
    after a preemption resumes where its outputs stopped, as the real sampler does."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self._continuations = continuations
        self._targets: dict[int, list[int]] = {}
        self._next: dict[int, int] = {}

    def bind_row(
        self,
        row: int,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        stop_ids: Sequence[int],
    ) -> None:
        self._targets[row] = self._continuations[tuple(prompt_ids)]
        self._next[row] = len(output_ids)

    def sample(self, logits: torch.Tensor, rows: torch.Tensor) -> SampleResult:
        rows_list = rows.tolist()
        tokens = torch.tensor(
            [self._targets[r][self._next[r]] for r in rows_list], device=logits.device
        )
        for r in rows_list:
            self._next[r] += 1
        logprobs = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1)
        none = torch.zeros((len(rows_list), 0))
        return SampleResult(tokens.int().cpu(), logprobs.cpu(), none.int(), none)


@contextmanager
def teacher_forced(
    engine: Engine, continuations: dict[tuple[int, ...], list[int]]
) -> Iterator[None]:
    """The engine's runner samples with `TeacherForcing` inside the block."""
    runner = engine.runner
    sampler = runner.sampler
    runner.sampler = TeacherForcing(continuations)  # type: ignore[assignment]
    try:
        yield
    finally:
        runner.sampler = sampler


def decode_perplexity(
    engine: Engine, text: str, seq_len: int, decode: int, max_windows: int
) -> dict[str, Any]:
    """Perplexity of each window's last `decode` - 1 tokens, predicted by decode steps
    (teacher-forced) and, for the same tokens, by the prefill of the whole window."""
    assert engine.tokenizer is not None
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    windows = text_windows(ids, seq_len, engine.tokenizer.bos_token_id, max_windows)
    prefix = seq_len - decode
    continuations = {tuple(w[:prefix]): w[prefix:] for w in windows}
    forced = SamplingParams(max_tokens=decode, ignore_eos=True, temperature=0.0, logprobs=0)
    with teacher_forced(engine, continuations):
        outs = engine.generate([w[:prefix] for w in windows], forced, use_tqdm=False)
    decode_nll: list[float] = []
    for out, window in zip(outs, windows, strict=True):
        assert out.logprobs is not None and out.token_ids == window[prefix:]
        decode_nll += [-lp.logprob for lp in out.logprobs[1:]]  # the first: the prefill's
    scored = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, prompt_logprobs=True)
    prefill_nll: list[float] = []
    for out in engine.generate(windows, scored, use_tqdm=False):
        assert out.prompt_logprobs is not None
        prefill_nll += [-float(lp) for lp in out.prompt_logprobs[prefix + 1 :]]  # type: ignore[arg-type]
    assert len(prefill_nll) == len(decode_nll)
    return {
        "decode": math.exp(sum(decode_nll) / len(decode_nll)),
        "prefill": math.exp(sum(prefill_nll) / len(prefill_nll)),
        "tokens_scored": len(decode_nll),
        "windows": len(windows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_common_args(p)
    p.add_argument("--budgets", type=ints, default=[1024, 512], help="token budgets (kv_head)")
    p.add_argument("--selector-interval", type=int, default=4)
    p.add_argument("--ppl-seq-len", type=int, default=8000, help="tokens per perplexity window")
    p.add_argument("--ppl-decode", type=int, default=512, help="its last tokens, forced in decode")
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--output", type=Path, default=None, help="JSON file (and the .md beside it)")
    args = p.parse_args()

    text = read_text(args.model / "heldout.txt")
    common = {**engine_options(args), "selector_interval": args.selector_interval}
    results: list[dict[str, Any]] = []

    def evaluate(name: str, **options: Any) -> None:
        start = time.perf_counter()
        engine = Engine.from_pretrained(args.model, **common, **options)
        niah = run_niah(engine, args.niah_lengths, args.niah_depths, args.niah_samples)
        ppl = decode_perplexity(engine, text, args.ppl_seq_len, args.ppl_decode, args.ppl_windows)
        row = {
            "system": name,
            "options": {k: v for k, v in options.items() if k != "attn_pattern"},
            "perplexity": ppl,
            "niah": {"accuracy": niah.accuracy, "overall": niah.overall},
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)

    def dynamic(budget: int, selection: str = "kv_head") -> dict[str, Any]:
        return {"sparse_decode": True, "token_budget": budget, "page_selection": selection}

    first, *others = args.budgets
    evaluate("dense", static_sparsity=0.0)
    evaluate(f"dynamic {first} kv_head", static_sparsity=0.0, **dynamic(first))
    evaluate(f"dynamic {first} query_head", static_sparsity=0.0, **dynamic(first, "query_head"))
    for budget in others:
        evaluate(f"dynamic {budget} kv_head", static_sparsity=0.0, **dynamic(budget))
    shipped = args.pattern or args.model / PATTERN_DIR
    evaluate(
        f"dynamic {first} kv_head + static {args.static_sparsity}",
        static_sparsity=args.static_sparsity,
        attn_pattern=str(shipped),
        **dynamic(first),
    )

    table = markdown_table(results, args.niah_lengths)
    print("\n" + table)
    if args.output:
        write_json(args.output, args, results)
        args.output.with_suffix(".md").write_text(markdown(args, results, table))


def markdown_table(results: list[dict[str, Any]], lengths: list[int]) -> str:
    lines = [
        "| system | decode ppl | prefill ppl | NIAH overall | "
        + " | ".join(f"NIAH {n}" for n in lengths)
        + " |",
        "| --- " * (4 + len(lengths)) + "|",
    ]
    for r in results:
        by_length = [sum(row) / len(row) for row in r["niah"]["accuracy"]]
        ppl = r["perplexity"]
        lines.append(
            f"| {r['system']} | {ppl['decode']:.3f} | {ppl['prefill']:.3f} | "
            f"{r['niah']['overall']:.3f} | " + " | ".join(f"{a:.2f}" for a in by_length) + " |"
        )
    return "\n".join(lines)


def markdown(args: argparse.Namespace, results: list[dict[str, Any]], table: str) -> str:
    """The results file: how it was made, the setting, the table."""
    ppl = results[0]["perplexity"]
    prefill_sink, prefill_local, decode_sink, decode_local = args.windows
    return f"""# Dynamic sparsity on the bundled model: dense vs decode page selection

`python -P benches/accuracy_dynamic_sparsity.py --niah-samples {args.niah_samples} \
--output {args.output}`

{args.dtype} on {args.device}; pages of 64 tokens, logical pages of 16, a new selection every \
{args.selector_interval} decode steps; static sparsity {args.static_sparsity} with the shipped \
head pattern, windows: prefill sink {prefill_sink} / local {prefill_local} tokens, decode sink \
{decode_sink} / local {decode_local}. NIAH: lengths {args.niah_lengths}, depths \
{args.niah_depths}, {args.niah_samples} keys per cell, sentence filler. Perplexity on \
`heldout.txt`: {ppl["windows"]} windows of {args.ppl_seq_len} tokens, each one's last \
{args.ppl_decode} teacher-forced through decode steps ({ppl["tokens_scored"]} tokens scored, the \
first forced token of each window excluded: the prefill predicts it); *decode ppl* scores them \
from the decode steps (where page selection acts), *prefill ppl* the same tokens from the prompt \
log-probabilities of the whole window (prefill attention, which page selection does not touch).

{table}
"""


if __name__ == "__main__":
    main()
