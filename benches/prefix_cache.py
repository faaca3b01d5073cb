"""Time to first token with and without the prefix cache.

N requests (32) share a system prompt (2,048 tokens) and each add a question of their own (64
tokens); all are submitted at once to a fresh engine, which is stepped until every request has its
first token, then run to the end (16 tokens each, greedy). Three runs, each on its own engine:
- `off`: `enable_prefix_caching=False`, every request computes the whole prompt;
- `cold`: the cache on, the system prompt never seen before: the first step's requests compute
  it, every later admission finds it cached;
- `warm`: the cache on, and one earlier request (not timed) left the system prompt cached, as a
  long-running server would have it.
Per run: time to first token over the 32 requests (mean, p50, p90, max, from each request's
arrival to its first token), the time until the last first token, the prompt tokens found cached,
and whether the greedy outputs equal the `off` run's. `ttft_speedup` is `off`'s mean over the
run's.

    python benches/prefix_cache.py --json benches/results/cpu-prefix-cache-bundled.json
    python benches/prefix_cache.py --model-config llama-3-8b --precision w4a8kv4 \\
        --json benches/results/h100-prefix-cache-w4a8kv4.json

Without `--model`/`--model-config` it serves the bundled model, with its weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omniserve import Engine, SamplingParams
from omniserve.bench.throughput import _materialize, device_name, free_cuda, random_prompts
from omniserve.bench.timing import percentile, sync
from omniserve.config import EngineConfig
from omniserve.engine.engine import bundled_model_path

RUNS = ("off", "cold", "warm")


def _prompts(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[list[int]]]:
    system = random_prompts(1, args.system_tokens, vocab, seed=0)[0]
    own = random_prompts(args.requests, args.own_tokens, vocab, seed=1)
    return system, [system + question for question in own]


def run_once(config: EngineConfig, run: str, args: argparse.Namespace) -> dict[str, Any]:
    engine = Engine(config)
    device = engine.runner.device
    system, prompts = _prompts(args, engine.runner.vocab_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    # Warms the kernels and graphs up on a prompt that shares nothing with the timed ones.
    engine.generate(random_prompts(2, 64, engine.runner.vocab_size, seed=2), params, use_tqdm=False)
    if run == "warm":
        engine.generate([system + [system[0]]], params, use_tqdm=False)
    before = engine.stats()
    sync(device)
    start = time.monotonic()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", prompt, params)
    # The engine's timestamps (time.monotonic()): each request's arrival and first token.
    ttft: list[float] = []
    last_first = start
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.first_token_time is not None
                last_first = max(last_first, out.first_token_time)
                ttft.append(out.first_token_time - out.arrival_time)
                outputs[out.request_id] = out.token_ids
    sync(device)
    wall = time.monotonic() - start
    after = engine.stats()
    name = device_name(device)
    del engine
    free_cuda()
    return {
        "run": run,
        "device": name,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p90_s": percentile(ttft, 0.9),
        "ttft_max_s": max(ttft),
        "all_first_tokens_s": last_first - start,
        "wall_s": wall,
        "prompt_tokens": sum(len(p) for p in prompts),
        "cached_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
        "outputs": [outputs[f"q{i}"] for i in range(len(prompts))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--model-config", help="a bench preset (e.g. llama-3-8b), random weights")
    p.add_argument("--precision", help="with --model-config: the dummy weights' precision")
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--own-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.model and args.model_config:
        p.error("--model and --model-config exclude each other")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_config:
            model = _materialize(None, args.model_config, Path(tmp))
            options: dict[str, Any] = {"load_format": "dummy", "skip_tokenizer_init": True}
            if args.precision:
                options["precision"] = args.precision
        else:
            model = args.model or str(bundled_model_path())
            options = {}
        length = args.system_tokens + args.own_tokens + args.max_tokens
        options |= {
            "device": args.device,
            "max_model_len": max(length, 4096),
            "max_num_seqs": max(args.requests, 8),
            "max_num_batched_tokens": args.max_num_batched_tokens,
        }
        rows = []
        for run in RUNS:
            config = EngineConfig.from_kwargs(model, enable_prefix_caching=run != "off", **options)
            rows.append(run_once(config, run, args))
            print(f"{run}: mean TTFT {rows[-1]['ttft_mean_s']:.3f} s", file=sys.stderr)
    off, device = rows[0], rows[0]["device"]
    for row in rows:
        row["ttft_speedup"] = off["ttft_mean_s"] / row["ttft_mean_s"]
        row["outputs_equal_off"] = row["outputs"] == off["outputs"]
    for row in rows:
        del row["outputs"], row["device"]
    report = {
        "setting": {
            "model": args.model_config or args.model or "bundled",
            "precision": args.precision,
            "device": device,
            "requests": args.requests,
            "system_tokens": args.system_tokens,
            "own_tokens": args.own_tokens,
            "max_tokens": args.max_tokens,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        },
        "runs": rows,
    }
    print(
        f"{'run':6} {'TTFT mean':>10} {'p50':>8} {'p90':>8} {'last 1st':>9} {'cached':>8} "
        f"{'speedup':>8} {'same':>5}"
    )
    for r in rows:
        print(
            f"{r['run']:6} {r['ttft_mean_s']:>9.3f}s {r['ttft_p50_s']:>7.3f}s "
            f"{r['ttft_p90_s']:>7.3f}s {r['all_first_tokens_s']:>8.3f}s {r['cached_tokens']:>8} "
            f"{r['ttft_speedup']:>7.2f}x {str(r['outputs_equal_off']):>5}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["outputs_equal_off"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
