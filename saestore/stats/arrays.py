"""A selection of one SAE variable as an in-memory array: ``ds.sae.to_csr`` (a scipy.sparse CSR
matrix, token rows × features) and ``ds.sae.dense`` (a dense numpy DataArray, refused above a size).

On ``open_run`` Datasets the SAE variables are dask arrays of ``sparse.COO`` blocks, so
``.values``, ``.to_dataframe()`` and ``.to_netcdf()`` raise ``Cannot convert a sparse array to dense
automatically``; these two are the documented way out. Both read the stored blocks as they are
(one task per block, ``x.blocks[...]``, no dask slicing of sparse blocks) and select authors,
layers, documents and features on the blocks' coordinates with numpy, so they never reach
``sparse``'s numba-compiled indexing (seconds of compilation on the first feature-list selection
in a process). On ``xr.open_zarr`` Datasets (numpy blocks) they work the same.

Rows of the CSR matrix: every (author, layer, doc, tok) of the selection in that (C) order, the
selected authors, layers and features in the order given, documents in stored order, padding
tokens included (as empty rows): row ``((a * L + l) * D + d) * T + t``. ``return_rows=True`` also
returns the coordinates of every row as a pandas DataFrame (``author, layer, doc, tok``).
"""

from __future__ import annotations

from typing import Any, Unpack

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from saestore import protocol
from saestore.errors import StatsError
from saestore.stats._select import Selection, SelectionKw, make_selection

__all__ = ["to_csr", "dense", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 1 << 30


def _select_one(ds: xr.Dataset, var: str, selection: SelectionKw) -> Selection:
    if var not in protocol.LAYER_TYPES or var not in ds.data_vars:
        present = [lt for lt in protocol.LAYER_TYPES if lt in ds.data_vars]
        raise StatsError(f"{var!r} is not an SAE variable of this run; it has {', '.join(present) or 'none'}")
    return make_selection(ds, var, **selection)


def _lookup(n: int, idx: np.ndarray) -> np.ndarray:
    """Position in the selection of every index ``0 … n-1`` (-1: not selected)."""
    out = np.full(n, -1, dtype=np.int64)
    out[idx] = np.arange(idx.size, dtype=np.int64)
    return out


def _block_nonzeros(block: Any, offsets: tuple[int, ...], maps: tuple[np.ndarray, ...],
                    sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, col, value)`` of one stored block's nonzeros inside the selection: the block's
    coordinates (a ``sparse.COO``'s ``coords``/``data``, or ``np.nonzero`` of a numpy block) shifted
    by its offsets and mapped through the selection's lookup tables, all in numpy."""
    if hasattr(block, "coords") and hasattr(block, "data") and not isinstance(block, np.ndarray):
        if getattr(block, "fill_value", 0) != 0:
            raise StatsError(f"SAE blocks must have fill value 0, got {block.fill_value}")
        coords, values = np.asarray(block.coords), np.asarray(block.data)
    else:
        arr = np.asarray(block)
        coords = np.stack(np.nonzero(arr)) if arr.size else np.zeros((arr.ndim, 0), np.int64)
        values = arr[tuple(coords)]
    keep = values != 0
    pos = []
    for axis in range(5):
        p = maps[axis][coords[axis] + offsets[axis]]
        keep &= p >= 0
        pos.append(p)
    a, lay, d, t, f = (p[keep] for p in pos)
    _, n_l, n_d, n_t, _ = sizes
    rows = ((a * n_l + lay) * n_d + d) * n_t + t
    return rows, f, values[keep]


def _nonzeros(ds: xr.Dataset, var: str, sel: Selection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = ds[var].data
    if not isinstance(x, da.Array):
        x = da.from_array(np.asarray(x), chunks=x.shape)
    n_tok = int(ds.sizes["tok"])
    f_idx = np.arange(sel.n_features_total) if sel.feature_idx is None else sel.feature_idx
    idx = (sel.author_idx, sel.layer_idx, sel.doc_idx, np.arange(n_tok), f_idx)
    maps = tuple(_lookup(n, i) for n, i in zip(x.shape, idx, strict=True))
    sizes = tuple(int(i.size) for i in idx)
    starts = [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in x.chunks]
    blocks = x.to_delayed()
    tasks = []
    for b in np.ndindex(*blocks.shape):  # only blocks holding something selected
        if all((maps[ax][starts[ax][b[ax]]:starts[ax][b[ax] + 1]] >= 0).any() for ax in range(5)):
            offsets = tuple(int(starts[ax][b[ax]]) for ax in range(5))
            tasks.append(dask.delayed(_block_nonzeros)(blocks[b], offsets, maps, sizes))
    parts = dask.compute(*tasks)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, x.dtype)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _shape(ds: xr.Dataset, sel: Selection) -> tuple[int, int, int, int, int]:
    return (int(sel.author_idx.size), int(sel.layer_idx.size), int(sel.doc_idx.size), int(ds.sizes["tok"]),
            sel.n_features)


def to_csr(ds: xr.Dataset, var: str, *, return_rows: bool = False, **selection: Unpack[SelectionKw]) -> Any:
    """The selection of SAE variable ``var`` (``res``, ``mlp``, ``att``) as a ``scipy.sparse``
    CSR matrix of shape ``(A·L·D·T, F)``: one row per (author, layer, doc, tok) of the selection in
    that order (row ``((a * L + l) * D + d) * T + t``; padding tokens are empty rows), one column per
    selected feature (in the order given). Selection keywords as for the statistics: ``author``,
    ``layer``, ``doc``, ``feature``. With ``return_rows=True`` returns ``(matrix, rows)``, ``rows`` a
    pandas DataFrame with the ``author, layer, doc, tok`` of every row. Needs scipy.

    >>> m, rows = ds.sae.to_csr("res", layer=3, feature=[4, 9], return_rows=True)  # doctest: +SKIP
    """
    from saestore.extras import require

    require("scipy", what="ds.sae.to_csr")
    import scipy.sparse

    sel = _select_one(ds, var, selection)
    rows, cols, values = _nonzeros(ds, var, sel)
    A, L, D, T, F = _shape(ds, sel)
    order = np.lexsort((cols, rows))
    matrix = scipy.sparse.csr_matrix((values[order], (rows[order], cols[order])), shape=(A * L * D * T, F))
    if not return_rows:
        return matrix
    a, lay, d, t = np.unravel_index(np.arange(A * L * D * T), (A, L, D, T))
    return matrix, pd.DataFrame({"author": sel.authors.astype(str)[a], "layer": sel.layers[lay],
                                 "doc": sel.docs[d], "tok": np.asarray(ds["tok"].values)[t]})


def dense(ds: xr.Dataset, var: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
          **selection: Unpack[SelectionKw]) -> xr.DataArray:
    """The selection of SAE variable ``var`` as a dense numpy-backed DataArray, dims ``author,
    layer, doc, tok, feature`` (a scalar ``layer`` or ``feature`` drops that dim, as in the
    statistics), with the run's coordinates; so ``.values``, ``.to_dataframe()`` and
    ``.to_netcdf()`` work. Refused with :class:`~saestore.errors.StatsError` before anything is
    read when it would take more than ``max_bytes`` (default 1 GiB): select less, raise
    ``max_bytes``, or use :func:`to_csr`."""
    sel = _select_one(ds, var, selection)
    shape = _shape(ds, sel)
    dtype = np.dtype(ds[var].dtype)
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need > max_bytes:
        dims = " x ".join(f"{n} {name}" for n, name in zip(shape, ("author", "layer", "doc", "tok", "feature"),
                                                              strict=True))
        raise StatsError(f"{var} selection ({dims}, {dtype}) is {need:,} bytes dense, over max_bytes={max_bytes:,}; "
                         "select fewer authors/layers/docs/features, pass a larger max_bytes, or use "
                         "ds.sae.to_csr (sparse)")
    rows, cols, values = _nonzeros(ds, var, sel)
    out = np.zeros(shape, dtype=dtype)
    out.reshape(-1, shape[-1])[rows, cols] = values
    result = xr.DataArray(out, dims=("author", "layer", "doc", "tok", "feature"), name=var, coords={
        "author": sel.authors.astype(str), "layer": sel.layers, "doc": sel.docs,
        "tok": np.asarray(ds["tok"].values), "feature": sel.features}, attrs=dict(ds[var].attrs))
    if sel.layer_scalar:
        result = result.isel(layer=0)
    if sel.feature_scalar:
        result = result.isel(feature=0)
    return result
