"""`omniserve bench throughput` end to end on CPU: one row per system and batch in the JSON, PNG
and table; several precisions in one run with HF transformers measured once; bad values rejected
before anything is measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from omniserve.bench import step_breakdown, throughput
from omniserve.cli.main import main
from omniserve.outputs import RequestOutput
from tiny_models import save_checkpoint

TINY = [
    "--model-config",
    "tiny-llama",
    "--device",
    "cpu",
    "--page-size",
    "16",
    "--num-kv-pages",
    "16",
    "--max-model-len",
    "64",
]


def test_bench_throughput_writes_json_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(
        [
            "bench",
            "throughput",
            *TINY,
            "--batch",
            "2",
            "3",
            "--input-len",
            "16",
            "--output-len",
            "6",
            "--output-json",
            str(report),
            "--output-png",
            str(png),
        ]
    )
    assert code == 0
    data = json.loads(report.read_text())
    rows = {(r["system"], r["precision"], r["batch"]): r for r in data["results"]}
    assert set(rows) == {
        ("omniserve", "w16a16", 2),
        ("omniserve", "w16a16", 3),
        ("hf-transformers", "w16a16", 2),
        ("hf-transformers", "w16a16", 3),
    }
    assert all(r["tokens_per_s"] > 0 and r["dtype"] == "float32" for r in rows.values())
    for b in (2, 3):
        mine, peer = rows[("omniserve", "w16a16", b)], rows[("hf-transformers", "w16a16", b)]
        assert mine["speedup_vs_hf"] == pytest.approx(mine["tokens_per_s"] / peer["tokens_per_s"])
        assert peer["speedup_vs_hf"] is None
    assert png.stat().st_size > 1000
    assert "omniserve w16a16" in capsys.readouterr().out


def test_bench_throughput_samples_on_both_sides_when_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--temperature above 0: every system and the HF peer sample (temperature and top-p, no
    other filter), for the host cost of sampled traffic; a bad value fails before anything is
    built."""
    sampled = throughput.Decoding(temperature=0.8, top_p=0.9)
    params = sampled.params(6)
    assert (params.temperature, params.top_p, params.top_k) == (0.8, 0.9, 0)
    assert sampled.hf_options() == {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0}
    assert throughput.GREEDY.hf_options() == {"do_sample": False}
    report = tmp_path / "bench.json"
    args = ["--batch", "2", "--input-len", "8", "--output-len", "5", "--output-json", str(report)]
    assert (
        main(["bench", "throughput", *TINY, *args, "--temperature", "0.8", "--top-p", "0.9"]) == 0
    )
    data = json.loads(report.read_text())
    assert data["setting"]["decoding"] == {"temperature": 0.8, "top_p": 0.9}
    assert {r["system"] for r in data["results"]} == {"omniserve", "hf-transformers"}
    assert all(r["tokens_per_s"] > 0 for r in data["results"])
    assert main(["bench", "throughput", *TINY, *args, "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_bench_throughput_several_precisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Quantized systems in the engine's dtype (float32 on CPU), `bf16` in bfloat16, and the HF
    peer once, in the dtype of the w16 system."""
    report = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "throughput",
            *TINY,
            "--batch",
            "2",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--precisions",
            "w4a8kv4",
            "w4a8kv4:g128",
            "w8a8kv8",
            "bf16",
            "--output-json",
            str(report),
        ]
    )
    assert code == 0
    data = json.loads(report.read_text())
    rows = [(r["system"], r["precision"], r["group_size"], r["dtype"]) for r in data["results"]]
    assert rows == [
        ("omniserve", "w4a8kv4", -1, "float32"),
        ("omniserve", "w4a8kv4", 128, "float32"),
        ("omniserve", "w8a8kv8", -1, "float32"),
        ("omniserve", "w16a16", -1, "bfloat16"),
        ("hf-transformers", "w16a16", -1, "bfloat16"),
    ]
    assert all(r["tokens_per_s"] > 0 and r["error"] is None for r in data["results"])
    assert all(r["speedup_vs_hf"] > 0 for r in data["results"][:4])
    engines = [(e["precision"], e["group_size"], e["dtype"]) for e in data["engines"]]
    assert engines == [row[1:] for row in rows[:4]]
    assert all(e["weights"] > 0 and e["preemptions"] == 0 for e in data["engines"])
    assert [s["precision"] for s in data["setting"]["systems"]] == [
        "w4a8kv4",
        "w4a8kv4",
        "w8a8kv8",
        "w16a16",
    ]
    out = capsys.readouterr().out
    assert "omniserve w4a8kv4 g128" in out and "hf-transformers w16a16" in out


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ["w4a9"],
            r"--precisions 'w4a9': unknown precision 'w4a9'; valid choices: w4a8kv4, .*, or bf16",
        ),
        (["bf16", "w8a8kv8:g128"], r"'w8a8kv8:g128': group_size 128 is only valid for W4A8"),
        (["w4a8kv4:g64"], r"'w4a8kv4:g64': group_size 64 is not supported"),
        (["w4a8kv4:128"], r"'w4a8kv4:128': expected PRECISION or PRECISION:gGROUP"),
        (["bf16:g128"], r"'bf16:g128': group_size 128 is only valid for W4A8"),
    ],
    ids=["unknown", "w8a8-g128", "g64", "syntax", "bf16-g128"],
)
def test_bench_throughput_rejects_bad_precisions(
    values: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "throughput", *TINY, "--precisions", *values]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omniserve bench: error:")
    assert re.search(message, err), err


def test_bench_throughput_checks_every_system_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("a system was measured before all were checked")

    monkeypatch.setattr(throughput, "bench_omniserve", never)
    assert (
        main(["bench", "throughput", *TINY, "--precisions", "w4a8kv4", "--precision", "w8a8"]) == 2
    )
    assert "--precisions names each system's precision and group size" in capsys.readouterr().err
    # The KV cache dtype applies to every system and contradicts the second one.
    args = ["--precisions", "w8a8kv8", "w4a8kv4", "--kv-cache-dtype", "int8"]
    assert main(["bench", "throughput", *TINY, *args]) == 2
    assert "kv_cache_dtype='int8' contradicts precision w4a8kv4" in capsys.readouterr().err
    # Real fp weights (--load-format auto) cannot serve a quantized precision.
    save_checkpoint("llama3", tmp_path)
    args = ["--model", str(tmp_path), "--load-format", "auto", "--precisions", "fp32", "w8a8kv8"]
    assert main(["bench", "throughput", *args, "--device", "cpu"]) == 2
    assert "precision w8a8kv8 needs a quantized checkpoint" in capsys.readouterr().err


def test_progress_gets_the_report_after_each_system() -> None:
    """A run cut short (a device time limit) keeps what it measured: the CLI rewrites the JSON
    after each system."""
    reports: list[dict] = []
    final = throughput.run(
        model=None,
        preset="tiny-llama",
        batches=[1],
        input_len=8,
        output_len=2,
        peers=["hf"],
        seed=0,
        engine_options={"device": "cpu", "page_size": 16, "num_kv_pages": 8},
        systems=[throughput.parse_system("w8a8kv8"), throughput.parse_system("fp32")],
        progress=reports.append,
    )
    assert [[r["precision"] for r in report["results"]] for report in reports] == [
        ["w8a8kv8"],
        ["w8a8kv8", "w16a16"],
    ]
    assert all(r["speedup_vs_hf"] is None for report in reports for r in report["results"])
    assert [r["system"] for r in final["results"]] == ["omniserve", "omniserve", "hf-transformers"]
    assert final["engines"] == reports[-1]["engines"]


def test_without_a_gpu_the_default_model_is_the_bundled_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --model-config and no --model on a CPU: the bundled model, not the 8B shape (whose
    random weights filled 21 GB of a 24 GB machine before anything was printed)."""
    from omniserve.engine.engine import bundled_model_path

    args = ["--device", "cpu", "--batch", "2", "--input-len", "8", "--output-len", "3"]
    out = tmp_path / "report.json"
    assert main(["bench", "throughput", *args, "--peer", "none", "--output-json", str(out)]) == 0
    assert "the bundled model" in capsys.readouterr().err
    assert json.loads(out.read_text())["setting"]["model"] == str(bundled_model_path())


def test_breakdown_splits_the_run_into_prefill_decode_steps_and_ops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--breakdown: a second run of the batch, its prefill seconds, decode step statistics and
    the profiled ops (aten ops on the CPU), by category, in the JSON, the table and the PNG."""
    report, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--batch", "2", "--input-len", "8", "--output-len", "30", "--peer", "none"]
    code = main(
        ["bench", "throughput", *TINY, *args, "--breakdown"]
        + ["--output-json", str(report), "--output-png", str(png)]
    )
    assert code == 0
    (row,) = json.loads(report.read_text())["results"]
    b = row["breakdown"]
    assert b["prefill_s"] > 0 and b["profiled_steps"] == 16
    # 29 decode steps after the first token, 16 profiled and one interval spanning the window
    # and the steps before it left out.
    assert 0 < b["decode_steps"] <= 29 - 16
    assert 0 < b["decode_step_ms_median"] <= b["decode_step_ms_p90"]
    assert b["device_ms_per_step"] == pytest.approx(sum(b["categories_ms"].values()))
    assert b["categories_ms"]["gemm"] > 0 and b["top_kernels"]
    assert all(k["name"].startswith("aten::") for k in b["top_kernels"])
    assert b["host_waits_per_step"] is None and b["host_wait_sites"] == []  # a GPU-only check
    assert b["device_busy_fraction"] == pytest.approx(
        b["device_ms_per_step"] / b["decode_step_ms_median"]
    )
    # 16 prompt tokens fill no two whole steps: prefill is timed, not profiled.
    assert b["prefill_profiled_steps"] == 0 and b["prefill_categories_ms"] == {}
    out = capsys.readouterr().out
    assert "decode step median" in out and "waiting for the host" in out
    # Two panels (throughput, decode breakdown; no prefill profiled): 4 + 2 inches at 120 dpi.
    assert int.from_bytes(png.read_bytes()[20:24], "big") == 120 * 6
    assert step_breakdown.category("sm90_xmma_gemm_s8s8_s32") == "gemm"
    assert step_breakdown.category("omniserve_decode_attention_kv4") == "attention"


def test_breakdown_waits_for_chunked_prefills_before_profiling(tmp_path: Path) -> None:
    """Prompts of 40 tokens in steps of 8 tokens beside 2 decodes: every first token comes
    before the profiled window (the breakdown checks it), whichever scheduling mode, and the
    prefill steps are profiled too."""
    report, png = tmp_path / "bench.json", tmp_path / "bench.png"
    for mode in ("--async-scheduling", "--no-async-scheduling"):
        args = ["--batch", "2", "--input-len", "40", "--output-len", "24", "--peer", "none"]
        extra = ["--max-num-batched-tokens", "8", "--max-num-seqs", "2", mode]
        assert (
            main(
                ["bench", "throughput", *TINY, *args, *extra, "--breakdown"]
                + ["--output-json", str(report), "--output-png", str(png)]
            )
            == 0
        )
        # Three panels (throughput, decode and prefill breakdowns): 4 + 2 x 2 inches at 120 dpi.
        assert int.from_bytes(png.read_bytes()[20:24], "big") == 120 * 8
        (row,) = json.loads(report.read_text())["results"]
        b = row["breakdown"]
        assert b["profiled_steps"] == 16 and b["prefill_s"] > 0
        # 80 prompt tokens fill 10 steps of 8: one warm step, then 2 profiled, all prefill.
        assert b["prefill_profiled_steps"] == step_breakdown.PREFILL_PROFILE_STEPS == 2
        assert b["prefill_categories_ms"]["gemm"] > 0 and b["prefill_top_kernels"]
        assert b["prefill_device_ms_per_step"] == pytest.approx(
            sum(b["prefill_categories_ms"].values())
        )
        assert 0 < b["prefill_step_ms_median"] < 1e3 * b["prefill_s"]
        assert "prefill step median" in step_breakdown.table(b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_breakdown_names_the_calls_where_the_host_waits_on_a_gpu(tmp_path: Path) -> None:
    """On a GPU the steps after the profiled window run under torch's sync check: the breakdown
    counts the calls that made the host wait, by site, and prints them."""
    report = tmp_path / "bench.json"
    tiny_cuda = [a if a != "cpu" else "cuda" for a in TINY]
    args = ["--batch", "2", "--input-len", "8", "--output-len", "48", "--peer", "none"]
    assert (
        main(
            ["bench", "throughput", *tiny_cuda, *args, "--breakdown", "--output-json", str(report)]
        )
        == 0
    )
    (row,) = json.loads(report.read_text())["results"]
    b = row["breakdown"]
    # Greedy decode under async scheduling: nothing between launch and wait blocks on the GPU.
    assert b["host_waits_per_step"] == 0 and b["host_wait_sites"] == []
    assert "host waits per step" in step_breakdown.table(b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_wait_check_counts_each_blocking_call_at_its_site() -> None:
    """The sync check names the line that waited, once per call and step, and nothing else
    (setting torch's check also warns that it is a prototype; that is no wait)."""
    x = torch.ones(4, device="cuda")

    class Waits:
        def step(self) -> list[RequestOutput]:
            x.sum().item()
            x.max().item()
            return []

    sites, outputs = step_breakdown._host_waits(Waits(), 3)  # type: ignore[arg-type]
    assert outputs == []
    assert sorted(sites.values()) == [3, 3]
    assert all(site.startswith(__file__) for site in sites)
