"""What a test needs beyond the core install, said once: ``@pytest.mark.extract`` /
``@pytest.mark.torch`` on a test (conftest.py skips it, with the reason, when the extra is absent),
or :func:`module_needs` at the top of a test module that imports the extra at module level."""

from __future__ import annotations

import pytest

from saestore.extras import EXTRAS, missing

#: pytest markers that stand for an extra (declared in pyproject.toml's [tool.pytest.ini_options])
MARKERS = ("extract", "torch")


def skip_reason(extra: str) -> str | None:
    """Why a test that needs ``extra`` cannot run here, or None when it can."""
    absent = missing(extra)
    if not absent:
        return None
    return f"needs the '{extra}' extra ({', '.join(absent)} not installed): pip install 'saestore[{extra}]'"


def module_needs(extra: str) -> None:
    """Skip the calling test module, at collection, when ``extra`` is not installed."""
    assert extra in EXTRAS, extra
    reason = skip_reason(extra)
    if reason:
        pytest.skip(reason, allow_module_level=True)
