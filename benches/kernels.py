"""One command for every kernel benchmark: `python benches/kernels.py [--ops attention,gemm]
[--json OUT]` runs each named sweep (omniserve.bench.kernels_<op>) with its default arguments and
writes all rows, tagged with their sweep, to one JSON file."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SWEEPS = {"attention": "omniserve.bench.kernels_attention", "gemm": "omniserve.bench.kernels_gemm"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(SWEEPS), help=f"comma-separated, of {list(SWEEPS)}")
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in SWEEPS]
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {list(SWEEPS)}")
    rows = []
    for op in ops:
        try:
            module = importlib.import_module(SWEEPS[op])
        except ModuleNotFoundError as exc:
            if exc.name != SWEEPS[op]:
                raise
            print(f"skipping {op}: {SWEEPS[op]} is not present", file=sys.stderr)
            continue
        sweep_parser = argparse.ArgumentParser()
        module.add_arguments(sweep_parser)
        for row in module.run(sweep_parser.parse_args([])):
            rows.append({"sweep": op, **row})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
