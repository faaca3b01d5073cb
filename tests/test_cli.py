"""The `omniserve` command: help for every command, generate with JSON output (`bench throughput`
has tests/test_bench_throughput.py)."""

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
def test_every_command_has_help(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: omniserve" in capsys.readouterr().out


def test_console_script_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "omniserve.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "generate" in out.stdout and "bench" in out.stdout


def test_generate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_servable("llama3", tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nimport os\n")
    code = main(
        [
            "generate",
            "hello",
            "--prompts-file",
            str(prompts),
            "--model",
            str(tmp_path),
            "--device",
            "cpu",
            "--page-size",
            "16",
            "--max-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    outs = json.loads(capsys.readouterr().out)
    assert [len(o["token_ids"]) <= 5 for o in outs] == [True] * 3
    assert all(o["finished"] for o in outs)


def test_generate_reports_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err
