"""`omniserve bench`: measured speed, always next to a peer run in the same process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omniserve.cli.engine_args import add_engine_args, engine_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (throughput)", description="Benchmarks.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    t = kinds.add_parser(
        "throughput",
        help="offline generation throughput vs HF transformers (QServe's setting)",
        description="Random-token prompts, fixed input/output lengths, a fixed batch submitted "
        "at once; throughput = generated tokens / wall time including prefill. Weights are "
        "random (built from config.json, RTN-quantized for quantized precisions) unless "
        "--load-format auto is given with --model. --precisions measures several systems one "
        "after another in one run; HF transformers runs once, unquantized, as their peer.",
    )
    from omniserve.bench.throughput import DTYPE_SYSTEMS, PRESETS

    t.add_argument(
        "--model-config",
        choices=PRESETS,
        default="llama-3-8b",
        help="model shape preset (ignored with --model)",
    )
    t.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes")
    t.add_argument("--input-len", type=int, default=1024)
    t.add_argument("--output-len", type=int, default=512)
    t.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        metavar="SYSTEM",
        help="omniserve systems to measure, in order: a --precision value, with :g128 for W4A8 "
        f"g128 (w4a8kv4:g128), or {'/'.join(DTYPE_SYSTEMS)} (w16a16 in that dtype; other systems "
        "use --dtype); replaces --precision/--group-size. Default: one system from the engine "
        "options",
    )
    t.add_argument(
        "--peer", choices=["hf", "none"], default="hf", help="peer measured in the same run"
    )
    t.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    t.add_argument("--output-json", type=Path, default=None, help="write the report here")
    t.add_argument("--output-png", type=Path, default=None, help="write a bar chart here")
    add_engine_args(t)
    t.set_defaults(func=run_throughput)


def run_throughput(args: argparse.Namespace) -> int:
    from omniserve.bench import throughput
    from omniserve.errors import ConfigError

    systems = [throughput.BenchSystem()]
    if args.precisions is not None:
        if args.precision is not None or args.group_size is not None:
            raise ConfigError(
                "--precisions names each system's precision and group size; drop --precision "
                "and --group-size"
            )
        systems = [throughput.parse_system(text) for text in args.precisions]

    def write_json(report: dict[str, Any]) -> None:
        if args.output_json is not None:
            args.output_json.write_text(json.dumps(report, indent=2))

    report = throughput.run(
        model=args.model,
        preset=args.model_config,
        batches=args.batch,
        input_len=args.input_len,
        output_len=args.output_len,
        peers=[] if args.peer == "none" else [args.peer],
        seed=args.bench_seed,
        engine_options=engine_kwargs(args),
        systems=systems,
        progress=write_json,
    )
    print(throughput.table(report))
    write_json(report)
    if args.output_png is not None:
        throughput.plot(report, args.output_png)
    return 0
