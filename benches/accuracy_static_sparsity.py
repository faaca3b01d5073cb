"""Accuracy of static sparsity on one model: dense, the shipped head pattern, and random patterns of
the same sparsity, by passkey retrieval (NIAH grid) and perplexity, all through the engine.

    python benches/accuracy_static_sparsity.py --output benches/results/accuracy-static-sparsity.json

Defaults: the bundled model (8K context) and its `attn_pattern/`, fp32 on CPU, static sparsity
0.5, the streaming windows scaled to the 8K context (sink 64 / local 512 tokens in prefill, sink
64 / local 256 in decode: LServe's 128 / 8192 and 128 / 256 are for 128K+ contexts). Random
patterns draw their gates with `formats.head_pattern.random_gates` (seeds 0, 1, 2) and are
binarised the same way. Prints a markdown table and writes JSON with every number and setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from omniserve.bench.sparsity_accuracy import add_common_args, engine_options, ints, write_json
from omniserve.engine.engine import Engine
from omniserve.eval.niah import run_niah
from omniserve.eval.perplexity import perplexity, read_text
from omniserve.formats.head_pattern import random_gates, save_head_pattern
from omniserve.runner.streaming import PATTERN_DIR


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_common_args(p)
    p.add_argument("--random-seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--output", type=Path, default=None, help="JSON file")
    args = p.parse_args()

    text = read_text(args.model / "heldout.txt")
    prefill_sink, prefill_local = args.windows[:2]
    common = engine_options(args)
    results: list[dict[str, Any]] = []

    def evaluate(name: str, **options: Any) -> None:
        start = time.perf_counter()
        engine = Engine.from_pretrained(args.model, **common, **options)
        niah = run_niah(engine, args.niah_lengths, args.niah_depths, args.niah_samples)
        row = {
            "system": name,
            "options": {k: v for k, v in options.items() if k != "attn_pattern"},
            "perplexity": perplexity(engine, text, args.seq_len, args.max_windows).perplexity,
            "niah": {"accuracy": niah.accuracy, "overall": niah.overall},
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)

    evaluate("dense", static_sparsity=0.0)
    shipped = args.pattern or args.model / PATTERN_DIR
    sparse = {"static_sparsity": args.static_sparsity}
    evaluate("shipped pattern", attn_pattern=str(shipped), **sparse)
    layers, kv_heads = _shape(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.random_seeds:
            directory = Path(tmp) / f"random-{seed}"
            gates = random_gates(layers, kv_heads, seed)
            save_head_pattern(directory, gates, sink_size=prefill_sink, recent_size=prefill_local)
            evaluate(f"random pattern (seed {seed})", attn_pattern=str(directory), **sparse)

    print("\n| system | perplexity | NIAH | " + " | ".join(map(str, args.niah_lengths)) + " |")
    print("| --- " * (3 + len(args.niah_lengths)) + "|")
    for r in results:
        by_length = [sum(row) / len(row) for row in r["niah"]["accuracy"]]
        cells = " | ".join(f"{a:.2f}" for a in by_length)
        print(f"| {r['system']} | {r['perplexity']:.3f} | {r['niah']['overall']:.3f} | {cells} |")
    if args.output:
        write_json(args.output, args, results)


def _shape(model: Path) -> tuple[int, int]:
    config = json.loads((model / "config.json").read_text())
    return config["num_hidden_layers"], config["num_key_value_heads"]


if __name__ == "__main__":
    main()
