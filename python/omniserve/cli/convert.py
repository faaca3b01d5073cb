"""`omniserve convert`: a DeepCompressor fake-quant dump into our quantized checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from omniserve.formats.kv import KV_GRANULARITIES, PER_TOKEN_HEAD
from omniserve.formats.precision import GROUP_SIZE_CHOICES, PER_CHANNEL, PRECISION_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a DeepCompressor (QoQ) dump into an omniserve checkpoint",
        description="Recover the integer codes of a DeepCompressor fake-quant dump (model.pt, "
        "scale.pt, and acts.pt for per-tensor KV8) exactly, verify every weight is on its grid, "
        "and write a checkpoint that Engine.from_pretrained serves.",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="the HF model directory (config.json, tokenizer)"
    )
    p.add_argument(
        "--dump", type=Path, required=True, help="directory with model.pt, scale.pt [, acts.pt]"
    )
    p.add_argument(
        "--output", type=Path, required=True, help="directory to write the checkpoint to"
    )
    p.add_argument("--precision", required=True, choices=PRECISION_CHOICES, help="w4a8* or w8a8*")
    p.add_argument(
        "--group-size",
        type=int,
        default=PER_CHANNEL,
        choices=GROUP_SIZE_CHOICES,
        help="-1 (per-channel, default) or 128 (W4A8 g128)",
    )
    p.add_argument(
        "--kv-granularity",
        default=PER_TOKEN_HEAD,
        choices=KV_GRANULARITIES,
        help=f"default {PER_TOKEN_HEAD}; per_tensor stores static KV8 scales from acts.pt",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omniserve.formats.precision import parse
    from omniserve.quantize.convert_deepcompressor import convert_deepcompressor

    summary = convert_deepcompressor(
        args.model,
        args.dump,
        args.output,
        parse(args.precision, args.group_size),
        args.kv_granularity,
        show_progress=not (args.no_progress or args.json),
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(
            f"wrote {summary.output}: {summary.num_linears} {summary.precision} linears "
            f"(group_size {summary.group_size}), KV {summary.kv_granularity}; largest grid "
            f"residual {summary.max_grid_residual:.2e}"
        )
    return 0
