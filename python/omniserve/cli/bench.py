"""`omniserve bench`: measured speed, always next to a peer run in the same process."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omniserve.cli.engine_args import add_engine_args, engine_kwargs

if TYPE_CHECKING:
    from omniserve.bench.throughput import BenchSystem


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks (throughput, long-context)", description="Benchmarks."
    )
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_throughput(kinds)
    _add_long_context(kinds)


def _add_throughput(kinds: argparse._SubParsersAction) -> None:
    t = kinds.add_parser(
        "throughput",
        help="offline generation throughput vs HF transformers (QServe's setting)",
        description="Random-token prompts, fixed input/output lengths, a fixed batch submitted "
        "at once; throughput = generated tokens / wall time including prefill. Weights are "
        "random (built from config.json, RTN-quantized for quantized precisions) unless "
        "--load-format auto is given with --model. --precisions measures several systems one "
        "after another in one run; HF transformers runs once, unquantized, as their peer.",
    )
    _add_model_config(
        t,
        "model shape preset (ignored with --model); default: llama-3-8b on a GPU, the bundled "
        "model on a machine without one",
        default=None,
    )
    t.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes")
    t.add_argument("--input-len", type=int, default=1024)
    t.add_argument("--output-len", type=int, default=512)
    _add_precisions(t, None, "one system from the engine options")
    t.add_argument(
        "--peer", choices=["hf", "none"], default="hf", help="peer measured in the same run"
    )
    t.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    t.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0: greedy tokens (QServe's setting); above 0 every system and the peer sample",
    )
    t.add_argument("--top-p", type=float, default=1.0, help="top-p of sampled tokens")
    t.add_argument(
        "--breakdown",
        action="store_true",
        help="run each batch a second time, broken down: prefill seconds, decode step median and "
        "p90, the device-busy fraction and per-op device time per decode step (torch.profiler); "
        "printed, in the JSON and as a second panel of the PNG",
    )
    _add_outputs(t, "a bar chart")
    add_engine_args(t)
    t.set_defaults(func=run_throughput)


def _add_long_context(kinds: argparse._SubParsersAction) -> None:
    from omniserve.bench.long_context import (
        DEFAULT_LENGTHS,
        DEFAULT_SELECTOR_INTERVAL,
        DEFAULT_TOKEN_BUDGET,
        MODES,
    )

    default_precisions = ["w8a8kv8", "w4a8kv4"]
    # "resolve", engine options first: the bench's own options replace engine options of the
    # same names (--static-sparsity and --attn-pattern are the static modes', --token-budget,
    # --page-selection and --selector-interval the dynamic modes'; the others don't use them).
    c = kinds.add_parser(
        "long-context",
        conflict_handler="resolve",
        help="prefill (TTFT) and decode latency at long prompts, dense vs static (streaming "
        "heads) and dynamic (decode page selection) sparsity (LServe's setting)",
        description="Per batch size and prompt length, --batch random-token prompts of that "
        "length added together, then --decode-tokens decoded tokens (EOS ignored). Each "
        "precision is measured in each of --modes, one engine each, reused across the batch "
        "sizes and lengths. Reports TTFT (to the first token of the batch's last request), "
        "decode ms/token (one decode step of the whole batch), the KV cache the batch holds, "
        "and each mode vs dense. Weights are random (built from the preset config).",
    )
    add_engine_args(c)
    # The model comes from --model-config; --model stays only to be refused with a reason.
    c.add_argument("--model", default=None, help=argparse.SUPPRESS)
    _add_model_config(c, "model shape preset")
    _add_precisions(c, default_precisions, " ".join(default_precisions))
    c.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        metavar="MODE",
        help="modes to measure, in order: dense; static (--static-sparsity of the KV heads "
        "stream); dynamic (decode attends --token-budget tokens of pages selected per query); "
        "dynamic+static (both). Default: all four",
    )
    c.add_argument(
        "--batch",
        dest="batches",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="batch sizes: that many prompts of each length decoded together (default: 1)",
    )
    c.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        metavar="TOKENS",
        help=f"prompt lengths (default: {' '.join(map(str, DEFAULT_LENGTHS))})",
    )
    c.add_argument("--decode-tokens", type=int, default=128, help="decoded tokens per prompt")
    c.add_argument(
        "--static-sparsity",
        dest="sparsity",
        metavar="FRACTION",
        type=float,
        default=0.5,
        help="fraction of KV heads that stream in the static modes, in (0, 1] (default: 0.5)",
    )
    c.add_argument(
        "--attn-pattern",
        dest="pattern",
        default=None,
        metavar="DIR",
        help="head pattern of the static modes (DuoAttention format); default: random gates "
        "seeded with --bench-seed",
    )
    c.add_argument(
        "--token-budget",
        dest="budget",
        type=int,
        default=DEFAULT_TOKEN_BUDGET,
        metavar="TOKENS",
        help="tokens a request's dense heads attend at decode in the dynamic modes, rounded up "
        f"to whole pages (default: {DEFAULT_TOKEN_BUDGET})",
    )
    c.add_argument(
        "--page-selection",
        dest="selection",
        choices=["kv_head", "query_head"],
        default="kv_head",
        help="who selects in the dynamic modes: each KV head for its GQA group, or each query "
        "head (default: kv_head)",
    )
    c.add_argument(
        "--selector-interval",
        dest="interval",
        type=int,
        default=DEFAULT_SELECTOR_INTERVAL,
        metavar="STEPS",
        help="decode steps a selection is reused for in the dynamic modes "
        f"(default: {DEFAULT_SELECTOR_INTERVAL})",
    )
    c.add_argument(
        "--bench-seed", type=int, default=0, help="seed of the random prompts and random gates"
    )
    _add_outputs(c, "TTFT and decode ms/token vs length, a panel pair per precision")
    c.set_defaults(func=run_long_context)


def _add_model_config(
    p: argparse.ArgumentParser, help_text: str, default: str | None = "llama-3-8b"
) -> None:
    from omniserve.bench.throughput import PRESETS

    p.add_argument("--model-config", choices=PRESETS, default=default, help=help_text)


def _default_model(device: str | None) -> tuple[str | None, str | None]:
    """(preset, model) when neither --model-config nor --model is given: the 8B shape on a GPU;
    without one, the bundled model, since the 8B shape's random weights alone take ~16 GB of
    CPU memory and its batches hours."""
    import torch

    from omniserve.engine.engine import bundled_model_path

    if torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda"):
        return "llama-3-8b", None
    print(
        "omniserve bench throughput: no GPU, so the bundled model (--model-config llama-3-8b "
        "for the 8B shape)",
        file=sys.stderr,
    )
    return None, str(bundled_model_path())


def _add_precisions(p: argparse.ArgumentParser, default: list[str] | None, says: str) -> None:
    from omniserve.bench.throughput import DTYPE_SYSTEMS

    p.add_argument(
        "--precisions",
        nargs="+",
        default=default,
        metavar="SYSTEM",
        help="omniserve systems to measure, in order: a --precision value, with :g128 for W4A8 "
        f"g128 (w4a8kv4:g128), or {'/'.join(DTYPE_SYSTEMS)} (w16a16 in that dtype; other systems "
        f"use --dtype); replaces --precision/--group-size. Default: {says}",
    )


def _add_outputs(p: argparse.ArgumentParser, chart: str) -> None:
    p.add_argument("--output-json", type=Path, default=None, help="write the report here")
    p.add_argument("--output-png", type=Path, default=None, help=f"write {chart} here")


def _systems(args: argparse.Namespace) -> list[BenchSystem] | None:
    """The --precisions systems (None if not given), refusing --precision/--group-size beside
    them."""
    from omniserve.bench.throughput import parse_system
    from omniserve.errors import ConfigError

    if args.precisions is None:
        return None
    if args.precision is not None or args.group_size is not None:
        raise ConfigError(
            "--precisions names each system's precision and group size; drop --precision "
            "and --group-size"
        )
    return [parse_system(text) for text in args.precisions]


def run_throughput(args: argparse.Namespace) -> int:
    from omniserve.bench import throughput

    def write_json(report: dict[str, Any]) -> None:
        if args.output_json is not None:
            args.output_json.write_text(json.dumps(report, indent=2))

    model, preset = args.model, args.model_config
    if model is None and preset is None:
        preset, model = _default_model(engine_kwargs(args).get("device"))
    report = throughput.run(
        model=model,
        preset=preset,
        batches=args.batch,
        input_len=args.input_len,
        output_len=args.output_len,
        peers=[] if args.peer == "none" else [args.peer],
        seed=args.bench_seed,
        engine_options=engine_kwargs(args),
        systems=_systems(args) or [throughput.BenchSystem()],
        progress=write_json,
        breakdown=args.breakdown,
        decoding=throughput.Decoding(args.temperature, args.top_p),
    )
    print(throughput.table(report))
    write_json(report)
    if args.output_png is not None:
        throughput.plot(report, args.output_png)
    return 0


def run_long_context(args: argparse.Namespace) -> int:
    from omniserve.bench import long_context
    from omniserve.errors import ConfigError

    if args.model is not None:
        raise ConfigError(
            "bench long-context builds its model from --model-config with random weights; "
            "drop --model"
        )

    def write_json(report: long_context.Report) -> None:
        if args.output_json is not None:
            args.output_json.write_bytes(long_context.to_json(report))

    def progress(report: long_context.Report) -> None:
        # One line per measurement: a long run shows where it is (and what it measured).
        print(long_context.row_line(report.results[-1]), file=sys.stderr, flush=True)
        write_json(report)

    report = long_context.run(
        preset=args.model_config,
        systems=_systems(args) or [],
        modes=args.modes,
        batches=args.batches,
        lengths=args.lengths,
        decode_tokens=args.decode_tokens,
        static_sparsity=args.sparsity,
        attn_pattern=args.pattern,
        token_budget=args.budget,
        page_selection=args.selection,
        selector_interval=args.interval,
        seed=args.bench_seed,
        engine_options=engine_kwargs(args),
        command=shlex.join(sys.argv),
        progress=progress,
    )
    print(long_context.table(report))
    write_json(report)
    if args.output_png is not None:
        long_context.plot(report, args.output_png)
    return 0
