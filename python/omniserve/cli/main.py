"""`omniserve` command line: one module per command, each registering its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

_COMMANDS = (
    "generate",
    "serve",
    "bench",
    "eval",
    "quantize",
    "calibrate-heads",
    "convert",
    "build-kernels",
)


class _Parser(argparse.ArgumentParser):
    """Every omniserve parser: no abbreviated long options (`--prompt` must not silently mean
    `--prompts-file`). Subcommand parsers are built with the class of their parent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="omniserve",
        description="Quantized, sparse-attention LLM serving for Llama-family models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"omniserve.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from omniserve.errors import OmniserveError

    try:
        return int(args.func(args) or 0)
    except OmniserveError as exc:
        print(f"omniserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
