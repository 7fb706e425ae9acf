"""Reading a run: :func:`open_run` is ``xr.open_zarr`` with sparse SAE variables.

Sparse variables become dask arrays whose blocks are ``sparse.COO``, decoded straight from the
chunk bytes (crc32c and zstd through zarr's own codecs, then :mod:`saestore.sparse_coo`); no
dense chunk is ever built. Every other variable is exactly what ``xr.open_zarr`` gives.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import sparse
import xarray as xr
import zarr
from zarr.core.array_spec import ArrayConfig
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from saestore import protocol, sparse_coo
from saestore.codec import CODEC_NAME
from saestore.errors import CorruptChunkError

__all__ = ["open_run", "is_sparse_variable", "SparseChunkSource", "read_sparse_chunk"]


def is_sparse_variable(arr: zarr.Array) -> bool:
    """True when the array's serializer is ``saestore.sparse_coo``."""
    codecs = arr.metadata.to_dict().get("codecs", [])
    return bool(codecs) and codecs[0].get("name") == CODEC_NAME


@lru_cache(maxsize=64)
def _open_array(path: str, name: str) -> zarr.Array:
    return zarr.open_array(path, path=name, mode="r")


def _describe(arr: zarr.Array, coords: tuple[int, ...], path: str) -> str:
    """'res[author='x', layer=3, doc-chunk 2]' for error messages, best effort."""
    dims = arr.metadata.dimension_names or ()
    parts = []
    for dim, c in zip(dims, coords, strict=False):
        if dim == "author":
            try:
                parts.append(f"author={str(_open_array(path, 'author')[c])!r}")
            except Exception:  # noqa: BLE001 - naming is best effort inside an error path
                parts.append(f"author #{c}")
        elif dim == "layer":
            try:
                parts.append(f"layer={int(_open_array(path, 'layer')[c])}")
            except Exception:  # noqa: BLE001
                parts.append(f"layer #{c}")
        elif dim == "doc":
            parts.append(f"doc-chunk {c}")
    return f"{arr.store_path.path}[{', '.join(parts)}] (chunk {'/'.join(map(str, coords))}) in {path}"


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_content_size(frame: np.ndarray | bytes) -> int | None:
    """Content size a zstd frame header declares (RFC 8878 §3.1.1.1), or None when absent/unparsable."""
    head = bytes(frame[:18])
    if len(head) < 5 or head[:4] != _ZSTD_MAGIC:
        return None
    fhd = head[4]
    fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def _check_zstd_claim(buf: Any, codec: Any, chunk_shape: tuple[int, ...]) -> None:
    """Refuse a zstd frame that claims more than the largest sparse_coo chunk of this shape, before
    numcodecs allocates what the header claims (a crafted chunk could claim 2^62 bytes)."""
    if type(codec).__name__ != "ZstdCodec":
        return
    claimed = zstd_content_size(buf.as_numpy_array())
    n_cols, n_rows = chunk_shape[-1], math.prod(chunk_shape[:-1])
    largest = sparse_coo.HEADER_SIZE + 4 * n_rows + n_rows * n_cols * (sparse_coo.index_width(n_cols) + 4)
    if claimed is not None and claimed > largest:
        raise CorruptChunkError(f"zstd frame claims {claimed} bytes, more than the largest possible chunk ({largest})")


def read_sparse_chunk(path: str, name: str, coords: tuple[int, ...]) -> sparse.COO:
    """Decode one stored chunk of a sparse variable into ``sparse.COO`` of the full chunk shape."""
    arr = _open_array(path, name)
    chunk_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    key = f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(coords)}"
    prototype = default_buffer_prototype()
    buf = sync(arr.store_path.store.get(key, prototype=prototype))
    if buf is None:  # never written: all fill (0.0)
        return sparse.COO(np.zeros((len(chunk_shape), 0), dtype=np.int64), np.zeros(0, dtype=np.float32),
                          shape=chunk_shape)
    spec = arr.metadata.get_chunk_spec(coords, ArrayConfig.from_dict({}), prototype)
    try:
        for codec in reversed(arr.metadata.codecs[1:]):
            _check_zstd_claim(buf, codec, chunk_shape)
            buf = codec._decode_sync(buf, spec)
        idx, values = sparse_coo.decode_coords(buf.as_numpy_array(), chunk_shape)
    except (CorruptChunkError, ValueError, RuntimeError, MemoryError) as e:
        raise CorruptChunkError(f"cannot decode {_describe(arr, coords, path)}: {e}. "
                                "Run `python -m saestore validate RUN --repair`, then extract --resume") from e
    return sparse.COO(idx, values.astype(np.dtype(spec.dtype.to_native_dtype()), copy=False), shape=chunk_shape,
                      has_duplicates=False, sorted=True)


def _crop(block: sparse.COO, region: tuple[slice, ...]) -> sparse.COO:
    """``block[region]`` for contiguous slices, in numpy (sparse's own indexing compiles with numba,
    costing seconds per process on every edge chunk)."""
    coords = block.coords
    keep = np.ones(coords.shape[1], dtype=bool)
    for axis, sl in enumerate(region):
        keep &= (coords[axis] >= sl.start) & (coords[axis] < sl.stop)
    starts = np.array([sl.start for sl in region], dtype=coords.dtype)[:, None]
    shape = tuple(sl.stop - sl.start for sl in region)
    return sparse.COO(coords[:, keep] - starts, block.data[keep], shape=shape, has_duplicates=False, sorted=True)


class SparseChunkSource:
    """Array-like for ``da.from_array``: chunk-aligned ``__getitem__`` returns ``sparse.COO``.

    Holds only the store path and variable name, so it pickles cheaply to dask.distributed workers.
    """

    def __init__(self, path: str, name: str) -> None:
        arr = _open_array(path, name)
        self.path, self.name = path, name
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(arr.metadata.chunk_grid.chunk_shape)

    def __getitem__(self, key: tuple[slice, ...]) -> sparse.COO:
        key = key if isinstance(key, tuple) else (key,)
        starts = [s.start or 0 for s in key]
        coords = tuple(st // c for st, c in zip(starts, self.chunks, strict=True))
        block = read_sparse_chunk(self.path, self.name, coords)
        local = tuple(
            slice(st - i * c, (s.stop if s.stop is not None else dim) - i * c)
            for s, st, i, c, dim in zip(key, starts, coords, self.chunks, self.shape, strict=True)
        )
        if all(sl.start == 0 and sl.stop == c for sl, c in zip(local, self.chunks, strict=True)):
            return block
        return _crop(block, local)


def _sparse_dask(path: str, name: str) -> da.Array:
    src = SparseChunkSource(path, name)
    chunks = tuple(
        tuple(min(c, dim - i * c) for i in range(math.ceil(dim / c))) if dim else (0,)
        for dim, c in zip(src.shape, src.chunks, strict=True)
    )
    meta = sparse.COO.from_numpy(np.zeros((0,) * src.ndim, dtype=src.dtype))
    return da.from_array(src, chunks=chunks, meta=meta, asarray=False, fancy=False,
                         name=f"saestore-{name}-{abs(hash((path, name)))}")


def open_run(path: str | Path, *, sparse_variables: bool = True, check: bool = True, **open_kwargs: Any) -> xr.Dataset:
    """Open a run as an xarray Dataset.

    Identical to ``xr.open_zarr(path)`` except that, with ``sparse_variables=True``, every
    variable stored with ``saestore.sparse_coo`` is a dask array of ``sparse.COO`` blocks.
    ``check`` applies PROTOCOL.md's version rule and validates the root attributes.
    """
    path = str(path)
    open_kwargs.setdefault("chunks", {})
    ds = xr.open_zarr(path, **open_kwargs)
    if check:
        protocol.read_attrs(ds.attrs, where=path)
    if not sparse_variables:
        return ds
    group = zarr.open_group(path, mode="r")
    for name in list(ds.data_vars):
        arr = group[name]
        if isinstance(arr, zarr.Array) and is_sparse_variable(arr):
            var = ds[name]
            ds[name] = xr.Variable(var.dims, _sparse_dask(path, name), attrs=var.attrs, encoding=var.encoding)
    return ds
