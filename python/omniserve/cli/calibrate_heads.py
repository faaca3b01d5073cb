"""`omniserve calibrate-heads`: learn a model's head pattern (DuoAttention's gates) and write it."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from omniserve.calibrate.heads import CalibrationSettings
    from omniserve.formats.streaming import StreamWindow
    from omniserve.training.needles import PasskeyBuilder

DTYPES = ("float32", "bfloat16", "float16")
DATASET = "single-passkey documents (omniserve.training.needles), classic and sentence filler"
"""What the gates were trained on, for the pattern's config.json."""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate-heads",
        help="learn which KV heads may stream (a head pattern for static sparsity)",
        description=(
            "DuoAttention's calibration: trainable per-KV-head gates mix full and streaming "
            "attention in every layer of the frozen model, trained to keep the final hidden states "
            "of synthetic passkey documents (L2) while an L1 term pulls the gates to 0. Writes "
            "full_attention_heads.tsv and config.json (DuoAttention's pattern format)."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="HF fp checkpoint directory")
    p.add_argument("--output", type=Path, required=True, help="pattern directory to write")
    p.add_argument("--steps", type=int, default=200, help="training documents, one per step")
    p.add_argument("--lr", type=float, default=0.02, help="peak learning rate of the gates")
    p.add_argument("--reg-weight", type=float, default=0.05, help="weight of the L1 term")
    p.add_argument(
        "--context-lengths",
        type=_ints,
        default=[1024, 2048, 4096],
        help="comma-separated document lengths in tokens, one drawn per step",
    )
    p.add_argument("--sink-tokens", type=int, default=64, help="streaming heads' sink tokens")
    p.add_argument("--local-tokens", type=int, default=512, help="streaming heads' recent tokens")
    p.add_argument(
        "--page-size", type=int, default=64, help="KV page size (windows round up to pages)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the documents")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: float32 on cpu, else bfloat16"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from omniserve.calibrate.checkpoint import load_gated_llama
    from omniserve.calibrate.heads import calibrate_heads
    from omniserve.formats.head_pattern import save_head_pattern, streaming_heads

    start = time.perf_counter()
    window, settings, device = _settings(args)
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    model = load_gated_llama(
        args.model,
        window,
        device=device,
        dtype=getattr(torch, dtype),
        max_positions=max(settings.context_lengths),
    )
    builder = _passkey_builder(args.model, min(settings.context_lengths))
    gates = calibrate_heads(model, builder, settings, progress=not args.no_progress)
    runtime = time.perf_counter() - start
    save_head_pattern(
        args.output,
        gates,
        sink_size=window.sink_pages * window.page_size,
        recent_size=window.local_pages * window.page_size,
        page_size=window.page_size,
        model_name=str(args.model),
        lr=settings.lr,
        reg_weight=settings.reg_weight,
        num_steps=settings.steps,
        context_lengths=list(settings.context_lengths),
        seed=settings.seed,
        dataset=DATASET,
        device=str(device),
        dtype=dtype,
        command=_command(args),
        runtime_s=round(runtime, 1),
    )
    per_layer = streaming_heads(gates, 0.5).sum(dim=1).tolist()
    print(f"wrote {args.output} in {runtime:.0f} s; mean gate {gates.mean().item():.3f}")
    print(f"streaming heads per layer at static_sparsity 0.5: {per_layer}")
    return 0


def _settings(args: argparse.Namespace) -> tuple[StreamWindow, CalibrationSettings, torch.device]:
    """The run's window, settings and device; ConfigError for any the flags make invalid."""
    import torch

    from omniserve.calibrate.heads import CalibrationSettings
    from omniserve.errors import ConfigError
    from omniserve.formats.streaming import StreamWindow

    if min(args.sink_tokens, args.local_tokens) < 0 or args.page_size < 1:
        raise ConfigError("--sink-tokens and --local-tokens must be >= 0, --page-size >= 1")
    window = StreamWindow.of_tokens(args.sink_tokens, args.local_tokens, args.page_size)
    try:
        settings = CalibrationSettings(
            steps=args.steps,
            lr=args.lr,
            reg_weight=args.reg_weight,
            context_lengths=tuple(args.context_lengths),
            seed=args.seed,
        )
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available")
    reach = (window.sink_pages + window.local_pages + 1) * window.page_size
    if max(settings.context_lengths) <= reach:
        raise ConfigError(
            f"--context-lengths: the longest, {max(settings.context_lengths)}, must exceed the "
            f"streaming window ({reach} tokens), or streaming heads see every token"
        )
    return window, settings, device


def _passkey_builder(model_dir: Path, shortest_context: int) -> PasskeyBuilder:
    """Passkey documents on the model's own tokenizer."""
    from omniserve.calibrate.checkpoint import load_tokenizer
    from omniserve.calibrate.heads import KEY_DIGITS
    from omniserve.errors import CheckpointError, ConfigError
    from omniserve.training.needles import PasskeyBuilder

    try:
        builder = PasskeyBuilder(load_tokenizer(model_dir))
    except ValueError as exc:  # a tokenizer without single-digit tokens
        raise CheckpointError(f"{model_dir}: {exc}") from None
    needed = builder.min_length(KEY_DIGITS[1] - 1)
    if shortest_context < needed:
        raise ConfigError(f"--context-lengths: a passkey document needs at least {needed} tokens")
    return builder


def _command(args: argparse.Namespace) -> str:
    """The command line of this run with every setting explicit (each option is its dest with
    dashes), for the pattern's config.json."""
    words = ["omniserve", "calibrate-heads"]
    for name, value in vars(args).items():
        if name in ("command", "func", "no_progress"):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else value
        if text is not None:
            words += [f"--{name.replace('_', '-')}", str(text)]
    return shlex.join(words)
