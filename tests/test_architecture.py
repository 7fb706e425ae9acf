"""ARCHITECTURE.md stays true: every module is in the map, imports follow the layers, no cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "saestore"
#: layers that the core install holds; they never import the extraction or benchmark layers
CORE_AND_ANALYSIS = ("saestore.errors", "saestore.sparse_coo", "saestore.nonzeros", "saestore.selection", "saestore.codec", "saestore.protocol",
                     "saestore.chunkio", "saestore.location", "saestore.extras", "saestore.faults", "saestore.writer", "saestore.reader",
                     "saestore.validate", "saestore.info", "saestore.lock", "saestore.registry", "saestore.stats",
                     "saestore.plots", "saestore.torch", "saestore.torch_rows", "saestore.featuredata", "saestore.dashboard",
                     "saestore.export")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """saestore modules ``path`` imports, at any level (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {node.module}
    return found


def test_every_module_is_in_the_map():
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:[\w/]+/)?[\w]+\.py|[\w]+/)`", text))
    missing = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py":
            continue
        if rel not in named and f"{rel.split('/')[0]}/" not in named:
            missing.append(rel)
    assert not missing, f"modules missing from ARCHITECTURE.md's map: {missing}"


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_and_analysis_never_import_extraction_or_benchmarks():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        if name.startswith(CORE_AND_ANALYSIS):
            bad += [f"{name} imports {n}" for n in _imports(path, modules)
                    if n.startswith(("saestore.extract", "saestore.bench"))]
    assert not bad, bad
