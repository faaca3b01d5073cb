"""`omniserve bench long-context` end to end on CPU: a row per (system, mode, length) in the JSON,
PNG and table; streaming heads hold a fixed number of streaming pages and less KV memory than
dense at the longer length; bad values rejected before anything is measured."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from omniserve.bench import long_context
from omniserve.bench.throughput import parse_system
from omniserve.cli.main import main
from omniserve.formats.head_pattern import save_head_pattern

# tiny-llama: 2 layers x 2 KV heads, so static sparsity 0.5 streams 2 of 4 KV heads. The windows
# (1 sink + 4 local pages in prefill) are far shorter than the prompts, so streaming saves memory.
WINDOWS = {
    "prefill_sink_tokens": 16,
    "prefill_local_tokens": 64,
    "decode_sink_tokens": 16,
    "decode_local_tokens": 32,
}
ENGINE = {"device": "cpu", "page_size": 16, "cpu_kv_cache_gib": 0.05, **WINDOWS}
TINY = ["--model-config", "tiny-llama"] + [
    arg for name, value in ENGINE.items() for arg in ("--" + name.replace("_", "-"), str(value))
]
LENGTHS = (256, 512)
PRECISIONS = ("w8a8kv8", "w4a8kv4")


class Run:
    def __init__(
        self, argv: list[str], report: dict[str, Any], png: Path, out: str, err: str
    ) -> None:
        self.argv, self.report, self.png, self.out, self.err = argv, report, png, out, err

    def rows(self) -> dict[tuple[str, str, int], dict[str, Any]]:
        return {(r["precision"], r["mode"], r["prompt_len"]): r for r in self.report["results"]}

    def engine(self, precision: str, mode: str) -> dict[str, Any]:
        (info,) = [
            e for e in self.report["engines"] if (e["precision"], e["mode"]) == (precision, mode)
        ]
        return info


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One run of the CLI, shared by the tests that read its report."""
    tmp = tmp_path_factory.mktemp("long-context")
    report, png = tmp / "report.json", tmp / "report.png"
    argv = [
        "bench",
        "long-context",
        *TINY,
        "--precisions",
        *PRECISIONS,
        "--lengths",
        *map(str, LENGTHS),
        "--decode-tokens",
        "4",
        "--output-json",
        str(report),
        "--output-png",
        str(png),
    ]
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        mp.setattr("sys.argv", ["omniserve", *argv])
        assert main(argv) == 0
    return Run(argv, json.loads(report.read_text()), png, out.getvalue(), err.getvalue())


def test_writes_every_row_to_json_png_and_table(cli_run: Run) -> None:
    rows = cli_run.rows()
    assert set(rows) == {(p, m, n) for p in PRECISIONS for m in long_context.MODES for n in LENGTHS}
    assert all(r["ttft_s"] > 0 and r["decode_ms_per_token"] > 0 for r in rows.values())
    assert all(r["dtype"] == "float32" and r["decode_tokens"] == 4 for r in rows.values())
    assert [(e["precision"], e["mode"]) for e in cli_run.report["engines"]] == [
        (p, m) for p in PRECISIONS for m in long_context.MODES
    ]
    setting, environment = cli_run.report["setting"], cli_run.report["environment"]
    assert setting["lengths"] == list(LENGTHS) and setting["static_sparsity"] == 0.5
    assert setting["head_pattern"] is None  # random gates
    assert setting["engine_options"]["max_model_len"] == max(LENGTHS) + 4
    assert environment["device"] == "cpu" and environment["torch"] == torch.__version__
    assert environment["command"] == shlex.join(["omniserve", *cli_run.argv])
    assert cli_run.png.stat().st_size > 1000
    assert "sparse vs dense" in cli_run.out
    assert "random head pattern (seed 0)" in cli_run.out
    # A line per measurement while it runs, then the table.
    progress = re.findall(r"^w\S+ +float32 +(?:dense|sparse) +\d+ ", cli_run.err, re.MULTILINE)
    assert len(progress) == len(rows)
    assert re.search(r"w4a8kv4 +float32 +sparse +512", cli_run.out)


def test_kv_bytes_are_the_pages_held(cli_run: Run) -> None:
    for (precision, mode, _), row in cli_run.rows().items():
        info = cli_run.engine(precision, mode)
        assert row["kv_bytes"] == (
            row["dense_pages_used"] * info["bytes_per_page"]
            + row["stream_pages_used"] * info["bytes_per_stream_page"]
        )


def test_dense_holds_no_streaming_pages(cli_run: Run) -> None:
    for precision in PRECISIONS:
        info = cli_run.engine(precision, "dense")
        assert info["streaming_kv_heads"] == 0 and info["stream_windows"] is None
        assert info["stream_pages_total"] == 0 and info["bytes_per_stream_page"] == 0
        for n in LENGTHS:
            row = cli_run.rows()[(precision, "dense", n)]
            assert row["stream_pages_used"] == 0
            # The prompt's pages, and one more for the decoded tokens (n is a multiple of 16).
            assert row["dense_pages_used"] == n // 16 + 1


def test_sparse_holds_streaming_pages_and_less_kv(cli_run: Run) -> None:
    rows = cli_run.rows()
    for precision in PRECISIONS:
        info = cli_run.engine(precision, "sparse")
        assert (info["streaming_kv_heads"], info["total_kv_heads"]) == (2, 4)
        assert info["stream_windows"] == WINDOWS
        assert info["stream_pages_total"] > 0
        sparse = [rows[(precision, "sparse", n)] for n in LENGTHS]
        dense = [rows[(precision, "dense", n)] for n in LENGTHS]
        # The streaming table is as long as the windows, whatever the prompt's length.
        assert sparse[0]["stream_pages_used"] == sparse[1]["stream_pages_used"] > 0
        assert [s["dense_pages_used"] for s in sparse] == [d["dense_pages_used"] for d in dense]
        assert sparse[1]["kv_bytes"] < dense[1]["kv_bytes"]


def test_sparse_vs_dense(cli_run: Run) -> None:
    rows = cli_run.rows()
    comparisons = cli_run.report["comparisons"]
    assert [(c["precision"], c["prompt_len"]) for c in comparisons] == [
        (p, n) for p in PRECISIONS for n in LENGTHS
    ]
    for c in comparisons:
        dense = rows[(c["precision"], "dense", c["prompt_len"])]
        sparse = rows[(c["precision"], "sparse", c["prompt_len"])]
        assert c["ttft_speedup"] == pytest.approx(dense["ttft_s"] / sparse["ttft_s"])
        assert c["decode_speedup"] == pytest.approx(
            dense["decode_ms_per_token"] / sparse["decode_ms_per_token"]
        )
        assert c["kv_bytes_ratio"] == pytest.approx(sparse["kv_bytes"] / dense["kv_bytes"])
    # The streaming heads' tables do not grow with the prompt, so the saving does.
    for precision in PRECISIONS:
        short, long = (c["kv_bytes_ratio"] for c in comparisons if c["precision"] == precision)
        assert long < short < 1


def test_given_head_pattern(tmp_path: Path) -> None:
    """--attn-pattern's gates choose the streaming heads (the lowest half); the report names the
    directory; progress gets the report after each measurement."""
    pattern = tmp_path / "pattern"
    save_head_pattern(pattern, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), sink_size=16, recent_size=64)
    reports: list[long_context.Report] = []
    final = long_context.run(
        preset="tiny-llama",
        systems=[parse_system("w8a8kv8")],
        lengths=[128, 256],
        decode_tokens=2,
        attn_pattern=str(pattern),
        engine_options=ENGINE,
        command="test",
        progress=reports.append,
    )
    assert [[(r.mode, r.prompt_len) for r in report.results] for report in reports] == [
        [("dense", 128)],
        [("dense", 128), ("dense", 256)],
        [("dense", 128), ("dense", 256), ("sparse", 128)],
        [("dense", 128), ("dense", 256), ("sparse", 128), ("sparse", 256)],
    ]
    assert [[e.mode for e in report.engines] for report in reports[1:3]] == [
        ["dense"],
        ["dense", "sparse"],
    ]
    assert final.results == reports[-1].results
    assert final.setting.head_pattern == str(pattern)
    assert final.engines[1].streaming_kv_heads == 2
    assert f"head pattern {pattern}" in long_context.table(final)


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> None:
        raise AssertionError("an engine was measured before every argument was checked")

    monkeypatch.setattr(long_context, "bench_engine", never)


@pytest.mark.usefixtures("no_measuring")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precisions", "w4a9"], r"--precisions 'w4a9': unknown precision 'w4a9'"),
        (["--lengths", "256", "0"], r"--lengths must be distinct positive token counts"),
        (["--lengths", "-512"], r"--lengths must be distinct positive token counts"),
        (["--lengths", "256", "256"], r"--lengths must be distinct positive token counts"),
        (["--decode-tokens", "1"], r"--decode-tokens must be >= 2"),
        (["--static-sparsity", "0"], r"--static-sparsity must be in \(0, 1\]"),
        (["--static-sparsity", "1.5"], r"--static-sparsity must be in \(0, 1\]"),
        (["--static-sparsity", "0.1"], r"makes none of the model's 4 KV heads stream"),
        (["--max-num-seqs", "2"], r"sets max_num_seqs itself \(max_num_seqs: batch 1\)"),
        (["--precision", "w8a8"], r"--precisions names each system's precision"),
        (["--model", "some/dir"], r"builds its model from --model-config .* drop --model"),
        (["--attn-pattern", "no/such/dir"], r"head pattern no/such/dir: no such directory"),
        # Every engine's options are checked first: int8 KV contradicts the second system.
        (["--kv-cache-dtype", "int8"], r"kv_cache_dtype='int8' contradicts precision w4a8kv4"),
    ],
    ids=[
        "unknown-precision",
        "zero-length",
        "negative-length",
        "repeated-length",
        "one-decode-token",
        "sparsity-0",
        "sparsity-above-1",
        "sparsity-streams-nothing",
        "own-option",
        "precision",
        "model",
        "missing-pattern",
        "kv-dtype",
    ],
)
def test_rejects_bad_arguments_before_measuring(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "long-context", *TINY, "--precisions", *PRECISIONS, "--lengths", "256"]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omniserve bench: error:")
    assert re.search(message, err), err


@pytest.mark.usefixtures("no_measuring")
def test_rejects_a_pattern_of_another_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_head_pattern(tmp_path, torch.rand(3, 2), sink_size=None, recent_size=None)
    assert main(["bench", "long-context", *TINY, "--attn-pattern", str(tmp_path)]) == 2
    assert "3 rows x 2 columns, expected 2 rows x 2 columns" in capsys.readouterr().err
