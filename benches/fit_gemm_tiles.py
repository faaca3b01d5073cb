"""Refit the tensor-core GEMM's tile cost model (cuda/gemm/dispatch.cuh) to a forced-tile sweep.

    python -m omniserve.bench.kernels_gemm --m 64 128 256 512 --paths auto \\
        --tiles 64x1 64x2 64x3 64x4 128x1 128x2 128x3 128x4 256x1 256x2 256x3 256x4 \\
        --repeats 3 --target-ms 4 --json sweep.json
    python benches/fit_gemm_tiles.py sweep.json

The model: a grid of ceil(M / tokens) · N / 128 output tiles runs in ceil(tiles / resident) waves
(resident: the clusters the device holds at once, which the sweep records from CUDA's occupancy
query); a wave costs kFillUs plus ceil(K / 128 / split) K-block steps of kKBlockUs[format][tile
height]; a split adds kReduceUs. The least-squares fit minimizes the relative error. Printed: the
constants as dispatch.cuh spells them, the fit's error, and per (format, shape, M) the tile the
model picks against the sweep's fastest and the automatic path's time.

Sweeps saved before the JSON recorded residency (benches/results/h100-kernels-gemm-tiles.json)
take it from `--gpc-sms`, the SMs of each GPC: a cluster's blocks share a GPC, and tiles that fit
two to an SM (64-token W4 tiles) pair up on the same SMs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from typing import Any

import torch

FORMATS = {"w8a8": "kW8A8", "w4a8_per_channel": "kW4A8PerChannel", "w4a8_g128": "kW4A8G128"}
HEIGHTS = (64, 128, 256)
H100_GPC_SMS = (18, 18, 18, 18, 16, 16, 14, 14)
"""An H100 SXM's 132 SMs by GPC, as the sweep's second waves of 3- and 4-block clusters imply."""

Row = dict[str, Any]


def _tile(row: Row) -> tuple[int, int]:
    tokens, split = row["tile"].split("x")
    return int(tokens), int(split)


def _resident(sweep: dict[str, Any], row: Row, gpc_sms: tuple[int, ...]) -> int:
    recorded = sweep.get("resident_clusters")
    if recorded is not None:
        return int(recorded[row["op"]][row["tile"]])
    tokens, split = _tile(row)
    per_sm = 2 if tokens == 64 and row["op"] != "w8a8" else 1
    return per_sm * sum(sms // split for sms in gpc_sms)


def _features(sweep: dict[str, Any], row: Row, gpc_sms: tuple[int, ...]) -> tuple[int, int, int]:
    """(waves, K-block steps per wave, split) of a forced-tile row."""
    tokens, split = _tile(row)
    tiles = math.ceil(row["m"] / tokens) * (row["n"] // 128)
    waves = math.ceil(tiles / _resident(sweep, row, gpc_sms))
    return waves, math.ceil(row["k"] / 128 / split), split


def fit(sweep: dict[str, Any], gpc_sms: tuple[int, ...] = H100_GPC_SMS) -> dict[str, Any]:
    """The model's constants fitted to `sweep`'s forced-tile rows, and its picks."""
    rows = [r for r in sweep["rows"] if r.get("tile") and "us" in r and r["op"] in FORMATS]
    ops = sorted({r["op"] for r in rows}, key=list(FORMATS).index)
    columns = ["fill", "reduce"] + [f"{op}@{h}" for op in ops for h in HEIGHTS]
    a = torch.zeros(len(rows), len(columns), dtype=torch.float64)
    b = torch.tensor([r["us"] for r in rows], dtype=torch.float64)
    for i, r in enumerate(rows):
        waves, steps, split = _features(sweep, r, gpc_sms)
        a[i, 0] = waves
        a[i, 1] = 1.0 if split > 1 else 0.0
        a[i, columns.index(f"{r['op']}@{_tile(r)[0]}")] = waves * steps
    weight = 1 / b
    solution = torch.linalg.lstsq(a * weight[:, None], b * weight).solution
    predicted = a @ solution
    error = ((predicted - b).abs() / b).tolist()
    constants = dict(zip(columns, solution.tolist(), strict=True))

    groups: dict[tuple[str, str, int], list[tuple[float, float, str]]] = defaultdict(list)
    for r, p in zip(rows, predicted.tolist(), strict=True):
        groups[(r["op"], r["shape"], r["m"])].append((p, r["us"], r["tile"]))
    auto = {
        (r["op"], r["shape"], r["m"]): r["us"]
        for r in sweep["rows"]
        if r.get("path") == "auto" and not r.get("tile") and "us" in r
    }
    picks = []
    for key, options in sorted(groups.items()):
        pick, best = min(options), min(options, key=lambda o: o[1])
        picks.append(
            {"case": key, "pick": pick[2], "pick_us": pick[1], "best": best[2], "best_us": best[1]}
            | {"auto_us": auto.get(key)}
        )
    return {
        "constants": constants,
        "median_error": sorted(error)[len(error) // 2],
        "max_error": max(error),
        "picks": picks,
    }


def report(result: dict[str, Any]) -> str:
    c = result["constants"]
    lines = [
        f"constexpr double kFillUs = {c['fill']:.2f};",
        f"constexpr double kReduceUs = {c['reduce']:.2f};",
    ]
    for op, name in FORMATS.items():
        if f"{op}@64" in c:
            steps = ", ".join(f"{c[f'{op}@{h}']:.3f}" for h in HEIGHTS)
            lines.append(f"kKBlockUs<Format::{name}> = {{{steps}}}")
    lines.append(
        f"relative error: median {result['median_error']:.1%}, max {result['max_error']:.1%}"
    )
    totals = {"pick": 0.0, "best": 0.0, "auto": 0.0}
    for p in result["picks"]:
        op, shape, m = p["case"]
        lines.append(
            f"{op:17} {shape:8} M={m:<5} pick {p['pick']:5} {p['pick_us']:8.2f} us   best "
            f"{p['best']:5} {p['best_us']:8.2f} us   auto {p['auto_us'] or float('nan'):8.2f} us"
        )
        totals["pick"] += p["pick_us"]
        totals["best"] += p["best_us"]
        totals["auto"] += p["auto_us"] or 0.0
    lines.append(
        f"sum over cases: model's picks {totals['pick']:.1f} us, fastest {totals['best']:.1f} us, "
        f"the sweep's automatic path {totals['auto']:.1f} us"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="JSON of a kernels_gemm run with --tiles")
    parser.add_argument(
        "--gpc-sms",
        default=",".join(map(str, H100_GPC_SMS)),
        help="SMs per GPC, for sweeps that did not record residency",
    )
    args = parser.parse_args(argv)
    with open(args.sweep) as f:
        sweep = json.load(f)
    print(report(fit(sweep, tuple(int(s) for s in args.gpc_sms.split(",")))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
