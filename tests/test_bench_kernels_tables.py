"""benches/kernel_sweeps.py's tables, printed from the H100 results checked in under benches/results
(`--from-json`, no GPU): every measured row lands in its table's row and column, as µs and the
fraction of its ceiling, next to the speedups the sweeps computed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "kernel_sweeps.py"
GEMM_FILES = ["h100-kernels-gemm.json"]
ATTENTION_FILE = ROOT / "benches" / "results" / "h100-kernels-attention.json"
FUSED_OPS = ("quantize_per_token", "rmsnorm_quant", "add_rmsnorm_quant", "silu_mul_quant")
UNFUSED_NOTE = "unfused: the engine's path before this fusion, timed in the same run"
GEMM_COLUMNS = {
    "w4a8_per_channel": "W4A8",
    "w4a8_g128": "W4A8-g128",
    "w8a8": "W8A8",
    "bf16_matmul": "bf16",
    "int8_int_mm": "int8",
    "fp8_scaled_mm": "fp8",
}
DECODE_COLUMNS = {
    "torch_sdpa_fp16_dense": "SDPA fp16",
    "ours_fp16": "ours fp16",
    "ours_kv8": "ours KV8",
    "ours_kv4": "ours KV4",
    "ours_kv8static": "ours KV8 static",
}


bench = load_bench_script("kernel_sweeps")


def _rows(name: str) -> list[dict[str, Any]]:
    data = json.loads((ROOT / "benches" / "results" / name).read_text())
    return data["rows"] if isinstance(data, dict) else data


class Table(NamedTuple):
    rows: list[dict[str, str]]
    """{column: cell} per line; columns are two or more spaces apart."""
    notes: list[str]


def _tables(text: str) -> dict[str, Table]:
    """The printout's tables by title (legends aside)."""
    tables = {}
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if len(lines) < 3 or set(lines[2]) != {"-", " "}:
            continue  # a legend
        header = re.split(r"\s{2,}", lines[1].strip())
        body = [re.split(r"\s{2,}", line.strip()) for line in lines[3:]]
        data = [cells for cells in body if cells[0].isdigit()]
        assert all(len(cells) == len(header) for cells in data), lines[0]
        notes = [" ".join(cells) for cells in body if not cells[0].isdigit()]
        tables[lines[0]] = Table([dict(zip(header, cells)) for cells in data], notes)
    return tables


def _titled(tables: dict[str, Table], prefix: str) -> Table:
    return next(table for title, table in tables.items() if title.startswith(prefix))


def _print_tables(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Table]:
    assert bench.main(["--from-json", str(path)]) == 0
    return _tables(capsys.readouterr().out)


def _cell(row: dict[str, Any], fraction: float) -> str:
    padded = "*" if row.get("m_run", row.get("m")) != row.get("m") else ""
    return f"{row['us']:.2f}{padded} {100 * fraction:.0f}%"


def _gemm_title(row: dict[str, Any], path: str) -> str:
    return f"GEMM {row['shape']}: N={row['n']}, K={row['k']}, our kernels' path {path}"


def _line(table: Table, **key: object) -> dict[str, str]:
    """The table's line whose cells in `key`'s columns read `key`'s values."""
    return next(x for x in table.rows if all(x[k] == str(v) for k, v in key.items()))


@pytest.mark.parametrize("name", GEMM_FILES)
def test_gemm_tables_hold_every_row(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(name)
    tables = _print_tables(capsys, ROOT / "benches" / "results" / name)
    ours = [r for r in rows if r.get("path")]
    paths = {r["path"] for r in ours}
    shapes = {r["shape"] for r in rows}
    assert len(tables) == len(paths) * len(shapes)
    for row in ours:  # each (shape, path) table has a line per M its kernels ran
        ms = [x["M"] for x in tables[_gemm_title(row, row["path"])].rows]
        assert ms == sorted(ms, key=int) and ms.count(str(row["m"])) == 1
    for row in rows:
        fraction = max(row["frac_compute_ceiling"], row["frac_bandwidth_ceiling"])
        for path in [row["path"]] if row.get("path") else paths:
            table = tables[_gemm_title(row, path)]
            if path == "small_m" and row["m"] > 64:  # a peer at an M the small-M kernel skips
                assert str(row["m"]) not in [x["M"] for x in table.rows]
                continue
            assert _line(table, M=row["m"])[GEMM_COLUMNS[row["op"]]] == _cell(row, fraction)
            if row["m_run"] != row["m"]:  # a peer padded to an M it accepts
                assert any("m_run" in note for note in table.notes)
        if row["op"] in ("w4a8_per_channel", "w4a8_g128"):
            prefix = "W4A8" if row["op"] == "w4a8_per_channel" else "g128"
            line = _line(tables[_gemm_title(row, row["path"])], M=row["m"])
            assert line[f"{prefix} vs bf16"] == f"{row['speedup_vs_bf16_matmul']:.2f}x"
            assert line[f"{prefix} vs int8"] == f"{row['speedup_vs_int8_int_mm']:.2f}x"


def test_attention_and_fused_tables_hold_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(ATTENTION_FILE.name)
    tables = _print_tables(capsys, ATTENTION_FILE)
    decode = _titled(tables, "Decode attention")
    points = {(r["batch"], r["context"]) for r in rows if r["op"] == "decode_attention"}
    assert [(int(x["batch"]), int(x["context"])) for x in decode.rows] == sorted(points)
    for row in rows:
        if row["op"] == "decode_attention" and row["variant"] in DECODE_COLUMNS:
            line = _line(decode, batch=row["batch"], context=row["context"])
            column = DECODE_COLUMNS[row["variant"]]
            if "skipped" in row:  # a withheld measurement shows as such, its reason in a note
                assert line[column] == "skipped"
                assert any(row["skipped"] in note for note in decode.notes)
                continue
            assert line[column] == _cell(row, row["frac_of_copy_ceiling"])
            if row["variant"] == "ours_kv4":
                speedup = row["speedup_vs_sdpa"]
                assert line["KV4 vs SDPA"] == ("-" if speedup is None else f"{speedup:.2f}x")
        elif row["op"] in FUSED_OPS:
            _assert_fused_line(tables, row)


def _assert_fused_line(tables: dict[str, Table], row: dict[str, Any]) -> None:
    table = _titled(tables, f"{row['op']};")
    line = _line(table, tokens=row["tokens"], hidden=row["hidden"])
    assert line["ours"] == _cell(row, row["frac_of_copy_ceiling"])
    assert line["torch µs"] == f"{row['torch_reference_us']:.2f}"
    assert line["vs torch"] == f"{row['speedup_vs_torch']:.2f}x"
    if "unfused_us" in row:
        assert line["unfused µs"] == f"{row['unfused_us']:.2f}"
        assert line["vs unfused"] == f"{row['speedup_vs_unfused']:.2f}x"
        assert UNFUSED_NOTE in table.notes
    else:
        assert "unfused µs" not in line and UNFUSED_NOTE not in table.notes


def test_fused_op_with_an_unfused_peer_gets_its_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """add_rmsnorm_quant's rows also time the engine's unfused path (torch's add, then our
    rmsnorm_quant): two more columns in its table, none in the other ops'. No H100 file holds
    such rows yet, so these are the rmsnorm_quant rows renamed, with made-up peer times."""
    rows = [r for r in _rows(ATTENTION_FILE.name) if r["op"] in FUSED_OPS]
    added = [
        {**r, "op": "add_rmsnorm_quant", "unfused_us": 1.7 * r["us"], "speedup_vs_unfused": 1.7}
        for r in rows
        if r["op"] == "rmsnorm_quant"
    ]
    path = tmp_path / "fused.json"
    path.write_text(json.dumps(rows + added))
    tables = _print_tables(capsys, path)
    assert len(_titled(tables, "add_rmsnorm_quant;").rows) == len(added) > 0
    for row in rows + added:
        _assert_fused_line(tables, row)


def test_the_commands_own_file_with_skipped_and_failed_rows(tmp_path: Path) -> None:
    """The file `--json` writes (every sweep's rows, tagged) prints GEMM tables, then attention;
    a skipped or failed measurement shows as such, and a note says why."""
    gemm = [{"sweep": "gemm", **r} for r in _rows("h100-kernels-gemm.json")]
    attention = [{"sweep": "attention", **r} for r in _rows(ATTENTION_FILE.name)]
    failed = next(r for r in gemm if (r["op"], r["shape"], r["m"]) == ("int8_int_mm", "o", 4096))
    for key in [k for k in failed if k not in ("sweep", "op", "shape", "m", "n", "k")]:
        del failed[key]
    failed["error"] = "RuntimeError: no int8 kernel"
    point = ("ours_kv8", 64, 4096)
    skipped = next(
        r for r in attention if (r.get("variant"), r.get("batch"), r.get("context")) == point
    )
    for key in ("us", "bytes", "gbps", "frac_of_copy_ceiling", "speedup_vs_sdpa"):
        del skipped[key]
    skipped["skipped"] = "needs 9.0 GiB, 1.0 free"
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(gemm + attention))
    # As a user runs it: a process of its own, here on a machine without a GPU.
    text = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert text.index("GEMM qkv") < text.index("Decode attention") < text.index("rmsnorm_quant;")
    tables = _tables(text)
    o_table = tables[_gemm_title(failed, "auto")]
    assert _line(o_table, M=4096)["int8"] == "error"
    assert "int8 at M=4096: error: RuntimeError: no int8 kernel" in o_table.notes
    decode = _titled(tables, "Decode attention")
    assert _line(decode, batch=64, context=4096)["ours KV8"] == "skipped"
    assert "ours KV8 at batch 64, context 4096: skipped: needs 9.0 GiB, 1.0 free" in decode.notes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"device": "H100"}', "expected a list of rows or an object with a 'rows' list"),
        ('[{"op": "conv2d", "us": 1.0}]', "a row of no known benchmark"),
        ('[{"op": "w8a8", "shape": "o", "m": 1}]', "KeyError"),
    ],
    ids=["no-rows", "unknown-op", "missing-field"],
)
def test_bad_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--from-json", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--from-json {path}" in err and message in err
