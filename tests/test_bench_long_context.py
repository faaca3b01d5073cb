"""`omniserve bench long-context` end to end on CPU: a row per (system, mode, batch, length) in the
JSON, PNG and table; streaming heads hold a fixed number of streaming pages and less KV memory
than dense at the longer length; page selection is on in the dynamic modes only; a batch is
timed in lockstep; bad values rejected before anything is measured."""

from __future__ import annotations

import contextlib
import io
import json
import math
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
BATCHES = (1, 2)
PRECISIONS = ("w8a8kv8", "w4a8kv4")
BUDGET = 128
"""The dynamic modes' token budget: 8 pages, fewer than either length holds."""
STEP_TOKENS = 128
"""The step budget: a batch's prompts take several steps, so its first request decodes while the
second still prefills."""
DECODE = 4


class Run:
    def __init__(
        self, argv: list[str], report: dict[str, Any], png: Path, out: str, err: str
    ) -> None:
        self.argv, self.report, self.png, self.out, self.err = argv, report, png, out, err

    def rows(self) -> dict[tuple[str, str, int, int], dict[str, Any]]:
        return {
            (r["precision"], r["mode"], r["batch"], r["prompt_len"]): r
            for r in self.report["results"]
        }

    def engine(self, precision: str, mode: str) -> dict[str, Any]:
        (info,) = [
            e for e in self.report["engines"] if (e["precision"], e["mode"]) == (precision, mode)
        ]
        return info


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One run of the CLI (every mode, two batch sizes), shared by the tests that read its
    report."""
    tmp = tmp_path_factory.mktemp("long-context")
    report, png = tmp / "report.json", tmp / "report.png"
    argv = [
        "bench",
        "long-context",
        *TINY,
        "--max-num-batched-tokens",
        str(STEP_TOKENS),
        "--precisions",
        *PRECISIONS,
        "--lengths",
        *map(str, LENGTHS),
        "--batch",
        *map(str, BATCHES),
        "--decode-tokens",
        str(DECODE),
        "--token-budget",
        str(BUDGET),
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
    assert list(rows) == [
        (p, m, b, n)
        for p in PRECISIONS
        for m in long_context.MODES
        for b in BATCHES
        for n in LENGTHS
    ]
    assert all(r["ttft_s"] > 0 and r["decode_ms_per_token"] > 0 for r in rows.values())
    assert all(r["dtype"] == "float32" and r["decode_tokens"] == DECODE for r in rows.values())
    assert [(e["precision"], e["mode"]) for e in cli_run.report["engines"]] == [
        (p, m) for p in PRECISIONS for m in long_context.MODES
    ]
    setting, environment = cli_run.report["setting"], cli_run.report["environment"]
    assert setting["modes"] == list(long_context.MODES) and setting["batches"] == list(BATCHES)
    assert setting["lengths"] == list(LENGTHS) and setting["static_sparsity"] == 0.5
    assert setting["token_budget"] == BUDGET and setting["page_selection"] == "kv_head"
    assert setting["selector_interval"] == 4
    assert setting["head_pattern"] is None  # random gates
    options = setting["engine_options"]
    assert options["max_num_seqs"] == max(BATCHES)
    # The longest prompt, its decode, and what the first request of a batch of 2 may decode
    # while the second prefills: a step per 128 - 2 of its tokens, and one for its last chunk.
    assert options["max_model_len"] == 512 + DECODE + math.ceil(512 / (STEP_TOKENS - 2)) + 1
    assert environment["device"] == "cpu" and environment["torch"] == torch.__version__
    assert environment["command"] == shlex.join(["omniserve", *cli_run.argv])
    assert cli_run.report["skipped"] == []
    assert cli_run.png.stat().st_size > 1000
    assert "\nvs dense\n" in cli_run.out
    assert "static: sparsity 0.5, random head pattern (seed 0)" in cli_run.out
    assert "dynamic: token budget 128, per kv_head, every 4 steps" in cli_run.out
    # A line per measurement while it runs, then the table.
    modes = "|".join(map(re.escape, long_context.MODES))
    progress = re.findall(rf"^w\S+ +float32 +(?:{modes}) +\d+ +\d+ ", cli_run.err, re.MULTILINE)
    assert len(progress) == len(rows)
    assert re.search(r"w4a8kv4 +float32 +dynamic\+static +2 +512 ", cli_run.out)


def test_kv_bytes_are_the_pages_held(cli_run: Run) -> None:
    for (precision, mode, _, _), row in cli_run.rows().items():
        info = cli_run.engine(precision, mode)
        assert row["kv_bytes"] == (
            row["dense_pages_used"] * info["bytes_per_page"]
            + row["stream_pages_used"] * info["bytes_per_stream_page"]
        )


def test_dense_holds_every_page_of_the_batch(cli_run: Run) -> None:
    for precision in PRECISIONS:
        info = cli_run.engine(precision, "dense")
        assert info["streaming_kv_heads"] == 0 and info["stream_windows"] is None
        assert info["stream_pages_total"] == 0 and info["bytes_per_stream_page"] == 0
        assert info["selection"] is None
        for n in LENGTHS:
            one = cli_run.rows()[(precision, "dense", 1, n)]
            assert one["stream_pages_used"] == 0
            # The prompt's pages, and one more for the decoded tokens (n is a multiple of 16).
            assert one["dense_pages_used"] == n // 16 + 1
            # Two such requests; the first may have decoded a few more tokens meanwhile.
            two = cli_run.rows()[(precision, "dense", 2, n)]
            assert 2 * (n // 16 + 1) <= two["dense_pages_used"] <= 2 * (n // 16 + 2)


def test_static_modes_hold_streaming_pages_and_less_kv(cli_run: Run) -> None:
    rows = cli_run.rows()
    for precision in PRECISIONS:
        for mode in long_context.STATIC_MODES:
            info = cli_run.engine(precision, mode)
            assert (info["streaming_kv_heads"], info["total_kv_heads"]) == (2, 4)
            assert info["stream_windows"] == WINDOWS
            assert info["stream_pages_total"] > 0
            for batch in BATCHES:
                sparse = [rows[(precision, mode, batch, n)] for n in LENGTHS]
                dense = [rows[(precision, "dense", batch, n)] for n in LENGTHS]
                # The streaming table is as long as the windows, whatever the prompt's length.
                assert sparse[0]["stream_pages_used"] == sparse[1]["stream_pages_used"] > 0
                assert [s["dense_pages_used"] for s in sparse] == [
                    d["dense_pages_used"] for d in dense
                ]
            one, two = (rows[(precision, mode, b, 512)]["stream_pages_used"] for b in BATCHES)
            assert two == 2 * one
        static = [rows[(precision, "static", 1, n)] for n in LENGTHS]
        assert static[1]["kv_bytes"] < rows[(precision, "dense", 1, 512)]["kv_bytes"]


def test_dynamic_modes_select_pages(cli_run: Run) -> None:
    """Page selection as served: the budget in whole pages; the pages are all still held, each
    with its key statistics."""
    rows = cli_run.rows()
    for precision in PRECISIONS:
        dense = cli_run.engine(precision, "dense")
        for mode in long_context.MODES:
            info = cli_run.engine(precision, mode)
            if mode not in long_context.DYNAMIC_MODES:
                assert info["selection"] is None
                continue
            assert info["selection"] == {
                "budget_tokens": BUDGET,
                "budget_pages": BUDGET // 16,
                "page_selection": "kv_head",
                "selector_interval": 4,
                "logical_page_tokens": 4,
            }
            assert (info["stream_windows"] is None) == (mode == "dynamic")
            assert info["bytes_per_page"] > (dense["bytes_per_page"] if mode == "dynamic" else 0)
            for batch in BATCHES:
                for n in LENGTHS:
                    assert (
                        rows[(precision, mode, batch, n)]["dense_pages_used"]
                        == rows[(precision, "dense", batch, n)]["dense_pages_used"]
                    )


def test_modes_vs_dense(cli_run: Run) -> None:
    rows = cli_run.rows()
    comparisons = cli_run.report["comparisons"]
    assert [(c["precision"], c["mode"], c["batch"], c["prompt_len"]) for c in comparisons] == [
        (p, m, b, n)
        for p in PRECISIONS
        for m in long_context.MODES[1:]
        for b in BATCHES
        for n in LENGTHS
    ]
    for c in comparisons:
        dense = rows[(c["precision"], "dense", c["batch"], c["prompt_len"])]
        mode = rows[(c["precision"], c["mode"], c["batch"], c["prompt_len"])]
        assert c["ttft_speedup"] == pytest.approx(dense["ttft_s"] / mode["ttft_s"])
        assert c["decode_speedup"] == pytest.approx(
            dense["decode_ms_per_token"] / mode["decode_ms_per_token"]
        )
        assert c["kv_bytes_ratio"] == pytest.approx(mode["kv_bytes"] / dense["kv_bytes"])
    # The streaming heads' tables do not grow with the prompt, so the saving does.
    for precision in PRECISIONS:
        short, long = (
            c["kv_bytes_ratio"]
            for c in comparisons
            if (c["precision"], c["mode"], c["batch"]) == (precision, "static", 1)
        )
        assert long < short < 1


def test_given_head_pattern(tmp_path: Path) -> None:
    """--attn-pattern's gates choose the streaming heads (the lowest half); the report names the
    directory; progress gets the report after each measurement; --modes picks the engines."""
    pattern = tmp_path / "pattern"
    save_head_pattern(pattern, torch.tensor([[0.9, 0.1], [0.2, 0.8]]), sink_size=16, recent_size=64)
    reports: list[long_context.Report] = []
    final = long_context.run(
        preset="tiny-llama",
        systems=[parse_system("w8a8kv8")],
        modes=["dense", "static"],
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
        [("dense", 128), ("dense", 256), ("static", 128)],
        [("dense", 128), ("dense", 256), ("static", 128), ("static", 256)],
    ]
    assert [[e.mode for e in report.engines] for report in reports[1:3]] == [
        ["dense"],
        ["dense", "static"],
    ]
    assert final.results == reports[-1].results
    assert final.setting.head_pattern == str(pattern)
    assert final.engines[1].streaming_kv_heads == 2
    assert [c.mode for c in final.comparisons] == ["static", "static"]
    text = long_context.table(final)
    assert f"head pattern {pattern}" in text and "dynamic:" not in text


def test_skips_a_batch_the_cache_cannot_hold() -> None:
    """A (batch, length) that would need more pages than the scheduler admits into is reported as
    skipped, and the rest is measured."""
    final = long_context.run(
        preset="tiny-llama",
        systems=[parse_system("w8a8kv8")],
        modes=["dense"],
        batches=[1, 4],
        lengths=[128, 256],
        decode_tokens=2,
        engine_options={**ENGINE, "num_kv_pages": 40},
        command="test",
    )
    assert [(r.batch, r.prompt_len) for r in final.results] == [(1, 128), (1, 256), (4, 128)]
    (skipped,) = final.skipped
    # 4 x ceil((256 + 2 + 4 tokens the first ones may decode meanwhile) / 16) pages, of the 40
    # less the null page and the 1% admission watermark.
    assert (skipped.batch, skipped.prompt_len) == (4, 256)
    assert (skipped.pages_needed, skipped.pages_usable) == (68, 38)
    assert "needs 68 pages of 38" in long_context.table(final)


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
        (["--batch", "1", "0"], r"--batch must be distinct positive batch sizes"),
        (["--batch", "2", "2"], r"--batch must be distinct positive batch sizes"),
        (["--modes", "dense", "dense"], r"--modes must be distinct modes of dense, static"),
        (["--decode-tokens", "1"], r"--decode-tokens must be >= 2"),
        (["--static-sparsity", "0"], r"--static-sparsity must be in \(0, 1\]"),
        (["--static-sparsity", "1.5"], r"--static-sparsity must be in \(0, 1\]"),
        (["--static-sparsity", "0.1"], r"makes none of the model's 4 KV heads stream"),
        (["--token-budget", "16"], r"token_budget must cover at least two pages of 16 tokens"),
        (["--token-budget", "250"], r"--token-budget 250 \(256 tokens in pages of 16\) covers"),
        (["--selector-interval", "0"], r"selector_interval must be >= 1"),
        (["--max-num-seqs", "2"], r"sets max_num_seqs itself \(max_num_seqs: the largest --batch"),
        (["--sparse-decode"], r"sets sparse_decode itself \(sparse_decode: per mode\)"),
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
        "zero-batch",
        "repeated-batch",
        "repeated-mode",
        "one-decode-token",
        "sparsity-0",
        "sparsity-above-1",
        "sparsity-streams-nothing",
        "budget-below-two-pages",
        "budget-covers-every-length",
        "selector-interval-0",
        "own-option",
        "own-flag",
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
    assert main([*argv, "--token-budget", str(BUDGET), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omniserve bench: error:")
    assert re.search(message, err), err


@pytest.mark.usefixtures("no_measuring")
def test_a_static_sparsity_that_streams_nothing_is_fine_without_static_modes() -> None:
    """--static-sparsity only matters to the static modes."""
    argv = ["bench", "long-context", *TINY, "--lengths", "256", "--token-budget", str(BUDGET)]
    with pytest.raises(AssertionError, match="an engine was measured"):
        main([*argv, "--modes", "dense", "dynamic", "--static-sparsity", "0.1"])


@pytest.mark.usefixtures("no_measuring")
def test_rejects_a_pattern_of_another_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_head_pattern(tmp_path, torch.rand(3, 2), sink_size=None, recent_size=None)
    assert main(["bench", "long-context", *TINY, "--attn-pattern", str(tmp_path)]) == 2
    assert "3 rows x 2 columns, expected 2 rows x 2 columns" in capsys.readouterr().err
