"""One command for every kernel benchmark: `python benches/kernel_sweeps.py [--ops attention,gemm]
[--json OUT]` runs each named sweep (omniserve.bench.kernels_<op>) with its default arguments,
prints one table per op and writes all rows, tagged with their sweep, to one JSON file.
`python benches/kernel_sweeps.py --from-json FILE` prints the tables of a saved file (this command's,
or a sweep's own `--json` output) without running anything."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SWEEPS = {"attention": "omniserve.bench.kernels_attention", "gemm": "omniserve.bench.kernels_gemm"}

Row = dict[str, Any]

GEMM_OURS = {"w4a8_per_channel": "W4A8", "w4a8_g128": "W4A8-g128", "w8a8": "W8A8"}
GEMM_PEERS = {"bf16_matmul": "bf16", "int8_int_mm": "int8", "fp8_scaled_mm": "fp8"}
GEMM_SPEEDUPS = {  # (our op, peer): column
    ("w4a8_per_channel", "bf16_matmul"): "W4A8 vs bf16",
    ("w4a8_per_channel", "int8_int_mm"): "W4A8 vs int8",
    ("w4a8_g128", "bf16_matmul"): "g128 vs bf16",
    ("w4a8_g128", "int8_int_mm"): "g128 vs int8",
    ("w4a8_per_channel", "fp8_scaled_mm"): "W4A8 vs fp8",
    ("w4a8_g128", "fp8_scaled_mm"): "g128 vs fp8",
}
ATTENTION_VARIANTS = {
    "torch_sdpa_fp16_dense": "SDPA fp16",
    "ours_fp16": "ours fp16",
    "ours_kv8": "ours KV8",
    "ours_kv4": "ours KV4",
    "ours_kv8static": "ours KV8 static",
}
FUSED_OPS = ("quantize_per_token", "rmsnorm_quant", "add_rmsnorm_quant", "silu_mul_quant")


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a saved benchmark: a list of rows (this command's file, the attention sweep's) or
    {"device": ..., "rows": [...]} (the GEMM sweep's)."""
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected a list of rows or an object with a 'rows' list")
    return rows


def _kind(row: Row) -> str:
    if row.get("op") in GEMM_OURS or row.get("op") in GEMM_PEERS:
        return "gemm"
    if row.get("op") == "decode_attention":
        return "attention"
    if row.get("op") in FUSED_OPS:
        return "fused"
    raise ValueError(f"a row of no known benchmark: {json.dumps(row)[:200]}")


def _format(
    title: str, header: Sequence[str], body: Sequence[Sequence[str]], notes: Sequence[str]
) -> str:
    """A right-aligned text table. Columns are at least two spaces apart and cells hold at most
    single spaces, so a column stays one column for a reader (and a parser splitting on two)."""
    widths = [max(len(header[i]), *(len(line[i]) for line in body)) for i in range(len(header))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines + [f"  {note}" for note in notes])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cell(row: Row | None, fraction: Callable[[Row], float], notes: list[str], where: str) -> str:
    """ "µs  %" of one measurement; a skipped or failed one says so, and why in a note."""
    if row is None:
        return "-"
    for key in ("error", "skipped"):
        if key in row:
            notes.append(f"{where}: {key}: {row[key]}")
            return key
    padded = "*" if row.get("m_run", row.get("m")) != row.get("m") else ""
    return f"{row['us']:.2f}{padded} {100 * fraction(row):.0f}%"


def _roofline_fraction(row: Row) -> float:
    # Time at the binding ceiling (compute or bandwidth) over the measured time.
    return max(row["frac_compute_ceiling"], row["frac_bandwidth_ceiling"])


def _copy_fraction(row: Row) -> float:
    return row["frac_of_copy_ceiling"]


def gemm_tables(rows: Sequence[Row]) -> list[str]:
    """Per (shape, our kernels' path): rows M; each system's µs and fraction of its roofline;
    the W4A8 kernels' speedups over cuBLAS bf16, int8 and fp8."""
    from omniserve.bench.kernels_gemm import CEILING_BYTES_PER_S, CEILING_TFLOPS

    names = {**GEMM_OURS, **GEMM_PEERS}
    ops = [op for op in names if any(r["op"] == op for r in rows)]
    speedups = [(ours, peer) for ours, peer in GEMM_SPEEDUPS if ours in ops]
    paths = list(dict.fromkeys(r["path"] for r in rows if r["op"] in GEMM_OURS)) or [""]
    ceilings = "/".join(f"{v:.0f}" for v in CEILING_TFLOPS.values())
    legend = (
        "GEMM cells: µs, then % of the roofline: the time at the compute ceiling\n"
        f"({'/'.join(CEILING_TFLOPS)} {ceilings} TFLOP/s) or at {CEILING_BYTES_PER_S / 1e12:.1f} "
        "TB/s, whichever binds, over the measured time.\n"
        "bf16, int8, fp8: cuBLAS through torch (matmul, _int_mm, _scaled_mm).\n"
        "X vs Y: speedup of X over Y (Y's time / X's time); g128: W4A8-g128."
    )
    tables = [legend]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for path in paths:
            at = {
                (r["op"], r["m"]): r
                for r in rows
                if r["shape"] == shape and r.get("path", "") in ("", path)
            }
            ms = sorted({m for op, m in at if op in GEMM_OURS} or {m for _, m in at})
            if not ms:
                continue
            any_row = next(iter(at.values()))
            notes: list[str] = []
            body = []
            for m in ms:
                line = [str(m)]
                line += [
                    _cell(at.get((op, m)), _roofline_fraction, notes, f"{names[op]} at M={m}")
                    for op in ops
                ]
                line += [
                    _ratio(at.get((ours, m), {}).get(f"speedup_vs_{peer}"))
                    for ours, peer in speedups
                ]
                body.append(line)
            if any("*" in cell for line in body for cell in line):
                notes.append("*: the peer ran at a larger M it accepts (m_run in the JSON)")
            title = f"GEMM {shape}: N={any_row['n']}, K={any_row['k']}"
            if path:
                title += f", our kernels' path {path}"
            header = ["M", *(names[op] for op in ops), *(GEMM_SPEEDUPS[s] for s in speedups)]
            tables.append(_format(title, header, body, notes))
    return tables


def attention_table(rows: Sequence[Row]) -> str:
    """Rows batch x context: SDPA's and our kernel's µs and fraction of the copy rate, and the
    KV4 kernel's speedup over SDPA."""
    from omniserve.bench.kernels_attention import (
        COPY_CEILING_GBPS,
        HEAD_DIM,
        HEADS,
        KV_HEADS,
    )

    at = {(r["batch"], r["context"], r["variant"]): r for r in rows}
    notes: list[str] = []
    body = []
    for batch, context in sorted({(b, c) for b, c, _ in at}):
        line = [str(batch), str(context)]
        line += [
            _cell(
                at.get((batch, context, variant)),
                _copy_fraction,
                notes,
                f"{name} at batch {batch}, context {context}",
            )
            for variant, name in ATTENTION_VARIANTS.items()
        ]
        line.append(_ratio(at.get((batch, context, "ours_kv4"), {}).get("speedup_vs_sdpa")))
        body.append(line)
    title = (
        f"Decode attention, {HEADS} query and {KV_HEADS} KV heads of {HEAD_DIM}; cells: µs, "
        f"then % of {COPY_CEILING_GBPS / 1000:.1f} TB/s for the bytes moved"
    )
    header = ["batch", "context", *ATTENTION_VARIANTS.values(), "KV4 vs SDPA"]
    return _format(title, header, body, notes)


def fused_tables(rows: Sequence[Row]) -> list[str]:
    """Per fused op: rows tokens x hidden; our kernel's µs and fraction of the copy rate, the
    torch reference's µs, the speedup; and, for an op that replaced an unfused path of the
    engine (e.g. torch's add, then our RMSNorm + quant), that path's µs and the speedup."""
    from omniserve.bench.kernels_attention import COPY_CEILING_GBPS

    tables = []
    for op in FUSED_OPS:
        mine = sorted((r for r in rows if r["op"] == op), key=lambda r: (r["hidden"], r["tokens"]))
        if not mine:
            continue
        unfused = any("unfused_us" in r for r in mine)
        notes: list[str] = []
        body = []
        for r in mine:
            line = [
                str(r["tokens"]),
                str(r["hidden"]),
                _cell(r, _copy_fraction, notes, op),
                f"{r['torch_reference_us']:.2f}",
                _ratio(r["speedup_vs_torch"]),
            ]
            if unfused:
                line += [_us(r.get("unfused_us")), _ratio(r.get("speedup_vs_unfused"))]
            body.append(line)
        if unfused:
            notes.append("unfused: the engine's path before this fusion, timed in the same run")
        title = f"{op}; ours: µs, then % of {COPY_CEILING_GBPS / 1000:.1f} TB/s for the bytes moved"
        header = ["tokens", "hidden", "ours", "torch µs", "vs torch"]
        header += ["unfused µs", "vs unfused"] if unfused else []
        tables.append(_format(title, header, body, notes))
    return tables


def tables(rows: Sequence[Row]) -> list[str]:
    """Every table the rows fill: GEMM, decode attention, fused activation quantization."""
    by_kind: dict[str, list[Row]] = {"gemm": [], "attention": [], "fused": []}
    for row in rows:
        by_kind[_kind(row)].append(row)
    out = gemm_tables(by_kind["gemm"]) if by_kind["gemm"] else []
    if by_kind["attention"]:
        out.append(attention_table(by_kind["attention"]))
    return out + fused_tables(by_kind["fused"])


def _run_sweeps(ops: Sequence[str]) -> list[Row]:
    rows = []
    for op in ops:
        try:
            module = importlib.import_module(SWEEPS[op])
        except ModuleNotFoundError as exc:
            if exc.name != SWEEPS[op]:
                raise
            print(f"skipping {op}: {SWEEPS[op]} is not present", file=sys.stderr)
            continue
        sweep_parser = argparse.ArgumentParser(allow_abbrev=False)
        module.add_arguments(sweep_parser)
        for row in module.run(sweep_parser.parse_args([])):
            rows.append({"sweep": op, **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress; tables at the end
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--ops", default=",".join(SWEEPS), help=f"comma-separated, of {list(SWEEPS)}"
    )
    parser.add_argument("--json", help="write all rows to this file")
    parser.add_argument(
        "--from-json", metavar="FILE", help="print the tables of a saved JSON file; run nothing"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        if args.json:
            parser.error("--from-json only prints tables; it takes no --json")
        try:
            rows = load_rows(args.from_json)
            printed = tables(rows)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--from-json {args.from_json}: {type(exc).__name__}: {exc}")
    else:
        ops = args.ops.split(",")
        unknown = [op for op in ops if op not in SWEEPS]
        if unknown:
            parser.error(f"unknown --ops {unknown}; choose from {list(SWEEPS)}")
        rows = _run_sweeps(ops)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        printed = tables(rows)
    print("\n\n".join(printed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
