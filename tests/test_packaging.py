"""The install: a light core, extras that match saestore/extras.py, every imported package declared,
and a one-line hint where an extra is missing."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from saestore.extras import EXTRAS, MissingExtraError, missing, require

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
#: import name -> distribution name, where they differ
DIST = {"transformer_lens": "transformer-lens", "sae_lens": "sae-lens", "simple_parsing": "simple-parsing",
        "huggingface_hub": "huggingface-hub"}
HEAVY = {"torch", "transformer-lens", "sae-lens", "transformers", "datasets", "tokenizers", "safetensors"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def _extra(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Distributions an extra pulls in, following saestore[...] self-references."""
    out: set[str] = set()
    for req in PYPROJECT["optional-dependencies"][name]:
        m = re.fullmatch(r"saestore\[([\w,]+)\]", req)
        if m:
            for sub in m.group(1).split(","):
                if sub not in seen:
                    out |= _extra(sub, seen | {name})
        else:
            out |= _names([req])
    return out


def test_core_dependencies_are_light():
    core = _names(PYPROJECT["dependencies"])
    assert not core & HEAVY, core & HEAVY
    assert {"zarr", "numcodecs", "xarray", "dask", "sparse", "numpy"} <= core


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_every_extra_in_the_table_is_declared_with_its_modules(extra):
    declared = _extra(extra)
    for module in EXTRAS[extra][1]:
        assert DIST.get(module, module) in declared, (extra, module)


def test_all_and_dev_cover_every_extra():
    everything = set().union(*(_extra(e) for e in EXTRAS))
    assert everything <= _extra("all") and _extra("all") <= _extra("dev")
    assert not _extra("test") & HEAVY  # the Python 3.13 leg installs core + test: no torch


def test_every_imported_package_is_declared():
    declared = _names(PYPROJECT["dependencies"]) | set().union(*(_extra(e) for e in PYPROJECT["optional-dependencies"]))
    imported: set[str] = set()
    for path in (REPO / "saestore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "saestore"}
    undeclared = {m for m in third_party if DIST.get(m, m).lower() not in declared}
    assert not undeclared, f"imported but not in pyproject.toml: {sorted(undeclared)}"


def test_missing_extra_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert missing("torch") == ["torch"]
    with pytest.raises(MissingExtraError) as e:
        require("torch")
    assert isinstance(e.value, ImportError)
    assert str(e.value) == ("the PyTorch training readers (saestore.torch) needs the 'torch' extra (torch not installed): "
                            "pip install 'saestore[torch]'")


@pytest.mark.skipif(not missing("extract"), reason="the hint is for installs without the 'extract' extra")
@pytest.mark.parametrize("argv", [["-m", "saestore.extract", "--model", "tiny"], ["-m", "saestore", "extract", "--help"],
                                  ["-m", "saestore.bench", "--quick"]])
def test_commands_without_their_extra_print_the_hint(argv, tmp_path):
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "pip install 'saestore[" in lines[0] and "not installed" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written
