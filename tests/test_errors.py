"""Every deliberate error is a SaestoreError subclass defined in saestore/errors.py."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import saestore.errors as errors

PACKAGE = Path(__file__).resolve().parent.parent / "saestore"
BUILTIN = {"ValueError", "KeyError", "TypeError", "RuntimeError", "IndexError", "Exception", "AssertionError",
           "NotImplementedError", "OSError", "ImportError"}
#: (module, exception): raises a protocol of another library asks for
ALLOWED = {("bench/run.py", "TypeError"),  # json.dumps(default=...) must raise TypeError
           ("codec.py", "NotImplementedError"),  # zarr's compute_encoded_size for variable-size codecs
           ("torch.py", "NotImplementedError"),  # an abstract method
           ("faults.py", "OSError")}  # the enospc fault action is what a full disk raises


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def test_error_classes_live_in_errors_py_and_derive_from_saestore_error():
    for rel, tree in _modules():
        if rel == "errors.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), f"{rel}: class {node.name}"
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ == errors.__name__:  # warnings are UserWarnings (shown by default), errors SaestoreErrors
            assert issubclass(cls, UserWarning if issubclass(cls, Warning) else errors.SaestoreError), name


def test_no_bare_builtin_raises():
    found = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(exc, "id", None)
                if name in BUILTIN and (rel, name) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno} raise {name}")
    assert not found, found
