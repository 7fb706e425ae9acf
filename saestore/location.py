"""Where a run lives: a local folder, or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``).

The one place that tells the two apart; local folders get the run lock and atomic creation, URLs are
opened through zarr's ``FsspecStore``.
"""

from __future__ import annotations

from pathlib import Path

from fsspec.core import split_protocol

__all__ = ["is_url", "resolved"]


def is_url(path: str | Path) -> bool:
    """True when ``path`` names a protocol (``s3://bucket/run.zarr``), False for a local path."""
    return split_protocol(str(path))[0] is not None


def resolved(path: str | Path) -> str:
    """The one spelling of a run's location, for catalogs: a local path made absolute with symlinks,
    ``..`` and trailing slashes resolved (``runs/x.zarr``, ``./runs/x.zarr/`` and a link to it are one
    place); a URL as given, without trailing slashes."""
    text = str(path)
    if is_url(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())
