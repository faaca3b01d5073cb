"""`omniserve eval`: accuracy through the engine (perplexity, needle in a haystack), with every
engine option available so one command compares precisions and attention settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from omniserve.cli.engine_args import add_engine_args, engine_kwargs

if TYPE_CHECKING:
    from omniserve.engine.engine import Engine


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy: perplexity, needle in a haystack",
        description="Accuracy through the engine.",
    )
    kinds = p.add_subparsers(dest="eval", required=True, metavar="EVAL")

    ppl = kinds.add_parser(
        "ppl",
        help="perplexity of a text file",
        description="Perplexity over consecutive windows of a text file, each led by <s>.",
    )
    ppl.add_argument(
        "--data",
        type=Path,
        default=None,
        help="text file (default: the bundled model's held-out sample)",
    )
    ppl.add_argument("--seq-len", type=int, default=512, help="tokens per window, <s> included")
    ppl.add_argument(
        "--max-windows", type=int, default=None, help="score N windows spread evenly over the text"
    )
    ppl.add_argument("--output-json", type=Path, default=None)
    add_engine_args(ppl)
    ppl.set_defaults(func=run_ppl)

    niah = kinds.add_parser(
        "niah",
        help="needle in a haystack (passkey retrieval)",
        description="Passkey retrieval accuracy per context length and needle depth.",
    )
    niah.add_argument(
        "--lengths",
        type=_ints,
        default=[1024, 2048, 4096, 8192],
        help="comma-separated context lengths",
    )
    niah.add_argument(
        "--depths",
        type=_floats,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="comma-separated depths in [0, 1]",
    )
    niah.add_argument("--samples", type=int, default=4, help="needles per cell")
    niah.add_argument("--filler", choices=["sentences", "classic"], default="sentences")
    niah.add_argument("--output-json", type=Path, default=None)
    niah.add_argument("--output-png", type=Path, default=None, help="heatmap")
    add_engine_args(niah)
    niah.set_defaults(func=run_niah)


def _engine(args: argparse.Namespace) -> Engine:
    from omniserve.engine.engine import Engine

    return Engine.from_pretrained(args.model, **engine_kwargs(args))


def run_ppl(args: argparse.Namespace) -> int:
    from omniserve.engine.engine import bundled_model_path
    from omniserve.eval.perplexity import perplexity, read_text

    data = args.data or bundled_model_path() / "heldout.txt"
    result = perplexity(_engine(args), read_text(data), args.seq_len, args.max_windows)
    print(
        f"perplexity {result.perplexity:.3f} (mean NLL {result.mean_nll:.4f}) over {result.tokens_scored} tokens in {result.windows} windows of {result.seq_len}"
    )
    if args.output_json is not None:
        args.output_json.write_text(
            json.dumps({"data": str(data), **msgspec.to_builtins(result)}, indent=2)
        )
    return 0


def run_niah(args: argparse.Namespace) -> int:
    from omniserve.eval.niah import plot_heatmap
    from omniserve.eval.niah import run_niah as niah

    result = niah(_engine(args), args.lengths, args.depths, args.samples, args.filler)
    print("length  " + " ".join(f"{d:>6.2f}" for d in result.depths))
    for length, row in zip(result.lengths, result.accuracy):
        print(f"{length:>6}  " + " ".join(f"{a:>6.2f}" for a in row))
    print(f"overall {result.overall:.3f}")
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(msgspec.to_builtins(result), indent=2))
    if args.output_png is not None:
        plot_heatmap(
            result, args.output_png, f"passkey retrieval ({args.model or 'bundled model'})"
        )
    return 0
