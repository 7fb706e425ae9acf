"""Per-feature statistics over valid tokens: counts, frequency, sums, means, max, dead and dense
features, value histograms and approximate quantiles, and L0 per token.

Every function takes a run Dataset (``saestore.open_run``: sparse blocks, or ``xr.open_zarr``:
dense blocks — same numbers), a layer type (or several, or None for all) and a selection
(``author``, ``layer``, ``doc``, ``feature``), and returns a *lazy* DataArray/Dataset with
coordinates; ``.compute()`` runs it. ``by="author"`` keeps authors apart (each SAE block belongs to
one author, so grouping is free); ``by=None`` pools the selected authors.

Result dims: ``[layer_type,] [author,] layer, feature, ...`` — ``layer_type``/``layer``/``feature``
are dropped (kept as scalar coordinates) when named by a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Unpack

import dask.array as da
import numpy as np
import xarray as xr

from saestore.stats import kernels
from saestore.stats._select import (
    Authors,
    Docs,
    LayerTypes,
    SelectionKw,
    StatsError,
    check_by,
    group_coords,
    make_selection,
    over_layer_types,
    per_block,
    sae_array,
    scanned_summary_array,
    summary_array,
    summary_chunks,
    token_array,
    whole_doc_chunks,
)

__all__ = [
    "feature_stats", "activation_count", "frequency", "activation_sum", "activation_mean", "activation_max",
    "dead_features", "dense_features", "log_bins", "histogram", "quantiles", "quantiles_from_histogram",
    "l0", "l0_histogram", "l0_summary", "n_valid_tokens",
]



def _n_valid(valid_ADT: da.Array, by: str | None) -> da.Array:
    n = valid_ADT.sum(axis=(1, 2), dtype=np.int64)
    return n if by == "author" else n.sum()


def n_valid_tokens(ds: xr.Dataset, *, by: str | None = None, author: Authors = None, doc: Docs = None) -> xr.DataArray:
    """Number of valid tokens in the selection, per author (``by="author"``) or pooled (lazy)."""
    by = check_by(by)
    sel = make_selection(ds, None, author=author, doc=doc)
    like = sae_array(ds, sel, sel.layer_types[0])
    n = _n_valid(token_array(ds, sel, "valid_mask", like), by)
    if by == "author":
        return xr.DataArray(n, dims=["author"], coords={"author": sel.authors.astype(str)}, name="n_valid")
    return xr.DataArray(n, name="n_valid")


def feature_stats(
    ds: xr.Dataset,
    layer_type: LayerTypes = None,
    *,
    by: str | None = None,
    **selection: Unpack[SelectionKw],
) -> xr.Dataset:
    """One pass over the SAE blocks giving, per feature (dims ``[author,] layer, feature``):

    * ``count`` (int64): valid tokens where the feature is active (nonzero);
    * ``n_valid`` (int64, dims ``[author]``): valid tokens in the selection;
    * ``frequency`` = count / n_valid; ``sum`` (float64); ``mean`` = sum / n_valid (zeros count);
      ``mean_active`` = sum / count (NaN if never active);
    * ``max``: the largest value over valid tokens (zeros included, so 0 for a never-active feature
      of a non-negative SAE; NaN if the selection has no valid token).

    When the run stores the §2.8 doc-chunk summaries and the selection's documents are a union of
    whole doc-chunks, only the summaries (and ``doc_length``) are read; otherwise every selected SAE
    block is scanned. Both give the same numbers.
    """
    by = check_by(by)
    sel = make_selection(ds, layer_type, **selection)

    def one(lt: str) -> xr.Dataset:
        summarized = None
        if (chunks := summary_chunks(ds, sel, lt)) is not None:  # the stored §2.8 summaries
            summarized = summary_array(ds, sel, lt, chunks, rollup=True)
        elif (chunks := whole_doc_chunks(ds, sel, lt)) is not None:  # the same, from the SAE chunks' bytes
            summarized = scanned_summary_array(ds, sel, lt, chunks)
        if summarized is not None:  # count, sum, max per (author, layer, doc-chunk, feature)
            parts, n_author = summarized
            count = parts[..., 0].sum(axis=2)
            total = parts[..., 1].sum(axis=2)
            vmax = da.where(parts[..., 0] > 0, parts[..., 2], -np.inf).max(axis=2)
            n_valid_da = n_author if by == "author" else n_author.sum()
        else:
            acts = sae_array(ds, sel, lt)
            valid = token_array(ds, sel, "valid_mask", acts)
            parts = per_block(kernels.feature_moments, acts, [valid], new_axes={"g": sel.n_features, "s": 3},
                              dtype=np.float64, feature_idx=sel.feature_idx)
            count = parts[..., 0].sum(axis=2)
            total = parts[..., 1].sum(axis=2)
            vmax = parts[..., 2].max(axis=2)
            n_valid_da = _n_valid(valid, by)
        if by is None:
            count, total, vmax = count.sum(axis=0), total.sum(axis=0), vmax.max(axis=0)
        dims, coords = group_coords(sel, by)
        dims = [*dims, "feature"]
        coords["feature"] = ("feature", sel.features)
        n_valid = xr.DataArray(n_valid_da, dims=dims[:-2], name="n_valid")
        count_x = xr.DataArray(count.astype(np.int64), dims=dims, coords=coords)
        total_x = xr.DataArray(total, dims=dims, coords=coords)
        vmax_x = xr.DataArray(vmax, dims=dims, coords=coords)
        safe_n = n_valid.where(n_valid > 0)
        vmax_x = xr.where(count_x < n_valid, np.maximum(vmax_x, 0.0), vmax_x).where(n_valid > 0)
        return xr.Dataset({
            "count": count_x, "n_valid": n_valid, "frequency": count_x / safe_n, "sum": total_x,
            "mean": total_x / safe_n, "mean_active": total_x / count_x.where(count_x > 0), "max": vmax_x,
        })

    return over_layer_types(sel, one)


def activation_count(ds: xr.Dataset, layer_type: LayerTypes = None, **kw: Any) -> xr.DataArray:
    """Valid tokens where each feature is active (see :func:`feature_stats` for the arguments)."""
    return feature_stats(ds, layer_type, **kw)["count"]


def frequency(ds: xr.Dataset, layer_type: LayerTypes = None, **kw: Any) -> xr.DataArray:
    """Fraction of valid tokens where each feature is active."""
    return feature_stats(ds, layer_type, **kw)["frequency"]


def activation_sum(ds: xr.Dataset, layer_type: LayerTypes = None, **kw: Any) -> xr.DataArray:
    """Sum of each feature's activations over valid tokens (float64)."""
    return feature_stats(ds, layer_type, **kw)["sum"]


def activation_mean(ds: xr.Dataset, layer_type: LayerTypes = None, *, over: str = "valid", **kw: Any) -> xr.DataArray:
    """Mean activation over valid tokens (``over="valid"``, zeros included) or over the tokens where
    the feature is active (``over="active"``)."""
    if over not in ("valid", "active"):
        raise StatsError(f"over must be 'valid' or 'active', not {over!r}")
    return feature_stats(ds, layer_type, **kw)["mean" if over == "valid" else "mean_active"]


def activation_max(ds: xr.Dataset, layer_type: LayerTypes = None, **kw: Any) -> xr.DataArray:
    """Largest activation of each feature over valid tokens."""
    return feature_stats(ds, layer_type, **kw)["max"]


def dead_features(ds: xr.Dataset, layer_type: LayerTypes = None, **kw: Any) -> xr.DataArray:
    """True for features never active on a valid token of the selection."""
    return (feature_stats(ds, layer_type, **kw)["count"] == 0).rename("dead")


def dense_features(ds: xr.Dataset, layer_type: LayerTypes = None, *, threshold: float = 0.1,
                   **kw: Any) -> xr.DataArray:
    """True for features active on more than ``threshold`` of the valid tokens."""
    return (feature_stats(ds, layer_type, **kw)["frequency"] > threshold).rename("dense").assign_attrs(
        threshold=threshold)


# --- histograms and quantiles ------------------------------------------------------------------------


def log_bins(lo: float = 1e-3, hi: float = 1e4, per_decade: int = 8) -> np.ndarray:
    """Log-spaced bin edges from ``lo`` to ``hi`` with ``per_decade`` bins per factor of ten."""
    if not 0 < lo < hi or per_decade < 1:
        raise StatsError(f"need 0 < lo < hi and per_decade >= 1, got lo={lo}, hi={hi}, per_decade={per_decade}")
    n = max(1, int(round(np.log10(hi / lo) * per_decade)))
    return np.logspace(np.log10(lo), np.log10(hi), n + 1)


def histogram(
    ds: xr.Dataset,
    layer_type: LayerTypes = None,
    *,
    edges: np.ndarray | None = None,
    by: str | None = None,
    **selection: Unpack[SelectionKw],
) -> xr.DataArray:
    """Counts of each feature's nonzero values per bin, dims ``[author,] layer, feature, bin``.

    ``edges`` (default :func:`log_bins`) are fixed, so partial histograms add up exactly. There are
    ``len(edges) + 1`` bins: bin 0 holds values below ``edges[0]``, bin ``i`` holds
    ``[edges[i-1], edges[i])`` and the last holds values ``>= edges[-1]``; coordinates
    ``bin_lower``/``bin_upper`` give each bin's bounds (±inf at the ends). Zeros (inactive tokens)
    are not counted: they number ``n_valid - count``.
    """
    by = check_by(by)
    edges = np.asarray(log_bins() if edges is None else edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or (np.diff(edges) <= 0).any():
        raise StatsError("edges must be a 1-d increasing array of at least 2 values")
    sel = make_selection(ds, layer_type, **selection)
    nb = edges.size + 1

    def one(lt: str) -> xr.DataArray:
        acts = sae_array(ds, sel, lt)
        valid = token_array(ds, sel, "valid_mask", acts)
        h = per_block(kernels.value_histogram, acts, [valid], new_axes={"g": sel.n_features, "b": nb},
                      dtype=np.int64, feature_idx=sel.feature_idx, edges=edges).sum(axis=2)
        if by is None:
            h = h.sum(axis=0)
        dims, coords = group_coords(sel, by)
        coords.update(feature=("feature", sel.features), bin=("bin", np.arange(nb)),
                      bin_lower=("bin", np.concatenate([[-np.inf], edges])),
                      bin_upper=("bin", np.concatenate([edges, [np.inf]])))
        return xr.DataArray(h, dims=[*dims, "feature", "bin"], coords=coords, name="histogram")

    return over_layer_types(sel, one)


def quantiles_from_histogram(counts_NB: np.ndarray, edges: np.ndarray, q: Sequence[float],
                             n_zero_N: np.ndarray | None = None) -> np.ndarray:
    """Approximate quantiles ``(N, Q)`` from histograms ``(N, len(edges) + 1)`` (see :func:`histogram`).

    The q-quantile is the value at rank ``q · n`` of the ``n`` counted values (plus ``n_zero`` zeros
    in front when given), interpolated inside its bin: geometrically in the log-spaced bins, linearly
    from 0 in the bin below ``edges[0]``; values in the top bin are reported as ``edges[-1]``. The
    error is at most one bin (a factor ``edges[1]/edges[0]``). NaN when there is no value.
    """
    counts = np.asarray(counts_NB, dtype=np.float64)
    lower = np.concatenate([[0.0], edges])
    upper = np.concatenate([edges, [edges[-1]]])
    geometric = np.ones(lower.size, dtype=bool)
    geometric[0] = geometric[-1] = False
    if n_zero_N is not None:
        counts = np.concatenate([np.asarray(n_zero_N, dtype=np.float64)[..., None], counts], axis=-1)
        lower, upper = np.concatenate([[0.0], lower]), np.concatenate([[0.0], upper])
        geometric = np.concatenate([[False], geometric])
    total = counts.sum(axis=-1)
    cum = np.cumsum(counts, axis=-1)
    out = np.full((*counts.shape[:-1], len(q)), np.nan)
    for i, qi in enumerate(q):
        if not 0 <= qi <= 1:
            raise StatsError(f"quantiles must be in [0, 1], got {qi}")
        rank = np.maximum(qi * total, 1e-9)
        j = np.minimum((cum < rank[..., None]).sum(axis=-1), counts.shape[-1] - 1)
        c = np.take_along_axis(counts, j[..., None], -1)[..., 0]
        before = np.take_along_axis(cum, j[..., None], -1)[..., 0] - c
        frac = np.clip((rank - before) / np.where(c > 0, c, 1), 0.0, 1.0)
        lo, hi = lower[j], upper[j]
        geo = geometric[j]
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.where(geo, lo * (hi / np.where(geo, lo, 1.0)) ** frac, lo + (hi - lo) * frac)
        out[..., i] = np.where(total > 0, value, np.nan)
    return out


def quantiles(
    ds: xr.Dataset,
    layer_type: LayerTypes = None,
    q: Sequence[float] = (0.5, 0.9, 0.99),
    *,
    over: str = "active",
    edges: np.ndarray | None = None,
    by: str | None = None,
    **kw: Any,
) -> xr.DataArray:
    """Approximate quantiles of each feature's activations from its :func:`histogram`, dims
    ``[author,] layer, feature, quantile``: over the tokens where it is active (``over="active"``)
    or over all valid tokens, zeros included (``over="valid"``). Within one bin of the exact value
    (see :func:`quantiles_from_histogram`); memory is that of the histograms."""
    if over not in ("active", "valid"):
        raise StatsError(f"over must be 'active' or 'valid', not {over!r}")
    edges = np.asarray(log_bins() if edges is None else edges, dtype=np.float64)
    hist = histogram(ds, layer_type, edges=edges, by=by, **kw)
    qs = [float(x) for x in q]
    if over == "valid":
        n_valid = n_valid_tokens(ds, by=by, author=kw.get("author"), doc=kw.get("doc"))
        n_zero = (n_valid - hist.sum("bin")).astype(np.float64)
    else:
        n_zero = xr.zeros_like(hist.isel(bin=0, drop=True), dtype=np.float64)

    def fn(counts: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        return quantiles_from_histogram(counts, edges, qs, zeros if over == "valid" else None)

    out = xr.apply_ufunc(fn, hist.drop_vars(["bin_lower", "bin_upper", "bin"]), n_zero,
                         input_core_dims=[["bin"], []], output_core_dims=[["quantile"]], dask="parallelized",
                         output_dtypes=[np.float64], dask_gufunc_kwargs={"output_sizes": {"quantile": len(qs)}})
    return out.assign_coords(quantile=qs).rename("quantile_value").assign_attrs(over=over)


# --- L0 ------------------------------------------------------------------------------------------------


def l0(
    ds: xr.Dataset,
    layer_type: LayerTypes = None,
    **selection: Unpack[SelectionKw],
) -> xr.DataArray:
    """Active features per token, dims ``[layer_type,] author, layer, doc, tok`` (int32; -1 at
    padding, like ``token_id``). Lazy and chunked like the run: one int per token."""
    sel = make_selection(ds, layer_type, **selection)

    def one(lt: str) -> xr.DataArray:
        acts = sae_array(ds, sel, lt)
        valid = token_array(ds, sel, "valid_mask", acts)
        x = per_block(kernels.l0_tokens, acts, [valid], new_axes={}, out_ind="aldt", keep_docs=True,
                      dtype=np.int32, feature_idx=sel.feature_idx)
        return xr.DataArray(x, dims=["author", "layer", "doc", "tok"], name="l0",
                            coords={"author": sel.authors.astype(str), "layer": sel.layers, "doc": sel.docs,
                                    "tok": np.asarray(ds["tok"].values)})

    return over_layer_types(sel, one, squeeze_feature=False)


def l0_histogram(
    ds: xr.Dataset,
    layer_type: LayerTypes = None,
    *,
    by: str | None = None,
    **selection: Unpack[SelectionKw],
) -> xr.DataArray:
    """Distribution of L0 over valid tokens: number of tokens with exactly ``l0`` active features,
    dims ``[author,] layer, l0`` with ``l0 = 0 … n_features`` (exact, no binning)."""
    by = check_by(by)
    sel = make_selection(ds, layer_type, **selection)

    def one(lt: str) -> xr.DataArray:
        acts = sae_array(ds, sel, lt)
        valid = token_array(ds, sel, "valid_mask", acts)
        h = per_block(kernels.l0_histogram, acts, [valid], new_axes={"n": sel.n_features + 1}, dtype=np.int64,
                      feature_idx=sel.feature_idx).sum(axis=2)
        if by is None:
            h = h.sum(axis=0)
        dims, coords = group_coords(sel, by)
        coords["l0"] = ("l0", np.arange(sel.n_features + 1))
        return xr.DataArray(h, dims=[*dims, "l0"], coords=coords, name="l0_count")

    return over_layer_types(sel, one, squeeze_feature=False)


def _hist_summary(h_NK: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """``(N, 5 + Q)``: n, mean, std, min, max, then quantiles (inverted CDF) of integer histograms."""
    h = np.asarray(h_NK, dtype=np.float64)
    k = np.arange(h.shape[-1], dtype=np.float64)
    n = h.sum(-1)
    safe = np.where(n > 0, n, np.nan)
    mean = (h * k).sum(-1) / safe
    var = (h * k**2).sum(-1) / safe - mean**2
    present = h > 0
    vmin = np.where(n > 0, np.argmax(present, axis=-1), np.nan)
    vmax = np.where(n > 0, h.shape[-1] - 1 - np.argmax(present[..., ::-1], axis=-1), np.nan)
    cum = np.cumsum(h, -1)
    out = [n, mean, np.sqrt(np.maximum(var, 0)), vmin, vmax]
    for q in qs:
        rank = np.maximum(q * n, 1e-9)
        out.append(np.where(n > 0, (cum < rank[..., None]).sum(-1), np.nan))
    return np.stack(out, axis=-1)


def l0_summary(ds: xr.Dataset, layer_type: LayerTypes = None, *, q: Sequence[float] = (0.05, 0.5, 0.95),
               **kw: Any) -> xr.Dataset:
    """Summary of :func:`l0_histogram`: ``n_tokens``, ``mean``, ``std``, ``min``, ``max`` and the
    quantiles ``q`` as ``p5``, ``p50``, … (exact, inverted-CDF definition: the smallest L0 with at
    least ``q·n`` tokens at or below it), per ``[author,] layer``."""
    hist = l0_histogram(ds, layer_type, **kw)
    qs = [float(x) for x in q]
    names = ["n_tokens", "mean", "std", "min", "max"] + [f"p{100 * x:g}" for x in qs]
    stacked = xr.apply_ufunc(lambda h: _hist_summary(h, qs), hist, input_core_dims=[["l0"]],
                             output_core_dims=[["stat"]], dask="parallelized", output_dtypes=[np.float64],
                             dask_gufunc_kwargs={"output_sizes": {"stat": len(names)}})
    stacked = stacked.assign_coords(stat=names)
    out = xr.Dataset({name: stacked.sel(stat=name, drop=True) for name in names})
    out["n_tokens"] = out["n_tokens"].astype(np.int64)
    return out
