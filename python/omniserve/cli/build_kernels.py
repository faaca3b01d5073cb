"""`omniserve build-kernels`: compile every CUDA extension ahead of time into the kernel cache, so
that the first engine start does not pay for the builds."""

from __future__ import annotations

import argparse
import json
import subprocess
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
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="extensions built at once, each in its own process (default: all of them; an "
        "extension has few sources, so one build alone leaves most cores idle)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omniserve.errors import ConfigError
    from omniserve.kernels import (
        KernelUnavailableError,
        all_extensions,
        unavailable_reason,
    )

    extensions = all_extensions()
    if args.only is not None:
        wanted = args.only.split(",")
        known = {e.name for e in extensions}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ConfigError(f"unknown extension(s) {unknown}; choose from {sorted(known)}")
        extensions = [e for e in extensions if e.name in wanted]
    buildable = []
    for ext in extensions:
        missing = ext.missing_requirement()
        if missing is None:
            buildable.append(ext)
        elif args.json:  # an optional path (its callers fall back): say so and go on
            print(json.dumps({"extension": ext.name, "skipped": missing}))
        else:
            print(f"skipped {ext.name}: {missing}", file=sys.stderr)
    reason = unavailable_reason() if buildable else None
    if reason is not None:  # nothing can build here: say so once, before any process starts
        raise KernelUnavailableError(f"cannot build the CUDA extensions: {reason}")
    jobs = args.jobs or len(buildable)
    if jobs > 1 and len(buildable) > 1:
        return _build_in_processes([e.name for e in buildable], jobs, args.json)
    for ext in buildable:
        start = time.perf_counter()
        ext.load()  # KernelBuildError says what went wrong
        seconds = time.perf_counter() - start
        if args.json:
            print(json.dumps({"extension": ext.name, "seconds": round(seconds, 2)}))
        else:
            print(f"built {ext.name} in {seconds:.1f} s", file=sys.stderr)
    return 0


def _build_in_processes(names: list[str], jobs: int, as_json: bool) -> int:
    """Run `build-kernels --only NAME` for each name, `jobs` processes at a time; each reports
    as a sequential build does. Fails (the first failing exit status) after all have finished."""
    pending, running, status = list(names), [], 0
    command = [sys.executable, "-m", "omniserve.cli.main", "build-kernels", "--jobs", "1"]
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            flags = ["--only", name, *(["--json"] if as_json else [])]
            running.append(subprocess.Popen([*command, *flags]))
        done = running.pop(0)
        status = status or done.wait()
    return status
