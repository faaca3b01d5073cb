"""The scripts under benches/ as modules, for the tests that check what they print and fit."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHES = Path(__file__).resolve().parents[1] / "benches"


def load_bench_script(name: str) -> ModuleType:
    """benches/<name>.py, imported under its own name."""
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
