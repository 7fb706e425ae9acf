"""What makes a feature fire: its top-k activating examples (with token windows and document
text) and its top tokens (mean activation by token id).

Both are lazy. Top examples are a dask tree reduction of per-block top-k partials (each carries
the feature's activations in a window around every candidate, so no second pass over the SAE
data is needed); the window tokens and document texts are then gathered from the ``token`` /
``text`` blocks by position, one small task per block. Top tokens combine variable-size
(feature, token id) partials with ``dask.delayed`` — memory grows with the number of distinct
(feature, token) pairs, so select ``feature=`` on large runs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Unpack

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from dask.delayed import Delayed

from saestore.stats import kernels
from saestore.stats._select import (
    DirectBlocks,
    LayerTypes,
    Selection,
    SelectionKw,
    StatsError,
    ValidFromLengths,
    check_by,
    doc_array,
    group_coords,
    index_arrays,
    make_selection,
    over_layer_types,
    per_block,
    renamed_n,
    sae_array,
    summary_array,
    summary_chunks,
    token_array,
)

__all__ = ["top_examples", "top_tokens", "example_table", "context_strings"]


def _lookup(idx: np.ndarray, table: np.ndarray, fill: Any) -> np.ndarray:
    out = np.asarray(table)[np.clip(idx, 0, max(len(table) - 1, 0))] if len(table) else np.full(idx.shape, fill)
    return np.where(idx >= 0, out, fill)


def _gather(pos: np.ndarray, block: np.ndarray, a0: int, d0: int, n_docs_sel: int, n_tok: int,
            window: int | None, fill: Any = "") -> tuple[np.ndarray, np.ndarray]:
    """Values of a per-doc (``window=None``) or per-token block ``(1, dn[, T])`` at the flat
    positions ``pos`` that fall inside it: ``(indices into pos.ravel(), values)``."""
    p = np.asarray(pos).ravel()
    a, rem = np.divmod(p, n_docs_sel * n_tok)
    d, t = np.divmod(rem, n_tok)
    block = np.asarray(block)
    hit = np.flatnonzero((p >= 0) & (a == a0) & (d >= d0) & (d < d0 + block.shape[1]))
    dl = d[hit] - d0
    if window is None:
        return hit, block[0, dl]
    tt = t[hit][:, None] + np.arange(-window, window + 1)[None, :]
    inside = (tt >= 0) & (tt < n_tok)
    vals = block[0, dl[:, None], np.clip(tt, 0, n_tok - 1)]
    return hit, np.where(inside, vals, np.asarray(fill, dtype=vals.dtype))


def _assemble(pos: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], width: int | None, fill: Any,
              dtype: Any) -> np.ndarray:
    shape = (pos.size,) if width is None else (pos.size, width)
    out = np.full(shape, fill, dtype=dtype)
    for idx, vals in parts:
        out[idx] = vals
    return out.reshape(pos.shape if width is None else (*pos.shape, width))


class _Unscheduled:
    """A dask array handed to a task without making its blocks the task's inputs: the task computes
    only the blocks it needs (:func:`_gather_hit_blocks`, :func:`_pruned_top_k`)."""

    def __init__(self, x: da.Array) -> None:
        self.x = x
        self._delayed: np.ndarray | None = None

    def block(self, *index: int) -> Any:
        if self._delayed is None:  # one Delayed per block, sharing the array's graph (no per-block slicing)
            self._delayed = self.x.to_delayed(optimize_graph=False)
        return self._delayed[index].compute(scheduler="sync")


def _gather_hit_blocks(pos: np.ndarray, blocks: _Unscheduled, starts: np.ndarray, n_docs_sel: int, n_tok: int,
                       window: int | None, width: int | None, fill: Any, dtype: Any) -> np.ndarray:
    """:func:`_gather` from the blocks holding a position of ``pos`` only (the others are never read)."""
    p = np.asarray(pos).ravel()
    p = p[p >= 0]
    a, d = p // (n_docs_sel * n_tok), (p // n_tok) % n_docs_sel
    parts = []
    for ai, c in sorted({(int(x), int(y)) for x, y in zip(a, np.searchsorted(starts, d, side="right") - 1,
                                                             strict=True)}):
        parts.append(_gather(pos, blocks.block(ai, c, *(0,) * (blocks.x.ndim - 2)), ai, int(starts[c]),
                             n_docs_sel, n_tok, window, fill))
    return _assemble(pos, parts, width, fill, dtype)


@dataclass(frozen=True)
class _StoreVar:
    """A per-doc or per-token variable read straight from the run's store at the examples'
    positions (``blocks.src.path``; selection author and doc positions ``authors``/``docs``): one
    zarr coordinate selection fetches every inner chunk it needs concurrently. Used with
    :class:`DirectBlocks`, whose examples come from finished doc-chunks only, which are final."""

    path: str
    name: str
    authors: np.ndarray
    docs: np.ndarray


def _var(ds: xr.Dataset, sel: Selection, name: str, acts: da.Array, direct: DirectBlocks | None,
         per_token: bool) -> da.Array | _StoreVar:
    if direct is not None:
        return _StoreVar(direct.src.path, name, np.asarray(sel.author_idx), np.asarray(sel.doc_idx))
    return (token_array if per_token else doc_array)(ds, sel, name, acts)


def _gather_from_store(pos: np.ndarray, var: _StoreVar, n_docs_sel: int, n_tok: int, window: int | None,
                       width: int | None, fill: Any, dtype: Any) -> np.ndarray:
    p = np.asarray(pos).ravel()
    hit = np.flatnonzero(p >= 0)
    a, rem = np.divmod(p[hit], n_docs_sel * n_tok)
    d, t = np.divmod(rem, n_tok)
    arr = zarr.open_array(var.path, path=var.name, mode="r")
    if window is None:
        idx: tuple[np.ndarray, ...] = (var.authors[a], var.docs[d])
        inside = np.ones(hit.size, dtype=bool)
    else:
        tt = t[:, None] + np.arange(-window, window + 1)[None, :]
        inside = (tt >= 0) & (tt < n_tok)
        idx = tuple(np.broadcast_arrays(var.authors[a][:, None], var.docs[d][:, None], np.clip(tt, 0, n_tok - 1)))
    vals = np.asarray(arr.vindex[tuple(i.ravel() for i in idx)] if hit.size else np.zeros(0))
    vals = vals.astype(dtype).reshape(inside.shape)
    return _assemble(pos, [(hit, np.where(inside, vals, np.asarray(fill, dtype=dtype)))], width, fill, dtype)


def _gathered(pos: da.Array, blocks: da.Array | _StoreVar, n_docs_sel: int, n_tok: int, window: int | None,
              fill: Any, dtype: Any) -> da.Array:
    """Lazily gather ``blocks`` (per-doc ``(A', D')`` or per-token ``(A', D', T)``, or a
    :class:`_StoreVar`) at ``pos``, reading only the blocks that hold one of the positions
    (memory: those, one at a time)."""
    # not optimized: an optimized copy of the graph would compute the top k a second time
    pos_one = pos.rechunk(pos.shape).to_delayed(optimize_graph=False).ravel()[0]
    width = None if window is None else 2 * window + 1
    if isinstance(blocks, _StoreVar):
        result = dask.delayed(_gather_from_store)(pos_one, blocks, n_docs_sel, n_tok, window, width, fill, dtype)
    else:
        starts = np.concatenate([[0], np.cumsum(blocks.chunks[1])])
        result = dask.delayed(_gather_hit_blocks)(pos_one, _Unscheduled(blocks), starts, n_docs_sel, n_tok, window,
                                                  width, fill, dtype)
    shape = pos.shape if width is None else (*pos.shape, width)
    return da.from_delayed(result, shape=shape, dtype=dtype)


def example_vars(ds: xr.Dataset, sel: Selection, acts: da.Array, best: da.Array, window: int, *,
                 ranked_by_value: bool = True, direct: DirectBlocks | None = None) -> dict[str, da.Array]:
    """The variables of :func:`top_examples` from merged :func:`kernels.top_k`-layout partials
    ``best`` (``(..., K, 2 + 2·window + 1)``: value, flat position, window activations): ``value``,
    ``example_author``, ``example_doc``, ``example_tok``, ``example_doc_id``, ``tokens``,
    ``window_acts`` and ``text``, each of ``best``'s leading shape (``tokens``/``window_acts`` with
    the window last). Samplers ranking by another score in column 0 (``ranked_by_value=False``)
    take the value from the window's centre. With ``direct`` the texts and tokens are read straight
    from the store (:class:`_StoreVar`)."""
    n_docs_sel, n_tok = acts.shape[2], acts.shape[3]
    value = best[..., 0]
    pos = best[..., 1].astype(np.int64)
    a_pos = da.where(pos >= 0, pos // (n_docs_sel * n_tok), -1)
    d_pos = da.where(pos >= 0, (pos // n_tok) % n_docs_sel, -1)
    t_pos = da.where(pos >= 0, pos % n_tok, -1)
    authors = sel.authors.astype(object)
    text = _gathered(pos, _var(ds, sel, "text", acts, direct, False), n_docs_sel, n_tok, None, "", object)
    return {
        "value": da.where(pos >= 0, value if ranked_by_value else best[..., 2 + window], np.nan),
        "example_author": a_pos.map_blocks(_lookup, table=authors, fill="", dtype=object),
        "example_doc": d_pos.map_blocks(_lookup, table=sel.docs, fill=-1, dtype=np.int64),
        "example_tok": t_pos,
        "example_doc_id": _gathered(pos, _var(ds, sel, "doc_id", acts, direct, False), n_docs_sel, n_tok, None, -1,
                                    np.int64),
        "tokens": window_pieces(ds, sel, acts, pos, text, window, direct),
        "window_acts": best[..., 2:],
        "text": text,
    }


def _pieces(start: np.ndarray, end: np.ndarray, text: np.ndarray) -> np.ndarray:
    """``text[start:end]`` of every window token (``start``/``end`` ``(..., W)``, ``text`` ``(...)``);
    "" where ``start`` is -1 (padding, outside the document, an empty rank)."""
    out = np.full(start.shape, "", dtype=object)
    for idx in zip(*np.nonzero(start >= 0), strict=True):
        out[idx] = str(text[idx[:-1]])[start[idx]:end[idx]]
    return out


def window_pieces(ds: xr.Dataset, sel: Selection, acts: da.Array, pos: da.Array, text: da.Array,
                  window: int, direct: DirectBlocks | None = None) -> da.Array:
    """The text of every token of the windows around the flat positions ``pos``, lazily: the one rule
    every context string is built from (``top_examples`` ``tokens``, so ``example_table``, the dashboard,
    the exports and ``plots.feature_card``). With the token spans of PROTOCOL.md §2.7 (``char_start``/
    ``char_end``) each token's piece is ``text[char_start:char_end]``: the pieces tile the document, so a
    joined window is exactly a substring of it in any script. Runs without them (written before protocol
    1.2 added them) use the stored ``token`` strings, as before (multi-byte characters split over
    tokens then read as U+FFFD)."""
    n_docs_sel, n_tok = acts.shape[2], acts.shape[3]
    if "char_start" not in ds or "char_end" not in ds:
        return _gathered(pos, _var(ds, sel, "token", acts, direct, True), n_docs_sel, n_tok, window, "", object)
    start, end = (_gathered(pos, _var(ds, sel, name, acts, direct, True), n_docs_sel, n_tok, window, -1, np.int64)
                  for name in ("char_start", "char_end"))
    one = [x.rechunk(x.shape).to_delayed().ravel()[0] for x in (start, end, text)]
    return da.from_delayed(dask.delayed(_pieces)(*one), shape=start.shape, dtype=object)


def zone_map_blocks(smax_BF: np.ndarray, k: int) -> np.ndarray:
    """The blocks (rows of ``smax_BF``: each block's stored max per feature, -inf where inactive)
    that can hold one of a feature's k largest values: the k-th largest block max ``T_f`` is a
    value with at least k values at or above it, so a block whose max is below ``T_f`` for every
    feature holds none (ties are kept). At most k blocks per feature, plus ties."""
    if smax_BF.shape[0] > k:
        threshold = -np.partition(-smax_BF, k - 1, axis=0)[k - 1]
    else:
        threshold = np.full(smax_BF.shape[1], -np.inf)
    return np.flatnonzero((np.isfinite(smax_BF) & (smax_BF >= threshold)).any(axis=1))


def _pruned_top_k(smax_ACF: np.ndarray, acts: _Unscheduled, valid: _Unscheduled, authors: list[int], li: int,
                  starts: np.ndarray, *, feature_idx: np.ndarray | None, k: int, window: int,
                  n_docs_sel: int) -> np.ndarray:
    """``(F', k, P)``: the merged :func:`kernels.top_k` of the blocks of ``authors`` at layer
    position ``li``, decoding only blocks whose stored max (``smax_ACF``, -inf where a feature is
    inactive) can enter some feature's top k (:func:`zone_map_blocks`), largest max first, a few at
    a time in threads; before each batch, blocks whose max is below every feature's current k-th
    value are dropped. Memory: the running top k and a batch of blocks."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    n_f = smax_ACF.shape[-1]
    best = np.full((n_f, k, 3 + 2 * window), np.nan)
    best[..., 0], best[..., 1] = -np.inf, kernels.NO_POS
    smax = np.asarray(smax_ACF, dtype=np.float64).reshape(-1, n_f)
    todo = zone_map_blocks(smax, k)
    todo = todo[np.argsort(-smax[todo].max(axis=1), kind="stable")]
    n_par = max(1, min(8, os.cpu_count() or 1))

    def partial_of(b: int) -> np.ndarray:
        ai, c = divmod(int(b), smax_ACF.shape[1])
        a = authors[ai]
        return kernels.top_k(acts.block(a, li, c, 0, 0), valid.block(a, c, 0), np.array([a]),
                             np.arange(starts[c], starts[c + 1]), feature_idx=feature_idx, k=k, window=window,
                             n_docs_sel=n_docs_sel)[0, 0, 0]

    with ThreadPoolExecutor(n_par) as pool:
        while todo.size:
            kth = best[:, k - 1, 0]
            todo = todo[(smax[todo] >= kth).any(axis=1)]
            batch, todo = todo[:n_par], todo[n_par:]
            if batch.size:
                best = kernels.merge_top_k(np.stack([best, *pool.map(partial_of, batch)]), axis=0, keepdims=False,
                                           k=k)
    return best


def _pruned_direct(smax_ACF: np.ndarray, blocks: DirectBlocks, lengths_AD: np.ndarray, authors: list[int], li: int,
                   starts: np.ndarray, n_tok: int, **kw: Any) -> np.ndarray:
    return _pruned_top_k(smax_ACF, blocks, ValidFromLengths(lengths_AD, starts, n_tok), authors, li, starts, **kw)


def _zone_map_best(ds: xr.Dataset, sel: Selection, lt: str, acts: da.Array, valid: da.Array, chunks: np.ndarray,
                   by: str | None, k: int, window: int, direct: DirectBlocks | None) -> da.Array:
    """The top-k partials of :func:`top_examples` through the §2.8 per-chunk max (see
    :func:`_pruned_top_k`), one task per (author group, layer): ``[A',] L', F', k, P``. With
    ``direct`` blocks are read straight from the chunk bytes and valid masks come from
    ``doc_length``; else both are computed from their dask arrays."""
    summ, _ = summary_array(ds, sel, lt, chunks)
    smax = da.where(summ[..., 0] > 0, summ[..., 2], -np.inf)  # (A', L', C', F')
    starts = np.concatenate([[0], np.cumsum(acts.chunks[2])])
    n_a, n_l = acts.shape[0], acts.shape[1]
    groups = [[a] for a in range(n_a)] if by == "author" else [list(range(n_a))]
    shape = (sel.n_features, k, 3 + 2 * window)
    kw = {"k": k, "window": window, "n_docs_sel": acts.shape[2]}
    if direct is not None:
        lengths = doc_array(ds, sel, "doc_length", acts).rechunk(-1)
    out = []
    for g in groups:
        per_layer = []
        for li in range(n_l):
            g_smax = smax[g[0]:g[-1] + 1, li]
            if direct is None:
                res = dask.delayed(_pruned_top_k)(g_smax, _Unscheduled(acts), _Unscheduled(valid), g, li, starts,
                                                  feature_idx=sel.feature_idx, **kw)
            else:
                res = dask.delayed(_pruned_direct)(g_smax, direct, lengths, g, li, starts, acts.shape[3],
                                                   feature_idx=None, **kw)
            per_layer.append(da.from_delayed(res, shape=shape, dtype=np.float64))
        out.append(da.stack(per_layer))
    return da.stack(out) if by == "author" else out[0]


def top_examples(ds: xr.Dataset, layer_type: LayerTypes = None, *, k: int = 10, window: int = 5,
                 by: str | None = None, **selection: Unpack[SelectionKw]) -> xr.Dataset:
    """The ``k`` largest activations of each feature over valid tokens, dims
    ``[author,] layer, feature, rank[, offset]``:

    * ``value``: the activation (NaN for an empty rank, when the feature fired fewer than k times);
    * ``example_author``, ``example_doc`` (doc coordinate), ``example_tok``, ``example_doc_id``;
    * ``tokens`` (``offset = -window … window``): the text of the tokens around it in its document
      ("" outside): with the run's token spans (PROTOCOL.md §2.7) each token's exact piece of ``text``,
      so the joined window is a substring of the document; else the stored ``token`` strings;
    * ``window_acts``: the feature's activation on those tokens (NaN outside the document);
    * ``text``: the document text.

    Ties are broken by position (author, doc, tok), so every scheduler gives the same examples.
    With the §2.8 summaries and a selection of whole doc-chunks, only the doc-chunks whose stored
    max can still enter a feature's top k are decoded; otherwise every block is scanned. Either
    way memory is bounded by k × features × window (plus one block), and the examples are the same.
    """
    by = check_by(by)
    if k < 1 or window < 0:
        raise StatsError(f"need k >= 1 and window >= 0, got k={k}, window={window}")
    sel = make_selection(ds, layer_type, **selection)
    n_w = 2 * window + 1
    merge = partial(kernels.merge_top_k, k=k)

    def one(lt: str) -> xr.Dataset:
        acts = sae_array(ds, sel, lt)
        valid = token_array(ds, sel, "valid_mask", acts)
        n_docs_sel = acts.shape[2]
        # blocks straight from the chunk bytes, selected features only, when the run allows it
        direct = DirectBlocks.of(ds, sel, lt)
        feature_idx = sel.feature_idx if direct is None else None
        chunks = summary_chunks(ds, sel, lt)
        if chunks is not None:
            best = _zone_map_best(ds, sel, lt, acts, valid, chunks, by, k, window, direct)
        else:
            blocks = acts if direct is None else direct.array(acts)
            parts = per_block(kernels.top_k, blocks, [valid], positions=index_arrays(sel, acts),
                              new_axes={"g": sel.n_features, "k": k, "p": 2 + n_w}, dtype=np.float64,
                              feature_idx=feature_idx, k=k, window=window, n_docs_sel=n_docs_sel)
            axes = (2,) if by == "author" else (0, 2)
            best = da.reduction(parts, chunk=merge, combine=merge, aggregate=merge, axis=axes, keepdims=False,
                                dtype=np.float64, concatenate=True, meta=np.empty((0,) * (parts.ndim - len(axes))))
        dims, coords = group_coords(sel, by)
        coords.update(feature=("feature", sel.features), rank=("rank", np.arange(k)),
                      offset=("offset", np.arange(-window, window + 1)))
        dk = [*dims, "feature", "rank"]
        dw = [*dk, "offset"]
        v = example_vars(ds, sel, acts, best, window, direct=direct)
        return xr.Dataset({name: (dw if name in ("tokens", "window_acts") else dk, x) for name, x in v.items()},
                          coords=coords).assign_attrs(k=k, window=window)

    return over_layer_types(sel, one)


def context_strings(tokens_NW: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(left, token, right)`` strings of windows of tokens ``(N, 2·window + 1)`` (the example's
    token in the middle): the window's token texts (:func:`window_pieces`) joined."""
    tok = np.asarray(tokens_NW, dtype=object)
    w = tok.shape[-1] // 2
    join = np.vectorize(lambda *parts: "".join(str(p) for p in parts), otypes=[object])
    left = join(*tok[:, :w].T) if w else np.full(tok.shape[0], "", dtype=object)
    right = join(*tok[:, w + 1:].T) if w else np.full(tok.shape[0], "", dtype=object)
    return left, tok[:, w].astype(object), right


def example_table(examples: xr.Dataset, *, text: bool = False) -> pd.DataFrame:
    """A computed :func:`top_examples` result as one row per example (empty ranks dropped):
    its coordinates (``layer_type``, ``author`` when ``by="author"``, ``layer``, ``feature``,
    ``rank``), ``value``, ``example_author``, ``doc_id``, ``doc`` (position), ``tok``, ``token``,
    ``left_context`` / ``right_context`` (the window's token texts before and after it, joined: with the
    token spans, exactly the document's text there; :func:`window_pieces`),
    ``context`` (all three joined) and, with ``text=True``, the document's full ``text``."""
    lead = [d for d in examples["value"].dims]
    flat = examples.stack(example=lead) if lead else examples.expand_dims("example")
    keep = np.flatnonzero(~np.isnan(np.asarray(flat["value"].values, dtype=np.float64)))
    flat = flat.isel(example=keep)
    cols: dict[str, Any] = {}
    index = flat.indexes.get("example")
    if lead:
        for name in lead:
            cols[name] = np.asarray(index.get_level_values(name))
    for name, coord in examples.coords.items():
        if np.ndim(coord.values) == 0:
            cols[name] = np.repeat(coord.values.item(), keep.size)
    tokens = np.asarray(flat["tokens"].transpose("example", "offset").values, dtype=object).reshape(keep.size, -1)
    left, token, right = context_strings(tokens)
    cols.update(value=flat["value"].values, example_author=flat["example_author"].values,
                doc_id=flat["example_doc_id"].values, doc=flat["example_doc"].values, tok=flat["example_tok"].values,
                token=token, left_context=left, right_context=right, context=left + token + right)
    if text:
        cols["text"] = flat["text"].values
    order = [c for c in ("layer_type", "author", "layer", "feature", "rank") if c in cols]
    return pd.DataFrame({c: cols[c] for c in [*order, *(c for c in cols if c not in order)]})


# --- top tokens --------------------------------------------------------------------------------------


def _tree(fn: Callable[..., Any], parts: list[Delayed], split_every: int = 8) -> Delayed:
    parts = list(parts)
    if len(parts) == 1:
        return dask.delayed(fn)(parts[0])
    while len(parts) > 1:
        parts = [dask.delayed(fn)(*parts[i:i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


TOP_TOKEN_FIELDS: dict[str, tuple[Any, Any]] = {
    "token_id": (np.int64, -1), "token": (object, ""), "mean": (np.float64, np.nan),
    "mean_active": (np.float64, np.nan), "sum": (np.float64, np.nan), "n_active": (np.int64, 0),
    "n_token": (np.int64, 0),
}


Triple = tuple[np.ndarray, np.ndarray, np.ndarray]


def _final_top_tokens(sums: Triple, counts: Triple, n_feat: int, n: int, min_count: int) -> dict[str, np.ndarray]:
    """Rank each feature's (token id) partials into ``(F', n)`` arrays of :data:`TOP_TOKEN_FIELDS`."""
    keys, total, n_active = sums
    ids, occ, text = counts
    f = keys >> kernels.TOKEN_SHIFT
    tid = keys & 0xFFFFFFFF
    j = np.clip(np.searchsorted(ids, tid), 0, max(ids.size - 1, 0))
    n_token = occ[j] if ids.size else np.zeros(0, np.int64)
    ok = n_token >= min_count
    f, tid, total, n_active, n_token, j = f[ok], tid[ok], total[ok], n_active[ok], n_token[ok], j[ok]
    mean = total / n_token
    order = np.lexsort((tid, -mean, f))
    f_sorted = f[order]
    rank = np.arange(order.size) - np.searchsorted(f_sorted, np.arange(n_feat))[f_sorted]
    keep = rank < n
    idx, ff, rr = order[keep], f_sorted[keep], rank[keep]
    out = {name: np.full((n_feat, n), fill, dtype=dt) for name, (dt, fill) in TOP_TOKEN_FIELDS.items()}
    out["token_id"][ff, rr] = tid[idx]
    out["token"][ff, rr] = text[j[idx]]
    out["mean"][ff, rr] = mean[idx]
    out["mean_active"][ff, rr] = total[idx] / n_active[idx]
    out["sum"][ff, rr] = total[idx]
    out["n_active"][ff, rr] = n_active[idx]
    out["n_token"][ff, rr] = n_token[idx]
    return out


def top_tokens(ds: xr.Dataset, layer_type: LayerTypes = None, *, k: int = 10, min_count: int = 1,
               by: str | None = None, n: int | None = None, **selection: Unpack[SelectionKw]) -> xr.Dataset:
    """Per feature, the ``k`` token ids with the highest mean activation over their valid
    occurrences (zeros included), among tokens seen at least ``min_count`` times; dims
    ``[author,] layer, feature, rank``. Variables: ``token_id`` (-1 for an empty rank), ``token``,
    ``mean`` = sum / n_token, ``mean_active`` = sum / n_active, ``sum``, ``n_active`` (occurrences
    where the feature fired), ``n_token`` (occurrences). Ties by token id. ``n=`` is the old name
    of ``k=`` (deprecated)."""
    by = check_by(by)
    n = renamed_n(k, n, "top_tokens")
    if n < 1 or min_count < 1:
        raise StatsError(f"need k >= 1 and min_count >= 1, got k={n}, min_count={min_count}")
    sel: Selection = make_selection(ds, layer_type, **selection)

    def one(lt: str) -> xr.Dataset:
        acts = sae_array(ds, sel, lt)
        xb = acts.to_delayed()
        vb = token_array(ds, sel, "valid_mask", acts).to_delayed()
        ib = token_array(ds, sel, "token_id", acts).to_delayed()
        sb = token_array(ds, sel, "token", acts).to_delayed()
        n_a, n_l, n_c = xb.shape[:3]
        groups = [[a] for a in range(n_a)] if by == "author" else [list(range(n_a))]
        fields: dict[str, list[list[da.Array]]] = {name: [] for name in TOP_TOKEN_FIELDS}
        for g in groups:
            counts = _tree(kernels.merge_token_counts,
                           [dask.delayed(kernels.token_counts)(vb[a, c, 0], ib[a, c, 0], sb[a, c, 0])
                            for a in g for c in range(n_c)])
            per_layer: dict[str, list[da.Array]] = {name: [] for name in TOP_TOKEN_FIELDS}
            for li in range(n_l):
                sums = _tree(kernels.merge_token_sums,
                             [dask.delayed(kernels.token_sums)(xb[a, li, c, 0, 0], vb[a, c, 0], ib[a, c, 0],
                                                               feature_idx=sel.feature_idx)
                              for a in g for c in range(n_c)])
                res = dask.delayed(_final_top_tokens)(sums, counts, sel.n_features, n, min_count)
                for name, (dt, _) in TOP_TOKEN_FIELDS.items():
                    per_layer[name].append(da.from_delayed(dask.delayed(operator.getitem)(res, name),
                                                           shape=(sel.n_features, n), dtype=dt))
            for name in TOP_TOKEN_FIELDS:
                fields[name].append(da.stack(per_layer[name]))
        dims, coords = group_coords(sel, by)
        coords.update(feature=("feature", sel.features), rank=("rank", np.arange(n)))
        out = {}
        for name, stacks in fields.items():
            data = da.stack(stacks) if by == "author" else stacks[0]
            out[name] = ([*dims, "feature", "rank"], data)
        return xr.Dataset(out, coords=coords).assign_attrs(min_count=min_count)

    return over_layer_types(sel, one)
