"""Shared fixtures.

Every test session gets its own ``SAESTORE_CACHE`` (a temporary folder), so no test reads or
writes ``~/.cache/saestore``. Set ``SAESTORE_TEST_CACHE=/some/folder`` to keep the tiny bundle
between sessions instead (faster local iterations; the bundle is rebuilt only if missing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.needs import MARKERS, skip_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked with an extra (``@pytest.mark.extract``, ``@pytest.mark.torch``) that is absent."""
    reasons = {marker: skip_reason(marker) for marker in MARKERS}
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def saestore_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's ``SAESTORE_CACHE`` (set for the whole session; nothing is built here)."""
    keep = os.environ.get("SAESTORE_TEST_CACHE")
    cache = Path(keep) if keep else tmp_path_factory.mktemp("saestore_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("SAESTORE_CACHE", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(scope="session")
def tiny_cache(saestore_cache_dir: Path) -> Path:
    """``SAESTORE_CACHE`` with the tiny bundle built in it (once per session)."""
    from saestore.extract.tiny import build_tiny_bundle

    build_tiny_bundle(saestore_cache_dir)
    return saestore_cache_dir
