"""Selections of a run and the dask plumbing every statistic shares.

A :class:`Selection` names which part of a run a statistic covers (layer types, authors, layers,
documents, features). :func:`sae_array` and :func:`token_array` turn a Dataset plus a selection
into aligned dask arrays:

* ``acts_ALDTF`` — one SAE variable, chunked ``(1, 1, chunk_docs, n_tok, n_features)`` as stored:
  every block belongs to one author and one layer; blocks are ``sparse.COO`` (``open_run``) or
  numpy (``xr.open_zarr``);
* ``valid_ADT`` and other per-token variables, chunked ``(1, chunk_docs, n_tok)`` with the same
  doc chunks, so block ``(a, l, c)`` of the SAE array meets block ``(a, c)`` of each of them.

:func:`per_block` runs a kernel of :mod:`saestore.stats.kernels` on every such block pair with
``da.blockwise``; each call returns a small dense partial, and the statistics combine partials with
dask reductions (``sum``/``max`` over the doc-block axis, and over authors when pooled). Memory
stays bounded by one block plus its partial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypedDict

import dask.array as da
import numpy as np
import pandas as pd
import sparse
import xarray as xr
from dask.base import tokenize

from saestore import chunkio, protocol, reader, selection
from saestore.errors import StatsError

__all__ = ["Selection", "SelectionKw", "StatsError", "make_selection", "sae_array", "token_array", "doc_array", "per_block",
           "whole_doc_chunks", "summary_chunks", "summary_array", "scanned_summary_array", "DirectBlocks",
           "ValidFromLengths",
           "check_by", "By", "group_coords", "over_layer_types", "renamed_n"]

LAYER_TYPES = protocol.LAYER_TYPES
By = Literal["author"] | None
LayerTypes = str | Sequence[str] | None
Authors = str | Sequence[str] | None
Layers = int | Sequence[int] | None
Docs = int | slice | Sequence[int] | None
Features = int | Sequence[int] | None


class SelectionKw(TypedDict, total=False):
    """The keyword selection every SAE statistic takes after ``layer_type`` (:func:`make_selection`)."""

    author: Authors  # author name(s); None = all
    layer: Layers  # layer number(s); None = all
    doc: Docs  # document position(s): an int, a slice or a list, taken in stored order; None = all
    feature: Features  # feature id(s); None = all


@dataclass(frozen=True, kw_only=True)
class Selection:
    """What a statistic covers; built by :func:`make_selection`. Indices are positions in the run."""

    layer_types: tuple[str, ...]
    layer_type_scalar: bool
    """True when one layer type was named as a string: results carry it as a scalar coordinate."""
    author_idx: np.ndarray
    authors: np.ndarray
    layer_idx: np.ndarray
    layers: np.ndarray
    layer_scalar: bool
    doc_idx: np.ndarray
    docs: np.ndarray
    feature_idx: np.ndarray | None
    """positions of the selected features, or None for all."""
    features: np.ndarray
    feature_scalar: bool
    n_tok: int
    n_features_total: int

    @property
    def n_features(self) -> int:
        return int(self.features.size)


def check_by(by: str | None) -> By:
    """Normalise ``by``: ``None``/``"pooled"`` pool all selected authors, ``"author"`` keeps them apart."""
    if by in (None, "pooled", "none"):
        return None
    if by == "author":
        return "author"
    raise StatsError(f"by must be 'author' or None (pooled), not {by!r}")


def renamed_n(k: int, n: int | None, where: str, default: int = 10) -> int:
    """``k`` (the name every top-k statistic uses), or the old ``n=`` with a DeprecationWarning."""
    if n is None:
        return k
    if k != default:
        raise StatsError(f"{where}: give k= only (n= is its old name), not both k={k} and n={n}")
    import warnings

    warnings.warn(f"{where}(n=...) is deprecated: use k=", DeprecationWarning, stacklevel=3)
    return n


def make_selection(ds: xr.Dataset, layer_type: LayerTypes = None, *, author: Authors = None, layer: Layers = None,
                   doc: Docs = None, feature: Features = None) -> Selection:
    """Resolve names to positions: authors by name, layers by layer number, docs by position
    (``int``, ``slice`` or list; taken in stored order), features by id. A single layer type,
    layer or feature given as a scalar is dropped from the result's dimensions (kept as a scalar
    coordinate), like ``sel``."""
    present = tuple(lt for lt in LAYER_TYPES if lt in ds.data_vars)
    lts, lt_scalar = selection.layer_types(layer_type, present, error=StatsError)
    if "valid_mask" not in ds.data_vars:
        raise StatsError("the dataset has no valid_mask variable; statistics need it to skip padding")
    authors = np.asarray([str(a) for a in ds["author"].values], dtype=object)
    a_idx, _ = selection.positions("author", author, authors, str, error=StatsError)
    layers = np.asarray(ds["layer"].values)
    l_idx, l_scalar = selection.positions("layer", layer, layers, int, error=StatsError)
    d_idx = selection.doc_positions(doc, int(ds.sizes["doc"]), error=StatsError)
    n_feat = int(ds.sizes["feature"])
    feature_values = np.asarray(ds["feature"].values)
    if feature is None:
        f_idx, f_scalar = None, False
        features = feature_values
    else:
        f_idx, f_scalar = selection.positions("feature", feature, feature_values, int, error=StatsError)
        features = feature_values[f_idx]
    return Selection(layer_types=tuple(lts), layer_type_scalar=lt_scalar, author_idx=a_idx, authors=authors[a_idx],
                     layer_idx=l_idx, layers=layers[l_idx], layer_scalar=l_scalar, doc_idx=d_idx,
                     docs=np.asarray(ds["doc"].values)[d_idx], feature_idx=f_idx, features=features,
                     feature_scalar=f_scalar, n_tok=int(ds.sizes["tok"]), n_features_total=n_feat)


def _dask(ds: xr.Dataset, name: str) -> da.Array:
    var = ds[name]
    if not isinstance(var.data, da.Array):
        var = var.chunk({"author": 1})
    return var.data


def _take(x: da.Array, axis: int, idx: np.ndarray) -> da.Array:
    """Select positions along ``axis``; contiguous runs become slices (pure block extraction)."""
    n = x.shape[axis]
    if idx.size == n and (idx == np.arange(n)).all():
        return x
    index: list[Any] = [slice(None)] * x.ndim
    if idx.size and (np.diff(idx) == 1).all():
        index[axis] = slice(int(idx[0]), int(idx[-1]) + 1)
        return x[tuple(index)]
    if axis < 2:  # author / layer: one chunk each, concatenate single-chunk slices
        parts = []
        for i in idx:
            index[axis] = slice(int(i), int(i) + 1)
            parts.append(x[tuple(index)])
        return da.concatenate(parts, axis=axis)
    index[axis] = idx
    return x[tuple(index)]


def _keep_docs(block: Any, *, axis: int, local: np.ndarray) -> Any:
    """Docs ``local`` (sorted positions) of one block along ``axis``; sparse.COO blocks are filtered
    on their coordinates with numpy (sparse's own indexing JIT-compiles with numba, seconds per
    process)."""
    if isinstance(block, sparse.COO):
        coords = block.coords
        keep = np.isin(coords[axis], local)
        new = coords[:, keep].copy()
        new[axis] = np.searchsorted(local, new[axis])
        shape = list(block.shape)
        shape[axis] = local.size
        return sparse.COO(new, block.data[keep], shape=tuple(shape), has_duplicates=False, sorted=True,
                          fill_value=block.fill_value)
    index: list[Any] = [slice(None)] * np.ndim(block)
    index[axis] = local
    return block[tuple(index)]


def _take_docs(x: da.Array, axis: int, idx: np.ndarray) -> da.Array:
    """Select (sorted) doc positions along ``axis`` block by block: whole blocks are taken as they
    are, partly selected ones are filtered by :func:`_keep_docs`; chunks follow the stored ones."""
    n = x.shape[axis]
    if idx.size == n and (idx == np.arange(n)).all():
        return x
    bounds = np.concatenate([[0], np.cumsum(x.chunks[axis])])
    which = np.searchsorted(bounds, idx, side="right") - 1
    parts = []
    for b in np.unique(which):
        local = idx[which == b] - bounds[b]
        index: list[Any] = [slice(None)] * x.ndim
        index[axis] = slice(int(b), int(b) + 1)
        piece = x.blocks[tuple(index)]
        if local.size < x.chunks[axis][b]:
            chunks = list(piece.chunks)
            chunks[axis] = (local.size,)
            piece = piece.map_blocks(_keep_docs, axis=axis, local=local, chunks=tuple(chunks), dtype=x.dtype,
                                     meta=x._meta)
        parts.append(piece)
    return da.concatenate(parts, axis=axis)


def sae_array(ds: xr.Dataset, sel: Selection, layer_type: str) -> da.Array:
    """``acts_ALDTF`` of the selection, chunked one author and one layer per block, whole tok and
    feature axes per block (features are selected inside the kernels, not here)."""
    x = _dask(ds, layer_type)
    x = _take(x, 0, sel.author_idx)
    x = _take(x, 1, sel.layer_idx)
    x = x.rechunk({0: 1, 1: 1, 3: -1, 4: -1})
    return _take_docs(x, 2, sel.doc_idx)


def whole_doc_chunks(ds: xr.Dataset, sel: Selection, layer_type: str) -> np.ndarray | None:
    """The doc-chunks whose union is the selection's documents, when ``ds`` still has every
    document and token of ``layer_type`` as stored (so stored chunks are exactly its blocks); None
    otherwise."""
    stored = ds[layer_type].encoding.get("preferred_chunks") or {}
    cd, n_doc, n_tok = stored.get("doc"), int(ds.sizes["doc"]), int(ds.sizes["tok"])
    if not cd or stored.get("tok") != n_tok:
        return None  # the dataset was cut along tok after opening
    if "doc_chunk" in ds.sizes and ds.sizes["doc_chunk"] != -(-n_doc // cd):
        return None  # ... or along doc
    if not (np.asarray(ds["doc"].values) == np.arange(n_doc)).all() or sel.doc_idx.size == 0:
        return None
    chunks = np.unique(sel.doc_idx // cd)
    whole = sum(min((c + 1) * cd, n_doc) - c * cd for c in chunks)
    return chunks if whole == np.unique(sel.doc_idx).size else None


def summary_chunks(ds: xr.Dataset, sel: Selection, layer_type: str) -> np.ndarray | None:
    """:func:`whole_doc_chunks` when the run stores the §2.8 summaries of ``layer_type`` (the
    statistic reads them); None otherwise: the statistic scans the SAE blocks."""
    name = protocol.summary_name(layer_type)
    if name not in ds.data_vars or "doc_chunk" not in ds[name].dims:
        return None
    return whole_doc_chunks(ds, sel, layer_type)


def _valid_per_author(ds: xr.Dataset, sel: Selection, layer_type: str, chunks: np.ndarray) -> da.Array:
    """Valid tokens per selected author ``(A',)`` in doc-chunks ``chunks``: from ``chunk_tokens``
    (``open_run``'s snapshot of the progress markers, §3: one small read per shard) when the
    dataset has it, else from ``doc_length`` (§2.5: it counts the document's valid tokens; one
    inner chunk per doc-chunk)."""
    if "chunk_tokens" in ds.data_vars and ds["chunk_tokens"].dims == ("author", "doc_chunk"):
        per_chunk = _take(_dask(ds, "chunk_tokens"), 0, sel.author_idx)
        return _take(per_chunk, 1, chunks).sum(axis=1, dtype=np.int64)
    cd = int(ds[layer_type].encoding["preferred_chunks"]["doc"])
    docs = np.concatenate([np.arange(c * cd, min((c + 1) * cd, int(ds.sizes["doc"]))) for c in chunks])
    lengths = _take(_dask(ds, "doc_length"), 0, sel.author_idx)
    return _take(lengths, 1, docs).sum(axis=1, dtype=np.int64)


def _take_features(block: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return block[:, :, :, idx]


def _summary_rows(ds: xr.Dataset, sel: Selection, name: str, rows: np.ndarray) -> da.Array:
    x = _dask(ds, name)
    x = _take(_take(x, 0, sel.author_idx), 1, sel.layer_idx)
    x = _take(x, 2, rows)
    if sel.feature_idx is None:
        return x
    # the features are taken in the task that reads the block (blockwise, fused with the read), so a
    # block of every feature never outlives its task: dask may run every read before its take
    return x.map_blocks(_take_features, sel.feature_idx, chunks=(*x.chunks[:3], (sel.feature_idx.size,), x.chunks[4]),
                        dtype=x.dtype)


def summary_array(ds: xr.Dataset, sel: Selection, layer_type: str, chunks: np.ndarray, *,
                  rollup: bool = False) -> tuple[da.Array, da.Array]:
    """``summary_ALCF4`` of the selection (doc-chunks ``chunks``, from :func:`summary_chunks`; the
    ``summary`` axis in §2.8 order) and the valid tokens per selected author ``(A',)``. With
    ``rollup`` (for sums and maxima over the chunks, not per-chunk zone maps) a shard whose every
    doc-chunk is selected is one row of the run's shard summaries instead of its doc-chunks' rows
    (``shard_docs / chunk_docs`` times fewer bytes); runs without them (1.2) use the doc-chunks'."""
    shard_name = protocol.shard_summary_name(layer_type)
    rows = [_summary_rows(ds, sel, protocol.summary_name(layer_type), chunks)]
    if rollup and shard_name in ds.data_vars and "shard" in ds[shard_name].dims:
        storage = protocol.read_attrs(ds.attrs).storage
        k, n_c = storage.chunks_per_shard, int(ds.sizes["doc_chunk"])
        covered = np.asarray([s for s in np.unique(chunks // k)
                              if np.isin(np.arange(s * k, min((s + 1) * k, n_c)), chunks).all()], dtype=np.int64)
        if covered.size:
            rest = chunks[~np.isin(chunks // k, covered)]
            rows = [_summary_rows(ds, sel, shard_name, covered)]
            if rest.size:
                rows.append(_summary_rows(ds, sel, protocol.summary_name(layer_type), rest))
    x = rows[0] if len(rows) == 1 else da.concatenate(rows, axis=2)
    return x, _valid_per_author(ds, sel, layer_type, chunks)


def feature_map(sel: Selection) -> np.ndarray | None:
    """The selection's features as a map over all features (int64; position in the selection, -1
    where not selected) for :mod:`saestore.sparse_coo`'s walk; None when every feature is selected."""
    if sel.feature_idx is None:
        return None
    fmap = np.full(sel.n_features_total, -1, dtype=np.int64)
    fmap[sel.feature_idx] = np.arange(sel.feature_idx.size)
    return fmap


def _scan_block(a_1: np.ndarray, l_1: np.ndarray, g_1: np.ndarray, *, src: reader.SparseChunkSource,
                groups: list[np.ndarray], fmap: np.ndarray, n_out: int) -> np.ndarray:
    a, layer, group = int(a_1[0]), int(l_1[0]), groups[int(g_1[0])]
    out = np.zeros((1, 1, group.size, n_out, len(protocol.SUMMARY_FIELDS)), dtype=np.float64)
    for i, c in enumerate(group):
        src.accumulate((a, layer, int(c), 0, 0), out[0, 0, i], fmap)
    return out


def scanned_summary_array(ds: xr.Dataset, sel: Selection, layer_type: str,
                          chunks: np.ndarray) -> tuple[da.Array, da.Array] | None:
    """:func:`summary_array`'s result computed from the SAE chunks themselves, for runs without
    stored summaries (or a caller that drops them): one task per (author, layer, shard) reads its
    chunks' bytes and decodes and reduces them in one compiled pass
    (:func:`saestore.sparse_coo.accumulate`), no ``sparse.COO`` block, coordinates or valid-mask
    product (§2.5: SAE values are exactly 0 at padding). None when ``ds[layer_type]`` is not a
    sparse variable exactly as :func:`~saestore.open_run` made it."""
    src = reader.chunk_source(_dask(ds, layer_type))
    if src is None:
        return None
    per_shard = chunkio.chunks_per_shard(src.array)[2]
    groups = [chunks[chunks // per_shard == s] for s in np.unique(chunks // per_shard)]
    fmap = feature_map(sel)
    fmap = np.arange(sel.n_features_total, dtype=np.int64) if fmap is None else fmap
    idx = [da.from_array(np.asarray(v, dtype=np.int64), chunks=1)
           for v in (sel.author_idx, sel.layer_idx, np.arange(len(groups)))]
    name = "saestore-scan-" + tokenize(_dask(ds, layer_type).name, sel.author_idx, sel.layer_idx, chunks, fmap)
    x = da.blockwise(_scan_block, "alcfs", idx[0], "a", idx[1], "l", idx[2], "c",
                     new_axes={"f": sel.n_features, "s": len(protocol.SUMMARY_FIELDS)},
                     adjust_chunks={"c": tuple(g.size for g in groups)}, dtype=np.float64, name=name,
                     src=src, groups=groups, fmap=fmap, n_out=sel.n_features,
                     meta=np.empty((0,) * 5, dtype=np.float64))
    return x, _valid_per_author(ds, sel, layer_type, chunks)


@dataclass(frozen=True)
class DirectBlocks:
    """The SAE blocks of a selection of whole doc-chunks read straight from the chunk bytes as
    :class:`~saestore.nonzeros.SparseActs` with only the selected features kept, renumbered in
    selection order (so kernels get ``feature_idx=None``): no ``sparse.COO`` block, no dask task
    and no coordinates of unselected features. Block ``(a, l, c)`` is selection author ``a``,
    layer ``l`` and doc-block ``c`` (doc-chunk ``chunks[c]``), like :func:`sae_array`'s blocks."""

    src: reader.SparseChunkSource
    authors: np.ndarray
    layers: np.ndarray
    chunks: np.ndarray
    fmap: np.ndarray | None

    @classmethod
    def of(cls, ds: xr.Dataset, sel: Selection, layer_type: str) -> DirectBlocks | None:
        """None when ``ds[layer_type]`` is not a sparse variable exactly as
        :func:`~saestore.open_run` made it or the documents are not whole doc-chunks."""
        src = reader.chunk_source(_dask(ds, layer_type))
        chunks = whole_doc_chunks(ds, sel, layer_type)
        if src is None or chunks is None:
            return None
        return cls(src, np.asarray(sel.author_idx), np.asarray(sel.layer_idx), chunks, feature_map(sel))

    def block(self, a: int, layer: int, c: int, *_: int) -> Any:
        return self.src.read_acts((int(self.authors[a]), int(self.layers[layer]), int(self.chunks[c]), 0, 0),
                                  self.fmap)

    def array(self, like: da.Array) -> da.Array:
        """The blocks as a dask array chunked like ``like`` (:func:`sae_array` of the selection)."""
        idx = [da.arange(n, chunks=1, dtype=np.int64) for n in (self.authors.size, self.layers.size, self.chunks.size)]
        name = "saestore-acts-" + tokenize(like.name, self.chunks, self.fmap)
        return da.blockwise(_direct_block, "aldtf", idx[0], "a", idx[1], "l", idx[2], "d",
                            new_axes={"t": like.shape[3], "f": like.shape[4]}, adjust_chunks={"d": like.chunks[2]},
                            dtype=like.dtype, name=name, meta=like._meta, blocks=self)


def _direct_block(a_1: np.ndarray, l_1: np.ndarray, c_1: np.ndarray, *, blocks: DirectBlocks) -> Any:
    return blocks.block(int(a_1[0]), int(l_1[0]), int(c_1[0]))


class ValidFromLengths:
    """``valid_mask`` blocks ``(1, D_c, T)`` of a selection from its ``doc_length`` ``(A', D')``
    (§2.5: the valid tokens of a document are exactly its first ``doc_length``), no read."""

    def __init__(self, lengths_AD: np.ndarray, starts: np.ndarray, n_tok: int) -> None:
        self.lengths, self.starts, self.tok = np.asarray(lengths_AD), starts, np.arange(n_tok)

    def block(self, a: int, c: int, *_: int) -> np.ndarray:
        d = self.lengths[a, self.starts[c]:self.starts[c + 1]]
        return (self.tok[None, :] < d[:, None])[None]


def token_array(ds: xr.Dataset, sel: Selection, name: str, like: da.Array) -> da.Array:
    """A per-token variable ``(A', D', T)`` selected like ``like`` and chunked like its doc axis."""
    x = _dask(ds, name)
    x = _take(x, 0, sel.author_idx).rechunk({0: 1, 2: -1})
    x = _take_docs(x, 1, sel.doc_idx)
    return x.rechunk({0: 1, 1: like.chunks[2], 2: -1})


def doc_array(ds: xr.Dataset, sel: Selection, name: str, like: da.Array) -> da.Array:
    """A per-document variable ``(A', D')`` selected like ``like`` and chunked like its doc axis."""
    x = _dask(ds, name)
    x = _take(x, 0, sel.author_idx).rechunk({0: 1})
    x = _take_docs(x, 1, sel.doc_idx)
    return x.rechunk({0: 1, 1: like.chunks[2]})


def index_arrays(sel: Selection, like: da.Array) -> tuple[da.Array, da.Array]:
    """``(author position, doc position)`` within the selection, chunked like ``like``'s author and
    doc axes, so a kernel knows where its block lies."""
    a = da.arange(like.shape[0], chunks=1, dtype=np.int64)
    d = da.arange(like.shape[2], chunks=(like.chunks[2],), dtype=np.int64)
    return a, d


def per_block(
    kernel: Callable[..., Any],
    acts: da.Array,
    tokens: Sequence[da.Array] = (),
    *,
    new_axes: dict[str, int],
    dtype: Any,
    keep_docs: bool = False,
    positions: tuple[da.Array, da.Array] | None = None,
    meta: Any = None,
    out_ind: str | None = None,
    **kwargs: Any,
) -> da.Array:
    """``kernel(acts_block, *token_blocks, [aidx, didx], **kwargs)`` on every SAE block.

    The output has axes ``(author, layer, doc, *new_axes)``; unless ``keep_docs``, the doc axis
    has one entry per doc block (the partials, to be reduced over axis 2).
    """
    args: list[Any] = [acts, "aldtf"]
    for t in tokens:
        args += [t, "adt"]
    if positions is not None:
        args += [positions[0], "a", positions[1], "d"]
    out_ind = out_ind or "ald" + "".join(new_axes)
    if meta is None:
        meta = np.empty((0,) * len(out_ind), dtype=dtype)
    return da.blockwise(partial(_unwrapped, kernel), out_ind, *args, new_axes=new_axes,
                        adjust_chunks=None if keep_docs else {"d": 1}, concatenate=False, dtype=dtype, meta=meta,
                        **kwargs)


def _single(block: Any) -> Any:
    while isinstance(block, list):
        if len(block) != 1:
            # sae_array/token_array rechunk tok and feature to one chunk, so this is saestore's bug
            raise StatsError(f"internal: {len(block)} blocks along a contracted (tok, feature) axis, expected one; "
                             "please report this with the statistic's call")
        block = block[0]
    return block


def _unwrapped(kernel: Callable[..., Any], *blocks: Any, **kwargs: Any) -> Any:
    """Call ``kernel`` on the blocks themselves: with ``concatenate=False`` dask passes the single
    block of each contracted (tok, feature) axis wrapped in lists. Concatenating instead would
    copy every sparse block (``sparse.concatenate`` of one block is not free)."""
    return kernel(*(_single(b) for b in blocks), **kwargs)


def group_coords(sel: Selection, by: By) -> tuple[list[str], dict[str, Any]]:
    """Leading dims and coordinates of a per-(group, layer) result: ``["author", "layer"]`` or ``["layer"]``."""
    coords: dict[str, Any] = {"layer": ("layer", sel.layers)}
    if by == "author":
        coords["author"] = ("author", sel.authors.astype(str))
        return ["author", "layer"], coords
    return ["layer"], coords


T = Any


def over_layer_types(sel: Selection, compute_one: Callable[[str], T], *, squeeze_feature: bool = True) -> T:
    """Run ``compute_one(layer_type)`` for each selected layer type; stack results along
    ``layer_type`` (or keep it as a scalar coordinate when one was named), then drop the ``layer`` /
    ``feature`` dims where the selection named a single one."""
    results = [compute_one(lt) for lt in sel.layer_types]
    if sel.layer_type_scalar:
        out = results[0].assign_coords(layer_type=sel.layer_types[0])
    else:
        out = xr.concat(results, dim=pd.Index(list(sel.layer_types), name="layer_type"), coords="minimal",
                        compat="override", join="override")
    if sel.layer_scalar and "layer" in out.dims:
        out = out.isel(layer=0)
    if squeeze_feature and sel.feature_scalar and "feature" in out.dims:
        out = out.isel(feature=0)
    return out


def select_labels(ds: xr.Dataset, author: Any, layer: Any) -> xr.Dataset:
    """``ds`` restricted to the ``author`` names and ``layer`` numbers (None = all), checked like
    :func:`make_selection` (a :class:`StatsError` names what is missing); dimensions are kept."""
    if author is not None:
        idx, _ = selection.positions("author", author, np.asarray(ds["author"].values), str, error=StatsError)
        ds = ds.isel(author=idx)
    if layer is not None:
        idx, _ = selection.positions("layer", layer, np.asarray(ds["layer"].values), int, error=StatsError)
        ds = ds.isel(layer=idx)
    return ds
