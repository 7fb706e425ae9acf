"""Reading a run: :func:`open_run` is ``xr.open_zarr`` with sparse SAE variables.

Sparse variables become dask arrays whose blocks are ``sparse.COO``, decoded straight from the
chunk bytes (crc32c and zstd through zarr's own codecs, then :mod:`saestore.sparse_coo`); no
dense chunk is ever built. Every other variable is exactly what ``xr.open_zarr`` gives.
"""

from __future__ import annotations

import math
import uuid
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import dask.array as da
import numpy as np
import sparse
import xarray as xr
import zarr
from dask.base import tokenize

from saestore import chunkio, protocol, sparse_coo
from saestore.codec import SparseCOOCodec
from saestore.errors import CorruptChunkError, IncompleteRunWarning, RunNotFoundError
from saestore.nonzeros import SparseActs

T = TypeVar("T")

__all__ = ["open_run", "is_sparse_variable", "SparseChunkSource", "chunk_source", "read_sparse_chunk",
           "read_chunk_acts", "done_docs"]


def is_sparse_variable(arr: zarr.Array) -> bool:
    """True when the array's serializer is ``saestore.sparse_coo`` and its chunks can be decoded
    directly (:func:`saestore.chunkio.is_direct`); other arrays read through zarr's pipeline."""
    return chunkio.is_direct(arr) and isinstance(arr.serializer, SparseCOOCodec)


def _describe(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """'res[author='x', layer=3, doc-chunk 2] (chunk ...) in STORE' for error messages, best effort."""
    dims = arr.metadata.dimension_names or ()
    store = arr.store
    parts = []
    for dim, c in zip(dims, coords, strict=False):
        if dim in ("author", "layer"):
            try:
                value = zarr.open_array(store, path=dim, mode="r")[c]
                parts.append(f"author={str(value)!r}" if dim == "author" else f"layer={int(value)}")
            except Exception:
                parts.append(f"{dim} #{c}")
        elif dim == "doc":
            parts.append(f"doc-chunk {c}")
    return f"{arr.store_path.path}[{', '.join(parts)}] (chunk {'/'.join(map(str, coords))}) in {store}"


def _raw_chunk(arr: zarr.Array, coords: tuple[int, ...], decode: Callable[[bytes], T]) -> T | None:
    """``decode(bytes)`` of one stored chunk (None if it was never written); a chunk that does not
    decode is a :class:`CorruptChunkError` naming where it is and how to repair it."""
    try:
        raw = chunkio.read_chunk(arr, coords)
        return None if raw is None else decode(raw)
    except (CorruptChunkError, ValueError, RuntimeError, MemoryError) as e:
        raise CorruptChunkError(f"cannot decode {_describe(arr, tuple(coords))}: {e}. "
                                "Run `python -m saestore validate RUN --repair`, then extract --resume") from e


def read_chunk_acts(arr: zarr.Array, coords: tuple[int, ...], fmap: np.ndarray | None = None) -> SparseActs:
    """One stored chunk of an SAE variable as :class:`~saestore.nonzeros.SparseActs` of the chunk's
    ``(doc, tok, feature)`` shape, straight from the format's rows (its leading author/layer axes
    have size 1). With ``fmap`` (one int64 per feature; negative: dropped) only the selected
    features are kept, renumbered ``fmap[c]`` (:func:`saestore.sparse_coo.decode_selected`)."""
    shape = chunkio.chunk_shape(arr)
    n_feat = int(shape[-1]) if fmap is None else int(fmap.max(initial=-1)) + 1
    acts_shape = (int(shape[-3]), int(shape[-2]), n_feat)
    if len(shape) < 3 or math.prod(shape[:-3]) != 1:
        raise CorruptChunkError(f"{arr.store_path.path} has chunks {shape}, not (1, …, 1, doc, tok, feature)")
    n_rows = acts_shape[0] * acts_shape[1]
    value_dtype = chunkio.serializer(arr).value_dtype

    def decode(raw: bytes) -> SparseActs:
        _, rows, cols, values = sparse_coo.decode_selected(raw, fmap, n_rows, int(shape[-1]), value_dtype=value_dtype)
        return SparseActs(rows=rows, cols=cols, values=values, shape=acts_shape)

    acts = _raw_chunk(arr, coords, decode)
    return SparseActs.empty(acts_shape) if acts is None else acts  # never written: all fill (0.0)


def read_sparse_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> sparse.COO:
    """Decode one stored chunk of a sparse variable into ``sparse.COO`` of the full chunk shape."""
    shape = chunkio.chunk_shape(arr)
    dtype = np.dtype(arr.dtype)
    value_dtype = chunkio.serializer(arr).value_dtype
    decoded = _raw_chunk(arr, coords, lambda raw: sparse_coo.decode_coords(raw, shape, value_dtype=value_dtype))
    if decoded is None:  # never written: all fill (0.0)
        return sparse.COO(np.zeros((len(shape), 0), dtype=np.int64), np.zeros(0, dtype=dtype), shape=shape)
    idx, values = decoded
    return sparse.COO(idx, values.astype(dtype, copy=False), shape=shape, has_duplicates=False, sorted=True)


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


def done_chunks(group: zarr.Group, markers: np.ndarray | None = None) -> np.ndarray:
    """bool ``(author, doc-chunk)``: True where the doc-chunk is finished, i.e. its progress marker
    is set (PROTOCOL.md §3), or it holds no document of its author (nothing to write), so a
    complete run is all True. One read of the progress array: a snapshot, so what it marks finished
    stays finished while the run is written (payloads always precede their marker)."""
    marked = (np.asarray(group[protocol.PROGRESS_PATH][..., 0]) if markers is None else markers[..., 0]) == 1
    marked |= np.arange(marked.shape[1])[None, :] >= _n_chunks(group)[:, None]
    return marked


def _n_chunks(group: zarr.Group) -> np.ndarray:
    """Doc-chunks holding at least one document, per author."""
    k = protocol.read_attrs(dict(group.attrs)).storage.chunk_docs
    return -(-np.asarray(group["n_docs"][...], dtype=np.int64) // k)


def done_shards(group: zarr.Group, chunks: np.ndarray | None = None) -> np.ndarray:
    """bool ``(author, shard)``: every doc-chunk of the shard is :func:`done_chunks` (or the given
    snapshot of it)."""
    chunks = done_chunks(group) if chunks is None else chunks
    k = protocol.read_attrs(dict(group.attrs)).storage.chunks_per_shard
    pad = -chunks.shape[1] % k
    full = np.concatenate([chunks, np.ones((chunks.shape[0], pad), dtype=bool)], axis=1)
    return full.reshape(chunks.shape[0], -1, k).all(axis=2)


def done_docs(group: zarr.Group, chunks: np.ndarray | None = None) -> np.ndarray:
    """bool ``(author, doc)``: :func:`done_chunks` (or the given snapshot of it) per document."""
    chunks = done_chunks(group) if chunks is None else chunks
    k = protocol.read_attrs(dict(group.attrs)).storage.chunk_docs
    return np.repeat(chunks, k, axis=1)[:, : int(group["doc"].shape[0])]


class SparseChunkSource:
    """Array-like for ``da.from_array``: chunk-aligned ``__getitem__`` returns ``sparse.COO``.

    Opens its array once, on first use in each process; pickles as the store path and variable
    name only, so it ships cheaply to dask.distributed workers. Each :func:`open_run` makes new
    sources, so a run overwritten at the same path is never read through stale metadata.
    """

    def __init__(self, path: str, name: str, pending: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.path, self.name = path, name
        self.pending = pending
        """(author, doc-chunk) pairs read as absent: not finished when the run was opened."""
        self._arr: zarr.Array | None = None
        arr = self.array
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)
        self.chunks = chunkio.chunk_shape(arr)

    @property
    def array(self) -> zarr.Array:
        if self._arr is None:
            self._arr = zarr.open_array(self.path, path=self.name, mode="r")
        return self._arr

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arr": None}

    def accumulate(self, coords: tuple[int, ...], acc: np.ndarray, fmap: np.ndarray) -> None:
        """Add chunk ``coords`` (author, layer, doc-chunk, 0, 0) into ``acc`` with
        :func:`saestore.sparse_coo.accumulate` -- read, decode and reduce in one pass, no block
        built. A chunk never written or pending adds nothing."""
        if (coords[0], coords[2]) in self.pending:
            return
        arr = self.array
        n_rows = math.prod(self.chunks[:-1])
        value_dtype = chunkio.serializer(arr).value_dtype
        _raw_chunk(arr, coords, lambda raw: sparse_coo.accumulate(raw, acc, fmap, n_rows, self.chunks[-1],
                                                                  value_dtype=value_dtype))

    def read_acts(self, coords: tuple[int, ...], fmap: np.ndarray | None = None) -> SparseActs:
        """Chunk ``coords`` (author, layer, doc-chunk, 0, 0) as :class:`~saestore.nonzeros.SparseActs`
        cut at the array's doc edge (:func:`read_chunk_acts`; ``fmap`` keeps selected features only).
        A pending chunk reads as empty."""
        n_docs = min(self.chunks[2], self.shape[2] - coords[2] * self.chunks[2])
        if (coords[0], coords[2]) in self.pending:
            n_feat = self.chunks[-1] if fmap is None else int(fmap.max(initial=-1)) + 1
            return SparseActs.empty((n_docs, self.chunks[3], n_feat))
        acts = read_chunk_acts(self.array, coords, fmap)
        return acts if n_docs == acts.n_docs else acts.docs(0, n_docs)

    def __getitem__(self, key: tuple[slice, ...]) -> sparse.COO:
        key = key if isinstance(key, tuple) else (key,)
        starts = [s.start or 0 for s in key]
        coords = tuple(st // c for st, c in zip(starts, self.chunks, strict=True))
        if (coords[0], coords[2]) in self.pending:  # (author, layer, doc, tok, feature)
            block = sparse.COO(np.zeros((self.ndim, 0), dtype=np.int64), np.zeros(0, dtype=self.dtype),
                               shape=self.chunks)
        else:
            block = read_sparse_chunk(self.array, coords)
        local = tuple(
            slice(st - i * c, (s.stop if s.stop is not None else dim) - i * c)
            for s, st, i, c, dim in zip(key, starts, coords, self.chunks, self.shape, strict=True)
        )
        if all(sl.start == 0 and sl.stop == c for sl, c in zip(local, self.chunks, strict=True)):
            return block
        return _crop(block, local)


def store_token(path: str) -> str:
    """A token of what a run holds now: its root attributes and every progress marker (each marker
    carries its write time, so any doc-chunk written, redone or repaired changes the token, and an
    overwritten run has new attributes)."""
    group = zarr.open_group(path, mode="r")
    try:
        markers: Any = np.asarray(group[protocol.PROGRESS_PATH][...]) if protocol.PROGRESS_PATH in group else None
    except (ValueError, RuntimeError, OSError):  # a damaged marker (validate names it): a name never reused
        markers = uuid.uuid4().hex
    return tokenize(path, dict(group.attrs), markers)


_SOURCES: weakref.WeakValueDictionary[str, SparseChunkSource] = weakref.WeakValueDictionary()
"""dask array name -> its source, for the arrays :func:`open_run` made (the graph holds the source)."""


def chunk_source(x: da.Array) -> SparseChunkSource | None:
    """The :class:`SparseChunkSource` of ``x`` when ``x`` is a sparse variable exactly as
    :func:`open_run` made it (no operation applied since), else None. Statistics use it to read
    chunk bytes themselves (a fused read-decode-reduce per chunk) instead of ``sparse.COO`` blocks."""
    return _SOURCES.get(x.name)


def _sparse_dask(path: str, name: str, token: str, pending: frozenset[tuple[int, int]]) -> da.Array:
    src = SparseChunkSource(path, name, pending)
    chunks = tuple(
        tuple(min(c, dim - i * c) for i in range(math.ceil(dim / c))) if dim else (0,)
        for dim, c in zip(src.shape, src.chunks, strict=True)
    )
    meta = sparse.COO.from_numpy(np.zeros((0,) * src.ndim, dtype=src.dtype))
    x = da.from_array(src, chunks=chunks, meta=meta, asarray=False, fancy=False,
                      name=f"saestore-{name}-{tokenize(token, name, src.array.metadata.to_dict())}")
    _SOURCES[x.name] = src
    return x


def doc_chunk_counts(group: zarr.Group, chunks: np.ndarray | None = None) -> tuple[int, int]:
    """(finished, all) doc-chunks of the run, from :func:`done_chunks` (or the given snapshot of it),
    counting those holding at least one document of their author."""
    chunks = done_chunks(group) if chunks is None else chunks
    n = _n_chunks(group)
    return int(sum(int(chunks[a, :c].sum()) for a, c in enumerate(n))), int(n.sum())


def warn_incomplete(path: str, attrs: protocol.RunAttrs, group: zarr.Group, only_done: bool = True) -> None:
    """PROTOCOL.md §7.1: say, in one line, that a run is not complete and what that means for reading."""
    try:
        n_done, total = doc_chunk_counts(group)
        counts = f"{n_done} of {total} doc-chunks are done"
    except (ValueError, RuntimeError, OSError, KeyError):  # damaged markers: validate names them
        counts = "its progress markers are unreadable"
    why = {"running": "is being written or its writer was killed",
           "interrupted": "was interrupted (SIGINT or SIGTERM) before it was finished"}.get(
        attrs.status, f"was finalized with authors unfinished: {', '.join(map(repr, attrs.failed_authors))}")
    reads = ("the others read as absent (fill values; ds.done marks the finished documents)" if only_done
             else "the others read as stored, possibly partial (only_done=False)")
    warnings.warn(f"{path} {why} (status {attrs.status}): {counts}; {reads}. Rerun the extraction to finish it",
                  IncompleteRunWarning, stacklevel=3)


#: small variables read one author at a time (one dask block per author, not per doc-chunk): the
#: §2.8 summaries and ``doc_length``, all a statistic over whole doc-chunks reads (stats/_select.py)
WHOLE_AUTHOR_VARIABLES = ("doc_length", *(protocol.summary_name(lt) for lt in protocol.LAYER_TYPES),
                          *(protocol.shard_summary_name(lt) for lt in protocol.LAYER_TYPES))


def _whole_author_chunks(path: str, ds: xr.Dataset, open_kwargs: dict[str, Any]) -> xr.Dataset:
    """``ds`` with :data:`WHOLE_AUTHOR_VARIABLES` chunked one block per author (and layer): a few
    reads of whole shards instead of one task per doc-chunk."""
    names = [n for n in WHOLE_AUTHOR_VARIABLES if n in ds.data_vars]
    if not names:
        return ds
    keep = set(names) | set(ds.coords)
    kwargs = {**open_kwargs, "chunks": {"author": 1, "layer": 1, "doc": -1, "doc_chunk": -1, "shard": -1}}
    whole = xr.open_zarr(path, drop_variables=[n for n in ds.data_vars if n not in keep], **kwargs)
    return ds.assign({n: whole[n] for n in names})


def run_group(path: str | Path, **kwargs: Any) -> zarr.Group:
    """The Zarr group of the run at ``path`` (read-only); :class:`RunNotFoundError` when nothing is
    there or it is not a Zarr store. The one check of "is there a store" that readers and
    ``validate`` share."""
    try:
        return zarr.open_group(str(path), mode="r", **kwargs)
    except FileNotFoundError as e:  # zarr's GroupNotFoundError too
        raise RunNotFoundError(f"no saestore run at {path} ({e}); give the folder of a run, e.g. "
                               "runs/demo/tiny/demo.zarr (`python -m saestore runs list` shows them)") from e


def open_run(path: str | Path, *, sparse_variables: bool = True, check: bool = True, only_done: bool = True,
             **open_kwargs: Any) -> xr.Dataset:
    """Open a run as an xarray Dataset.

    ``xr.open_zarr(path)`` plus, with ``sparse_variables=True``, every variable stored with
    ``saestore.sparse_coo`` as a dask array of ``sparse.COO`` blocks, and the bool variable
    ``done`` ``(author, doc)``: True where the document's doc-chunk is finished (its progress
    marker is set; PROTOCOL.md §3, §7.1). With ``only_done`` (the default) every variable with a
    ``doc`` dimension reads as absent (its fill value: no activation, ``valid_mask`` False,
    ``text`` "") outside finished doc-chunks, consistently, from one snapshot of the markers; so a
    run being written or killed never shows half a doc-chunk. ``check`` applies PROTOCOL.md's
    version rule, validates the root attributes, and warns (:class:`IncompleteRunWarning`) when
    the run is not complete.
    """
    path = str(path)
    open_kwargs.setdefault("chunks", {})
    run_group(path)  # nothing there, or not a Zarr store: one line
    ds = xr.open_zarr(path, **open_kwargs)
    group = zarr.open_group(path, mode="r")
    if open_kwargs["chunks"] == {}:
        ds = _whole_author_chunks(path, ds, open_kwargs)
    if check:
        attrs = protocol.read_attrs(ds.attrs, where=path)
        if attrs.status != "complete":
            warn_incomplete(path, attrs, group, only_done)
    try:
        markers = np.asarray(group[protocol.PROGRESS_PATH][...])
        chunks = done_chunks(group, markers)
        done = done_docs(group, chunks)
        n_done, total = doc_chunk_counts(group, chunks)
    except (ValueError, RuntimeError, OSError, KeyError):  # damaged markers (validate names them): read as stored
        done, n_done, total = None, 0, 0
    pending: frozenset[tuple[int, int]] = frozenset()
    if done is not None and only_done and n_done < total:
        pending = frozenset((int(a), int(c)) for a, c in zip(*np.nonzero(~chunks), strict=True))
        keep = xr.DataArray(done, dims=("author", "doc"))
        keep_chunks = xr.DataArray(chunks, dims=("author", "doc_chunk"))  # §2.8 summaries
        keep_shards = xr.DataArray(done_shards(group, chunks), dims=("author", "shard"))  # ... and shard summaries
        for name in list(ds.data_vars):
            var = ds[name]
            if "doc_chunk" in var.dims or "shard" in var.dims:
                keep_var = keep_chunks if "doc_chunk" in var.dims else keep_shards
                ds[name] = var.where(keep_var, np.asarray(group[name].fill_value, dtype=var.dtype)).transpose(*var.dims)
                ds[name].attrs, ds[name].encoding = var.attrs, var.encoding
            elif "doc" in var.dims and not (sparse_variables and is_sparse_variable(group[name])):
                fill = group[name].fill_value
                ds[name] = var.where(keep, np.asarray(fill, dtype=var.dtype)).transpose(*var.dims)
                ds[name].attrs, ds[name].encoding = var.attrs, var.encoding
    if sparse_variables:
        token = store_token(path)
        for name in list(ds.data_vars):
            arr = group[name]
            if isinstance(arr, zarr.Array) and is_sparse_variable(arr):
                var = ds[name]
                ds[name] = xr.Variable(var.dims, _sparse_dask(path, name, token, pending), attrs=var.attrs,
                                       encoding=var.encoding)
    if done is not None:
        ds["done"] = xr.DataArray(done, dims=("author", "doc"), attrs={
            "description": "the document's doc-chunk is finished (progress marker set when the run was opened)"})
        if only_done:
            n_valid = np.where(markers[..., 0] == 1, markers[..., 1], 0)
            ds["chunk_tokens"] = xr.DataArray(n_valid, dims=("author", "doc_chunk"), attrs={
                "description": "valid tokens of each finished doc-chunk, from its progress marker (0 if unfinished)"})
    return ds
