"""The `omniserve` command: help for every command, generate with JSON output, bench throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omniserve.cli.main import build_parser, main
from tiny_models import save_servable


def _subcommands(parser: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import argparse

    found = [prefix]
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, prefix + (name,))
    return found


@pytest.mark.parametrize("command", _subcommands(build_parser()), ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: omniserve" in capsys.readouterr().out


def test_console_script_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "omniserve.cli.main", "--help"], capture_output=True, text=True, check=True
    )
    assert "generate" in out.stdout and "bench" in out.stdout


def test_generate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_servable("llama3", tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nimport os\n")
    code = main([
        "generate", "hello", "--prompts-file", str(prompts), "--model", str(tmp_path),
        "--device", "cpu", "--page-size", "16", "--max-tokens", "5", "--json",
    ])
    assert code == 0
    outs = json.loads(capsys.readouterr().out)
    assert [len(o["token_ids"]) <= 5 for o in outs] == [True] * 3
    assert all(o["finished"] for o in outs)


def test_generate_reports_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err


def test_bench_throughput_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main([
        "bench", "throughput", "--model-config", "tiny-llama", "--batch", "2", "3",
        "--input-len", "16", "--output-len", "6", "--device", "cpu", "--page-size", "16",
        "--output-json", str(report), "--output-png", str(png),
    ])
    assert code == 0
    data = json.loads(report.read_text())
    systems = {(r["system"], r["batch"]) for r in data["results"]}
    assert systems == {("omniserve", 2), ("omniserve", 3), ("hf-transformers", 2), ("hf-transformers", 3)}
    assert all(r["tokens_per_s"] > 0 for r in data["results"])
    assert set(data["speedup_vs_hf"]) == {"2", "3"}
    assert png.stat().st_size > 1000
    assert "omniserve" in capsys.readouterr().out
