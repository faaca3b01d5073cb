"""`omniserve build-kernels`: compile every CUDA extension ahead of time into the kernel cache, so
that the first engine start does not pay for the builds."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-kernels",
        help="compile the CUDA kernels ahead of time",
        description="Compile every CUDA extension of omniserve (sm_90a) into the kernel cache "
        "(~/.cache/omniserve/kernels, or $OMNISERVE_KERNEL_CACHE). Needs a Hopper GPU and nvcc.",
    )
    p.add_argument("--only", default=None, help="comma-separated extension names (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per extension")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omniserve.errors import ConfigError
    from omniserve.kernels import all_extensions

    extensions = all_extensions()
    if args.only is not None:
        wanted = args.only.split(",")
        known = {e.name for e in extensions}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ConfigError(f"unknown extension(s) {unknown}; choose from {sorted(known)}")
        extensions = [e for e in extensions if e.name in wanted]
    for ext in extensions:
        missing = ext.missing_requirement()
        if missing is not None:  # an optional path (its callers fall back); say so and go on
            if args.json:
                print(json.dumps({"extension": ext.name, "skipped": missing}))
            else:
                print(f"skipped {ext.name}: {missing}", file=sys.stderr)
            continue
        start = time.perf_counter()
        ext.load()  # KernelUnavailableError / KernelBuildError say what is wrong
        seconds = time.perf_counter() - start
        if args.json:
            print(json.dumps({"extension": ext.name, "seconds": round(seconds, 2)}))
        else:
            print(f"built {ext.name} in {seconds:.1f} s", file=sys.stderr)
    return 0
