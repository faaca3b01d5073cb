"""The import layering of `python/omniserve`: every import, wherever it is written (module level,
inside a function, under TYPE_CHECKING), points down `LAYERS`, and neither the packages nor the
modules import each other in a cycle.

Imports are read with `ast` from the source, never executed, so a lazy import counts as much as
an eager one: it runs as soon as its function does. Only dynamic imports (`importlib` on a
computed name) are invisible here.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "omniserve"
SOURCE = Path(__file__).resolve().parents[1] / "python" / PACKAGE

ROOT = "__init__"
"""The unit of `omniserve/__init__.py` (the package's lazily imported public names)."""
LAYERS: tuple[frozenset[str], ...] = tuple(
    map(
        frozenset,
        (
            {ROOT},
            {"cli"},
            {"server", "bench", "eval"},  # entry points beside each other, none imports another
            {"quantize", "calibrate"},  # offline tools that run models: checkpoints, head patterns
            {"engine"},
            {"runner"},
            {"models"},
            {"layers"},
            {"kernels", "distributed"},  # ops on one device; collectives across ranks
            {"config"},
            {"formats"},  # run-time number formats: what layers and kernels store and compute
            {"outputs", "sampling_params", "training"},
            {"errors"},
            {"_scheduler"},  # the Rust extension (a stub here, `_scheduler.pyi`)
        ),
    )
)
"""Units (a subpackage or top-level module of omniserve, by name), highest first: a unit may
import units of later layers only, never one of its own layer or an earlier one."""
RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    """The importing module's dotted name."""
    imported: str
    """The omniserve module it names (a package means its __init__)."""
    file: Path
    line: int

    def where(self) -> str:
        return f"{self.file.relative_to(SOURCE.parents[1])}:{self.line}"

    def edge(self, level: str) -> tuple[str, str]:
        """(importer, imported) as `level` "modules" or "units"."""
        if level == "units":
            return _unit(self.importer), _unit(self.imported)
        return self.importer, self.imported


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    """Every module of the package (dotted name → file), stubs of compiled modules included."""
    return {
        _module_name(p): p for p in sorted(SOURCE.rglob("*.py*")) if p.suffix in (".py", ".pyi")
    }


MODULES = _sources()


def _resolve(name: str) -> str:
    """The longest known module that `name` (a dotted path) starts with."""
    parts = name.split(".")
    while ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _imports(module: str, path: Path) -> Iterator[Import]:
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name` imports the submodule `pkg.name` where there is one.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in dict.fromkeys(names):  # `from m import a, b` is one import of m
            if name == PACKAGE or name.startswith(f"{PACKAGE}."):
                yield Import(module, _resolve(name), path, node.lineno)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _cycle_report(level: str) -> list[str]:
    """Each import cycle at `level` ("modules" or "units"): its members, then the imports that
    join them, by file and line."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        source, target = imp.edge(level)
        if source != target:
            edges[source].add(target)
    report = []
    for cycle in _cycles(edges):
        joins = [
            f"    {imp.where()} imports {imp.imported}"
            for imp in IMPORTS
            if (edge := imp.edge(level))[0] != edge[1] and set(edge) <= set(cycle)
        ]
        report.append(" <-> ".join(cycle) + "\n" + "\n".join(joins))
    return report


def test_the_scan_sees_the_package() -> None:
    assert {"omniserve.kernels.build", "omniserve._scheduler", PACKAGE} <= set(MODULES)
    lazy = [i for i in IMPORTS if i.importer == "omniserve.cli.main"]
    assert any(i.imported == "omniserve.errors" for i in lazy)  # an import inside a function
    assert any(i.importer == PACKAGE and i.imported == "omniserve.config" for i in IMPORTS)


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in MODULES}
    assert units - RANK.keys() == set(), "place these packages/modules in LAYERS"
    assert RANK.keys() - units == set(), "LAYERS names packages/modules that do not exist"


def test_no_package_import_cycles() -> None:
    cycles = _cycle_report("units")
    assert not cycles, "packages that import each other:\n" + "\n".join(cycles)


def test_no_module_import_cycles() -> None:
    cycles = _cycle_report("modules")
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for imp in IMPORTS:
        source, target = imp.edge("units")
        if source == target or source not in RANK or target not in RANK:
            continue  # within one unit; unplaced units fail test_every_unit_has_a_layer
        if RANK[source] >= RANK[target]:
            relation = "beside" if RANK[source] == RANK[target] else "above"
            wrong.append(
                f"{imp.where()} imports {imp.imported}: {source} may not import {target}, "
                f"which sits {relation} it"
            )
    assert not wrong, "imports against the layering (LAYERS):\n" + "\n".join(wrong)
