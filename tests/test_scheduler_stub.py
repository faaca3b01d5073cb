"""`_scheduler.pyi` names exactly what the Rust extension exports, class by class."""

from __future__ import annotations

import ast
from pathlib import Path

import omniserve._scheduler as ext

STUB = Path(ext.__file__).with_name("_scheduler.pyi")


def _members(nodes: list[ast.stmt]) -> set[str]:
    names = {n.name for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    names |= {
        n.target.id
        for n in nodes
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    return {n for n in names if not n.startswith("_")}


def test_stub_matches_the_extension() -> None:
    tree = ast.parse(STUB.read_text())
    assert _members(tree.body) == {n for n in dir(ext) if not n.startswith("_")}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not issubclass(
            getattr(ext, node.name), BaseException
        ):
            real = {n for n in dir(getattr(ext, node.name)) if not n.startswith("_")}
            assert _members(node.body) == real, node.name


def test_error_hierarchy() -> None:
    assert issubclass(ext.InvalidRequestError, ext.OmniserveError)
    assert issubclass(ext.InvalidRequestError, ValueError)
    assert issubclass(ext.RequestRejectedError, ext.OmniserveError)
    assert issubclass(ext.SchedulerInternalError, ext.OmniserveError)
