"""`omniserve generate`: run prompts through the engine and print (or write as JSON) the results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from omniserve.cli.engine_args import add_engine_args, engine_kwargs
from omniserve.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text for prompts given as arguments or in a file",
        description="Generate text for each prompt with continuous batching.",
    )
    p.add_argument("prompts", nargs="*", help="prompt texts (default: read --prompts-file)")
    p.add_argument(
        "--prompts-file",
        type=Path,
        help="file with one prompt per line, or a JSON list of strings when it ends in .json",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON array of outputs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_engine_args(p)
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        path = args.prompts_file
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --prompts-file {path}: {exc}") from None
        if path.suffix == ".json":
            try:
                prompts += msgspec.json.decode(raw, type=list[str])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ConfigError(
                    f"--prompts-file {path} must be a JSON array of strings: {exc}"
                ) from None
        else:
            prompts += [line for line in raw.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("omniserve generate: give prompts as arguments or with --prompts-file")
    return prompts


def run(args: argparse.Namespace) -> int:
    from omniserve.engine.engine import Engine
    from omniserve.sampling_params import SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=tuple(args.stop),
    )
    engine = Engine.from_pretrained(args.model, **engine_kwargs(args))
    outputs = engine.generate(prompts, params, use_tqdm=not (args.no_progress or args.json))
    if args.json:
        sys.stdout.write(msgspec.json.encode(outputs).decode() + "\n")
        return 0
    for prompt, out in zip(prompts, outputs):
        print(f"--- prompt: {prompt!r} ({out.num_prompt_tokens} tokens)")
        print(f"{prompt}{out.text}")
        print(f"--- {out.num_generated_tokens} tokens, finish_reason={out.finish_reason}")
    return 0
