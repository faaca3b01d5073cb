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


def _walk(parser: object, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(command words, parser) of `parser` and of every subcommand under it."""
    import argparse

    found = [(prefix, parser)]
    for action in getattr(parser, "_actions", []):
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _walk(sub, prefix + (name,))
    return found


@pytest.mark.parametrize("command", [c for c, _ in _walk(build_parser())], ids=" ".join)
def test_every_command_has_help(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: omniserve" in capsys.readouterr().out


def test_no_command_takes_abbreviated_options(capsys: pytest.CaptureFixture[str]) -> None:
    """`--prompt` was silently taken as `--prompts-file`."""
    assert all(not p.allow_abbrev for _, p in _walk(build_parser()))  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --prompt" in capsys.readouterr().err


def test_serve_names_the_model_shortly_and_refuses_an_empty_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniserve.cli import serve

    monkeypatch.delenv("OMNISERVE_API_KEY", raising=False)

    def args(*argv: str) -> object:
        return build_parser().parse_args(["serve", *argv])

    assert serve.served_model_name(args()) == serve.BUNDLED_MODEL_NAME
    assert serve.served_model_name(args("--model", "/data/models/llama-3-8b/")) == "llama-3-8b"
    assert serve.served_model_name(args("--served-model-name", "x", "--model", "/m")) == "x"
    assert serve.api_key(args()) is None
    assert serve.api_key(args("--api-key", "k")) == "k"
    # Refused before any engine is built: one line on stderr, exit status 2.
    assert main(["serve", "--api-key", " ", "--device", "cpu"]) == 2
    assert "the API key is empty" in capsys.readouterr().err


def test_every_engine_option_is_described() -> None:
    """Each --engine-option's help is its EngineConfig field's docstring, then its default."""
    import msgspec

    from omniserve.cli.engine_args import field_docs
    from omniserve.config import EngineConfig

    names = [f.name for f in msgspec.structs.fields(EngineConfig) if f.name != "model"]
    assert set(names) <= field_docs().keys()
    parser = dict((c, p) for c, p in _walk(build_parser()))[("generate",)]
    options = {a.dest: a.help for a in parser._actions}  # type: ignore[attr-defined]
    for name in names:
        assert not options[name].startswith("default:"), name
        assert "(default: " in options[name], name


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


def test_bad_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing prompts file, a .json one that is not a JSON array of strings and a malformed
    config.json each end the command with one line on stderr and status 2, not a traceback."""
    (tmp_path / "prompts.json").write_text("{not json")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    cases = [
        (["--prompts-file", str(tmp_path / "missing.txt")], "cannot read --prompts-file"),
        (["--prompts-file", str(tmp_path / "prompts.json")], "must be a JSON array of strings"),
        (["x", "--model", str(tmp_path / "model")], "config.json is not valid JSON"),
    ]
    for argv, message in cases:
        assert main(["generate", *argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
