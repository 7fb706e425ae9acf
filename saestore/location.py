"""Where a run lives: a local folder, or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``).

The one place that tells the two apart; local folders get the run lock and atomic creation, URLs are
opened through zarr's ``FsspecStore``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fsspec.core import split_protocol

__all__ = ["default_cache_dir", "is_url", "join", "name", "size_of"]


def is_url(path: str | Path) -> bool:
    """True when ``path`` names a protocol (``s3://bucket/run.zarr``), False for a local path."""
    return split_protocol(str(path))[0] is not None


def join(root: str | Path, *parts: str) -> str:
    """``root/part/...``: a URL stays a URL (``s3://bucket/x`` + ``a`` is ``s3://bucket/x/a``, never
    the local folder ``s3:/bucket/x/a``); a local root is joined as a path. ``parts`` are single
    path components already made safe by the caller."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(root).joinpath(*parts))


def default_cache_dir() -> Path:
    """saestore's local cache folder: ``$SAESTORE_CACHE`` if set, else ``~/.cache/saestore`` (the
    tiny bundle, and the run registry of runs written to a URL)."""
    env = os.environ.get("SAESTORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saestore"


def name(path: str | Path) -> str:
    """The last component of a local path or a URL."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def size_of(path: str | Path) -> int:
    """Bytes of everything stored under a local folder or a URL prefix (0 when there is nothing)."""
    if is_url(path):
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(str(path))
        return int(fs.du(root, total=True)) if fs.exists(root) else 0
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
