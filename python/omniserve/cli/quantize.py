"""`omniserve quantize`: QoQ-quantize an HF fp checkpoint into our W4A8 / W8A8 checkpoint, or
round it to the FP8 one (`--precision fp8`, which needs no calibration)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omniserve.formats.kv import KV_GRANULARITIES, PER_TOKEN_HEAD
from omniserve.formats.precision import GROUP_SIZE_CHOICES, PER_CHANNEL, PRECISION_CHOICES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="QoQ-quantize an HF checkpoint (W4A8 / W8A8), or round it to FP8",
        description=(
            "QoQ quantization (rotation, smoothing, SmoothAttention, clipping, g128 reordering, "
            "optional GPTQ), calibrated layer by layer on a text file; writes a checkpoint that "
            "`omniserve generate/serve --model DIR` loads. The KV cache needs no calibration: "
            "the precision's kv4/kv8 part is quantized per token at run time. --precision fp8 "
            "rounds each weight to e4m3 per channel instead (activations are scaled per token "
            "at run time), with no calibration and no QoQ options."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="HF fp checkpoint directory")
    p.add_argument("--output", type=Path, required=True, help="directory to write")
    p.add_argument(
        "--precision",
        required=True,
        help=f"one of {', '.join(PRECISION_CHOICES)} with quantized weights (w4a8*, w8a8*, fp8)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=PER_CHANNEL,
        help=f"{' or '.join(map(str, GROUP_SIZE_CHOICES))} (-1 = per-channel; 128 for w4a8 only)",
    )
    p.add_argument(
        "--kv-granularity",
        choices=KV_GRANULARITIES,
        default=PER_TOKEN_HEAD,
        help="per_token_head: dynamic KV scales at run time; per_tensor: static per-layer KV8 scales calibrated here (kv8 precisions)",
    )
    p.add_argument(
        "--calib", type=Path, help="calibration text file (UTF-8); required except for fp8"
    )
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window, <s> included")
    p.add_argument(
        "--device", default="cpu", help="where each layer is calibrated (cpu, cuda, cuda:1, ...)"
    )
    p.add_argument("--no-rotation", action="store_true", help="skip the Hadamard rotation")
    p.add_argument("--rotation-seed", type=int, default=0)
    p.add_argument(
        "--no-smooth", action="store_true", help="skip down_proj and o_proj input smoothing"
    )
    p.add_argument("--no-smooth-attention", action="store_true", help="skip SmoothAttention on q/k")
    p.add_argument("--smooth-attention-alpha", type=float, default=0.5)
    p.add_argument("--no-clip", action="store_true", help="skip the weight clipping search")
    p.add_argument("--clip-min", type=float, default=0.5, help="smallest clipping ratio searched")
    p.add_argument(
        "--clip-steps", type=int, default=21, help="clipping ratios searched in [clip-min, 1]"
    )
    p.add_argument("--no-reorder", action="store_true", help="skip g128 channel reordering")
    p.add_argument("--gptq", action="store_true", help="choose the codes with GPTQ")
    p.add_argument(
        "--max-rows",
        type=int,
        default=2048,
        help="calibration rows kept per linear for the searches",
    )
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument(
        "--json", action="store_true", help="print the recipe and per-linear errors as JSON"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from omniserve.errors import CheckpointError, ConfigError
    from omniserve.formats.checkpoint import check_kv_granularity
    from omniserve.formats.precision import parse
    from omniserve.quantize.qoq import QoQOptions, load_calibration, quantize_checkpoint
    from omniserve.quantize.qoq.model import SourceModel
    from omniserve.quantize.rtn_model import write_rtn_checkpoint

    precision = parse(args.precision, args.group_size)
    check_kv_granularity(args.kv_granularity, precision)  # before any loading
    if not precision.quantized_weights:
        raise ConfigError(
            f"precision {precision.name} keeps the model's fp weights; its KV cache is quantized "
            f"at run time without calibration: serve {args.model} with --precision {precision.name}"
        )
    if precision.float8:
        write_rtn_checkpoint(args.model, args.output, precision)
        print(f"wrote {precision.name} (e4m3 weights, a scale per channel) to {args.output}")
        return 0
    if args.calib is None:
        raise ConfigError(f"--precision {precision.name} is calibrated with QoQ: pass --calib")
    try:
        options = QoQOptions(
            rotation=not args.no_rotation,
            rotation_seed=args.rotation_seed,
            smooth_down=not args.no_smooth,
            smooth_out=not args.no_smooth,
            smooth_attention=not args.no_smooth_attention,
            smooth_attention_alpha=args.smooth_attention_alpha,
            clip=not args.no_clip,
            clip_min=args.clip_min,
            clip_steps=args.clip_steps,
            reorder=not args.no_reorder,
            gptq=args.gptq,
            max_rows=args.max_rows,
            batch_size=args.batch_size,
        )
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    SourceModel(args.model).close()  # a clear error for a missing or unsupported model first
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer of {args.model}: {exc}") from None
    calibration = load_calibration(args.calib, tokenizer, args.num_samples, args.seq_len)
    report = quantize_checkpoint(
        args.model,
        args.output,
        precision,
        calibration,
        options,
        device,
        progress=not args.json,
        kv_granularity=args.kv_granularity,
    )
    if args.json:
        print(json.dumps({"recipe": report.recipe, "errors": report.errors}, indent=2))
        return 0
    by_kind: dict[str, list[float]] = {}
    for prefix, error in report.errors.items():
        by_kind.setdefault(prefix.rsplit(".", 1)[-1], []).append(error)
    summary = ", ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in by_kind.items())
    print(f"wrote {precision.name} (group_size {precision.group_size}) to {args.output}")
    print(f"mean relative output error on calibration tokens: {summary}")
    return 0
