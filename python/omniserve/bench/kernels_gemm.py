"""Quantized GEMM kernels (kernels/gemm.py) against cuBLAS peers on the GPU, one row per measurement.

Contestants, per (M, N, K): our W4A8 per-channel, W4A8 g128 and W8A8 kernels (bf16 output, the
GEMM alone: activation quantization excluded, as for the peers), `torch.matmul` bf16,
`torch._int_mm` int8 → int32 and `torch._scaled_mm` fp8 e4m3 with per-row/per-column fp32 scales
→ bf16. Times are GPU times of CUDA-graph replays (no launch gaps), cycling through enough weight
copies that every launch reads its weight from HBM rather than the 50 MB L2, median of repeats.

Peers with shape limits run padded: `_int_mm` needs M > 16 and `_scaled_mm` M a multiple of 16;
such rows carry `m_run`, the M that actually ran. Ceilings are the H100's measured rates in
`CEILING_TFLOPS` and `CEILING_BYTES_PER_S` below (docs/architecture.md#testing-and-measuring);
W4A8 runs on the INT8 tensor cores, so its compute ceiling is INT8's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from omniserve.kernels.gemm import Tile

CEILING_TFLOPS = {"bf16": 790.0, "int8": 950.0, "fp8": 1430.0}
CEILING_BYTES_PER_S = 3.0e12
LLAMA3_8B_SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
M_VALUES = (1, 16, 64, 256, 1024, 4096, 16384)
OURS = ("w4a8_per_channel", "w4a8_g128", "w8a8")
SMALL_M_MAX = 64
"""The memory-bound kernel's largest M (kernels/gemm.py)."""
PEERS = ("bf16_matmul", "int8_int_mm", "fp8_scaled_mm")
_ROTATE_BYTES = 256 * 2**20
"""Weights cycled per measurement reach this many bytes, 5x the L2."""


def _gpu_time_us(fns: list[Callable[[], object]], repeats: int, target_ms: float) -> float:
    """Median µs per call of cycling through `fns`, timed as CUDA-graph replays."""
    for fn in fns:  # warm-up: builds, autotuning, workspace allocation, out of the capture
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in fns:
        fn()
    end.record()
    end.synchronize()
    per_call_ms = max(start.elapsed_time(end) / len(fns), 1e-3)
    calls = max(len(fns), min(2000, math.ceil(target_ms / per_call_ms)))
    calls = math.ceil(calls / len(fns)) * len(fns)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()  # first replay pays one-time costs
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def _copies(weight_bytes: int) -> int:
    return max(1, min(16, math.ceil(_ROTATE_BYTES / max(weight_bytes, 1))))


def _ours(
    fmt: str, m: int, n: int, k: int, path: str, tile: Tile | None
) -> tuple[list[Callable[[], object]], int, int]:
    from omniserve.formats.activation import quantize_per_token
    from omniserve.formats.weight import (
        quantize_w4a8_g128,
        quantize_w4a8_per_channel,
        quantize_w8a8,
    )
    from omniserve.kernels import gemm as gk
    from omniserve.kernels.packed_weight import PackedWeight

    quantizer = {
        "w4a8_per_channel": quantize_w4a8_per_channel,
        "w4a8_g128": quantize_w4a8_g128,
        "w8a8": quantize_w8a8,
    }[fmt]
    packed = gk.pack(quantizer(torch.randn(n, k, device="cuda")))
    weight_bytes = sum(t.nbytes for t in packed.tensors().values())
    weights = [packed] + [
        PackedWeight(packed.fmt, **{k_: v.clone() for k_, v in packed.tensors().items()})
        for _ in range(_copies(weight_bytes) - 1)
    ]
    x = quantize_per_token(torch.randn(m, k, device="cuda"))
    fns = [lambda w=w: gk.quantized_gemm(x, w, torch.bfloat16, path, tile) for w in weights]
    return fns, weight_bytes, m


def _peer(name: str, m: int, n: int, k: int) -> tuple[list[Callable[[], object]], int, int]:
    if name == "bf16_matmul":
        m_run = m
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        ws = [w] + [w.clone() for _ in range(_copies(w.nbytes) - 1)]
        return [lambda w=w: torch.matmul(x, w.t()) for w in ws], w.nbytes, m_run
    if name == "int8_int_mm":
        m_run = max(m, 32)  # _int_mm needs M > 16
        x = torch.randint(-127, 128, (m_run, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        ws = [w] + [w.clone() for _ in range(_copies(w.nbytes) - 1)]
        return [lambda w=w: torch._int_mm(x, w.t()) for w in ws], w.nbytes, m_run
    m_run = max(16, math.ceil(m / 16) * 16)  # fp8 _scaled_mm needs M a multiple of 16
    x = torch.randn(m_run, k, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    sa = torch.rand(m_run, 1, device="cuda") + 0.5
    sb = torch.rand(1, n, device="cuda") + 0.5
    ws = [w] + [w.clone() for _ in range(_copies(w.nbytes) - 1)]
    fns = [
        lambda w=w: torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        for w in ws
    ]
    return fns, w.nbytes, m_run


def _row(
    op: str,
    path: str,
    shape: str,
    m: int,
    n: int,
    k: int,
    args: argparse.Namespace,
    tile: Tile | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"op": op, "shape": shape, "m": m, "n": n, "k": k}
    if op in OURS:
        row["path"] = path
    if tile is not None:
        row["tile"] = _tile_label(tile)
    try:
        if op in OURS and path == "auto":
            row["chosen"] = _chosen(op, m, n, k)
        if op in OURS:
            fns, weight_bytes, m_run = _ours(op, m, n, k, path, tile)
        else:
            fns, weight_bytes, m_run = _peer(op, m, n, k)
        us = _gpu_time_us(fns, args.repeats, args.target_ms)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a peer this torch lacks
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    finally:
        torch.cuda.empty_cache()
    ceiling = "bf16" if op == "bf16_matmul" else "fp8" if op == "fp8_scaled_mm" else "int8"
    act_bytes = m * k * (2 if op == "bf16_matmul" else 1)
    moved = weight_bytes + act_bytes + m * n * 2
    tflops = 2 * m_run * n * k / us / 1e6
    row.update(
        m_run=m_run,
        us=round(us, 2),
        tflops=round(tflops, 1),
        frac_compute_ceiling=round(tflops / CEILING_TFLOPS[ceiling], 3),
        weight_bytes=weight_bytes,
        gbps=round(moved / us / 1e3, 1),
        frac_bandwidth_ceiling=round(moved / us * 1e6 / CEILING_BYTES_PER_S, 3),
    )
    return row


def _tile_label(tile: Tile) -> str:
    return f"{tile[0]}x{tile[1]}"


def _format(op: str) -> type:
    from omniserve.formats.weight import W4A8PerChannelWeight, W4A8PerGroupWeight, W8A8Weight

    return {
        "w4a8_per_channel": W4A8PerChannelWeight,
        "w4a8_g128": W4A8PerGroupWeight,
        "w8a8": W8A8Weight,
    }[op]


def _chosen(op: str, m: int, n: int, k: int) -> str:
    """What the automatic path runs for this row: "small_m", "tensor_core@TOKENSxSPLIT", "cutlass"."""
    from omniserve.kernels import gemm as gk

    path, tile = gk.auto_choice(_format(op), m, n, k)
    return path if tile is None else f"{path}@{_tile_label(tile)}"


def residency(ops: list[str], tiles: list[Tile]) -> dict[str, dict[str, int]]:
    """Per op and forced tile, the output tiles the device runs at once (the tile cost model's
    waves; benches/fit_gemm_tiles.py refits the model from them and the rows)."""
    from omniserve.kernels import gemm as gk

    return {
        op: {_tile_label(t): gk.resident_clusters(_format(op), t) for t in tiles}
        for op in ops
        if op in OURS
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All rows of the sweep (`args` as from `add_arguments`), with speedups of our kernels over
    bf16 matmul, `_int_mm` and FP8 `_scaled_mm` at the same (shape, M)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GEMM benchmark needs a CUDA device")
    shapes = {s: LLAMA3_8B_SHAPES[s] for s in args.shapes}
    rows = []
    for shape, (n, k) in shapes.items():
        for m in args.m:
            paths = [p for p in args.paths if p != "small_m" or m <= SMALL_M_MAX]
            group = [_row(op, p, shape, m, n, k, args) for op in args.ops for p in paths]
            group += [
                _row(op, "tensor_core", shape, m, n, k, args, tile)
                for op in args.ops
                for tile in args.tiles
            ]
            group += [_row(op, "", shape, m, n, k, args) for op in PEERS]
            times = {r["op"]: r.get("us") for r in group}
            for r in group:
                if r["op"] in OURS and r.get("us"):
                    for peer in ("bf16_matmul", "int8_int_mm", "fp8_scaled_mm"):
                        if times.get(peer):
                            r[f"speedup_vs_{peer}"] = round(times[peer] / r["us"], 2)
            rows.extend(group)
            if args.verbose:
                for r in group:
                    print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="token counts M")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(LLAMA3_8B_SHAPES),
        choices=list(LLAMA3_8B_SHAPES),
        help="Llama-3-8B projections (N x K)",
    )
    parser.add_argument("--ops", nargs="+", default=list(OURS), choices=list(OURS))
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["auto"],
        choices=["auto", "small_m", "tensor_core", "cutlass"],
        help="our kernels' paths to time (small_m only where M <= 64): tunes the dispatch",
    )
    parser.add_argument(
        "--tiles",
        nargs="*",
        default=[],
        type=_tile,
        metavar="TOKENSxSPLIT",
        help="also time the tensor-core kernel at these forced tiles (e.g. 128x2): tunes its choice",
    )
    parser.add_argument("--repeats", type=int, default=5, help="graph replays; the median is kept")
    parser.add_argument("--target-ms", type=float, default=20.0, help="GPU time per graph replay")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--verbose", action="store_true", help="print each row as it is measured")


def _tile(text: str) -> Tile:
    tokens, sep, split = text.partition("x")
    if not (sep and tokens.isdigit() and split.isdigit()):
        raise argparse.ArgumentTypeError(f"a tile is TOKENSxSPLIT, e.g. 128x2; got {text!r}")
    return int(tokens), int(split)


def _label(row: dict[str, Any]) -> str:
    if not row.get("path"):
        return row["op"]
    path = f"{row['path']}@{row['tile']}" if row.get("tile") else row["path"]
    if row.get("chosen"):
        path += f"={row['chosen']}"
    return f"{row['op']}[{path}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            saved: dict[str, Any] = {"device": torch.cuda.get_device_name(), "rows": rows}
            if args.tiles:
                saved["resident_clusters"] = residency(args.ops, args.tiles)
            json.dump(saved, f, indent=1)
    header = f"{'shape':8} {'M':>6} {'op':50} {'us':>9} {'TFLOP/s':>8} {'%peak':>6} {'GB/s':>7} "
    print(header + f"{'x bf16':>7} {'x int8':>7} {'x fp8':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:8} {r['m']:>6} {_label(r):50} {r['error']}")
            continue
        print(
            f"{r['shape']:8} {r['m']:>6} {_label(r):50} {r['us']:>9.2f} {r['tflops']:>8.1f} "
            f"{100 * r['frac_compute_ceiling']:>5.1f}% {r['gbps']:>7.0f} "
            f"{r.get('speedup_vs_bf16_matmul', ''):>7} {r.get('speedup_vs_int8_int_mm', ''):>7} "
            f"{r.get('speedup_vs_fp8_scaled_mm', ''):>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
