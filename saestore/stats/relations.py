"""Features in relation to documents, authors, other features and the model's loss:
per-document pooled vectors, author specificity, co-occurrence, and mean ce_loss / entropy on
tokens where a feature is active vs not. All lazy; see :mod:`saestore.stats.core` for the
selection arguments and result dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import sparse
import xarray as xr

from saestore import selection
from saestore.errors import StatsError
from saestore.stats import _select, kernels
from saestore.stats._registry import RANK_BY
from saestore.stats.core import feature_stats

__all__ = ["doc_vectors", "author_specificity", "top_author_features", "cooccurrence", "metric_by_activity"]

POOL_STATS = ("sum", "mean", "max")


def doc_vectors(
    ds: xr.Dataset,
    layer_type: str | Sequence[str] | None = None,
    *,
    stats: Sequence[str] = POOL_STATS,
    author: str | Sequence[str] | None = None,
    layer: int | Sequence[int] | None = None,
    doc: int | slice | Sequence[int] | None = None,
    feature: int | Sequence[int] | None = None,
) -> xr.Dataset:
    """Per-document pooled feature vectors over valid tokens, dims ``author, layer, doc, feature``,
    backed by dask arrays of ``sparse.COO`` blocks (float64, fill 0) whatever the input blocks:

    * ``sum``: Σ_t acts; ``mean``: sum / doc length (0 for a missing, empty document);
    * ``max``: the largest value over the document's valid tokens (zeros included).

    ``.compute()`` gives sparse arrays (``.data.todense()`` for numpy).
    """
    bad = set(stats) - set(POOL_STATS)
    if bad or not stats:
        raise StatsError(f"stats must be a non-empty subset of {POOL_STATS}, got {list(stats)}")
    sel = _select.make_selection(ds, layer_type, author=author, layer=layer, doc=doc, feature=feature)
    meta = sparse.COO.from_numpy(np.zeros((0, 0, 0, 0)))

    def one(lt: str) -> xr.Dataset:
        acts = _select.sae_array(ds, sel, lt)
        valid = _select.token_array(ds, sel, "valid_mask", acts)
        coords = {"author": sel.authors.astype(str), "layer": sel.layers, "doc": sel.docs, "feature": sel.features}
        out = {}
        for stat in stats:
            x = _select.per_block(kernels.doc_pool, acts, [valid], new_axes={"g": sel.n_features}, out_ind="aldg",
                          keep_docs=True, dtype=np.float64, meta=meta, feature_idx=sel.feature_idx, stat=stat)
            out[stat] = (["author", "layer", "doc", "feature"], x)
        return xr.Dataset(out, coords=coords)

    return _select.over_layer_types(sel, one)


def author_specificity(
    ds: xr.Dataset,
    layer_type: str | Sequence[str] | None = None,
    *,
    alpha: float = 0.5,
    author: str | Sequence[str] | None = None,
    layer: int | Sequence[int] | None = None,
    doc: int | slice | Sequence[int] | None = None,
    feature: int | Sequence[int] | None = None,
) -> xr.Dataset:
    """How much each feature's firing frequency separates each author from the other selected
    authors, dims ``author, layer, feature``.

    With ``c`` = tokens of author *a* where the feature fires, ``n`` = valid tokens of *a*, and
    ``c'``, ``n'`` the same summed over the other authors, the smoothed log-odds ratio is

        log_odds = log((c + α) / (n − c + α)) − log((c' + α) / (n' − c' + α))

    (additive smoothing α, default 0.5: Haldane–Anscombe), with approximate variance
    ``1/(c+α) + 1/(n−c+α) + 1/(c'+α) + 1/(n'−c'+α)`` and ``z = log_odds / sqrt(variance)``. Rank by
    ``z`` to favour features with enough evidence (many counts), by ``log_odds`` for effect size.
    Variables: ``log_odds``, ``z``, ``count``, ``n_valid``, ``count_rest``, ``n_rest``,
    ``frequency``, ``frequency_rest``.
    """
    if alpha <= 0:
        raise StatsError(f"alpha must be positive, got {alpha}")
    fs = feature_stats(ds, layer_type, by="author", author=author, layer=layer, doc=doc, feature=feature)
    if fs.sizes["author"] < 2:
        raise StatsError("author specificity needs at least two authors in the selection")
    c = fs["count"].astype(np.float64)
    n = fs["n_valid"].astype(np.float64)
    c_rest = c.sum("author") - c
    n_rest = n.sum("author") - n
    log_odds = (np.log((c + alpha) / (n - c + alpha)) - np.log((c_rest + alpha) / (n_rest - c_rest + alpha)))
    var = 1 / (c + alpha) + 1 / (n - c + alpha) + 1 / (c_rest + alpha) + 1 / (n_rest - c_rest + alpha)
    return xr.Dataset({
        "log_odds": log_odds, "z": log_odds / np.sqrt(var), "count": fs["count"], "n_valid": fs["n_valid"],
        "count_rest": c_rest.astype(np.int64), "n_rest": n_rest.astype(np.int64), "frequency": fs["frequency"],
        "frequency_rest": c_rest / n_rest.where(n_rest > 0),
    }).assign_attrs(alpha=alpha, formula="log((c+a)/(n-c+a)) - log((c'+a)/(n'-c'+a))")


def _top_idx(score: np.ndarray, n: int) -> np.ndarray:
    s = np.where(np.isnan(score), -np.inf, score)
    order = np.argsort(-s, axis=-1, kind="stable")
    return order[..., :n]


def top_author_features(
    ds: xr.Dataset,
    layer_type: str | Sequence[str] | None = None,
    *,
    k: int = 10,
    score: str = "z",
    alpha: float = 0.5,
    n: int | None = None,
    **sel: Any,
) -> xr.Dataset:
    """For each author the ``k`` features with the highest :func:`author_specificity` ``score``
    (``"z"`` or ``"log_odds"``), dims ``[layer_type,] author, layer, rank``; variables ``feature``
    and the specificity variables at those features. Ties by feature id. ``n=`` is the old name of
    ``k=`` (deprecated)."""
    n = _select.renamed_n(k, n, "top_author_features")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise StatsError(f"k must be a positive integer, not {n!r}")
    if score not in ("z", "log_odds"):
        raise StatsError(f"score must be 'z' or 'log_odds', not {score!r}")
    spec = author_specificity(ds, layer_type, alpha=alpha, **sel)
    n = min(n, spec.sizes["feature"])
    idx = xr.apply_ufunc(_top_idx, spec[score], kwargs={"n": n}, input_core_dims=[["feature"]],
                         output_core_dims=[["rank"]], dask="parallelized", output_dtypes=[np.int64],
                         dask_gufunc_kwargs={"output_sizes": {"rank": n}})

    def take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.take_along_axis(values, index, axis=-1)

    out = {"feature": xr.apply_ufunc(take, spec["feature"].broadcast_like(spec[score]), idx,
                                     input_core_dims=[["feature"], ["rank"]], output_core_dims=[["rank"]],
                                     dask="parallelized", output_dtypes=[np.int64], exclude_dims={"feature"})}
    for name in ("z", "log_odds", "count", "frequency", "frequency_rest"):
        var = spec[name].broadcast_like(spec[score])
        out[name] = xr.apply_ufunc(take, var, idx, input_core_dims=[["feature"], ["rank"]],
                                   output_core_dims=[["rank"]], dask="parallelized", output_dtypes=[var.dtype],
                                   exclude_dims={"feature"})
    return xr.Dataset(out).drop_vars("feature", errors="ignore").assign(feature=out["feature"]).assign_coords(
        rank=np.arange(n))


#: memory for one batch of query rows (Q_batch × features int64 counts) in ``cooccurrence(top_k=)``
QUERY_BATCH_BYTES = 64 << 20


def cooccurrence(
    ds: xr.Dataset,
    layer_type: str | Sequence[str] | None = None,
    *,
    feature: int | Sequence[int],
    others: int | Sequence[int] | None = None,
    by: str | None = None,
    top_k: int | None = None,
    rank_by: str = "jaccard",
    author: str | Sequence[str] | None = None,
    layer: int | Sequence[int] | None = None,
    doc: int | slice | Sequence[int] | None = None,
) -> xr.Dataset:
    """Which features fire on the same valid tokens as ``feature`` (the query; a list gives a
    ``query`` dim), dims ``[author,] layer, [query,] feature`` over ``others`` (default all):

    * ``count``: tokens where both are active; ``n_query``, ``n_feature``: tokens where each is;
    * ``p_given_query`` = count / n_query; ``lift`` = p_given_query / (n_feature / n_valid);
    * ``jaccard`` = count / (n_query + n_feature − count).

    That result is dense, (queries × features) float64 per variable: for many queries give
    ``top_k=K``: per query its ``K`` partners with the highest ``rank_by`` (``jaccard``, the
    default, ``count``, ``p_given_query`` or ``lift``) among the features active with it at least
    once, the query itself left out, ties by feature id; dims ``[author,] layer, [query,] rank``,
    variables ``feature`` (-1 for an empty rank), ``count``, ``n_feature``, ``p_given_query``,
    ``lift``, ``jaccard``, plus ``n_query`` and ``n_valid``. Queries are counted in batches
    (:data:`QUERY_BATCH_BYTES` of counts each), so memory does not grow with the number of queries.
    """
    by = _select.check_by(by)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise StatsError(f"top_k must be a positive integer or None (every feature), not {top_k!r}")
    if rank_by not in RANK_BY:
        raise StatsError(f"rank_by must be one of {', '.join(RANK_BY)}, not {rank_by!r}")
    sel = _select.make_selection(ds, layer_type, author=author, layer=layer, doc=doc, feature=others)
    query_idx, q_scalar = selection.positions("feature", feature, np.asarray(ds["feature"].values), int,
                                              error=StatsError)
    queries = np.asarray(ds["feature"].values)[query_idx]
    n_q = query_idx.size

    def one(lt: str) -> xr.Dataset:
        acts = _select.sae_array(ds, sel, lt)
        valid = _select.token_array(ds, sel, "valid_mask", acts)
        stats_q = _select.per_block(kernels.feature_moments, acts, [valid], new_axes={"g": n_q, "s": 3}, dtype=np.float64,
                            feature_idx=query_idx)[..., 0]
        n_query = stats_q.sum(axis=2).astype(np.int64)
        n_valid = valid.sum(axis=(1, 2), dtype=np.int64)
        dims, coords = _select.group_coords(sel, by)
        coords.update(feature=("feature", sel.features), query=("query", queries))
        if top_k is not None:
            return _top_partners(acts, valid, n_query, n_valid, dims, coords)
        parts = _select.per_block(kernels.cooccurrence, acts, [valid], new_axes={"q": n_q + 1, "g": sel.n_features},
                          dtype=np.int64, query_idx=query_idx, feature_idx=sel.feature_idx)
        counts = parts.sum(axis=2)
        if by is None:
            counts, n_query, n_valid = counts.sum(axis=0), n_query.sum(axis=0), n_valid.sum()

        def wrap(x: da.Array, d: list[str]) -> xr.DataArray:
            return xr.DataArray(x, dims=d, coords={k: v for k, v in coords.items() if v[0] in d})

        both = wrap(counts[..., :n_q, :], [*dims, "query", "feature"])
        n_feature = wrap(counts[..., n_q, :], [*dims, "feature"])
        nq = wrap(n_query, [*dims, "query"])
        nv = xr.DataArray(n_valid, dims=dims[:-1])
        p = both / nq.where(nq > 0)
        base = n_feature / nv.where(nv > 0)
        return xr.Dataset({
            "count": both, "n_query": nq, "n_feature": n_feature, "n_valid": nv, "p_given_query": p,
            "lift": p / base.where(base > 0), "jaccard": both / (nq + n_feature - both).where(nq + n_feature > 0),
        })

    def _top_partners(acts: da.Array, valid: da.Array, n_query: da.Array, n_valid: da.Array, dims: list[str],
                      coords: dict[str, Any]) -> xr.Dataset:
        n_f = sel.n_features
        k = min(int(top_k), n_f)
        n_feature = _select.per_block(kernels.feature_moments, acts, [valid], new_axes={"g": n_f, "s": 3},
                                      dtype=np.float64, feature_idx=sel.feature_idx)[..., 0].sum(axis=2)
        if by is None:  # one group of all authors, kept as a leading axis of size 1 until the end
            n_feature, n_query = n_feature.sum(axis=0, keepdims=True), n_query.sum(axis=0, keepdims=True)
            n_valid = n_valid.sum(keepdims=True)
        n_feature, n_valid = n_feature.astype(np.int64), n_valid.rechunk(1)
        position = {int(f): i for i, f in enumerate(sel.feature_idx if sel.feature_idx is not None else range(n_f))}
        self_pos = np.array([position.get(int(q), -1) for q in query_idx], dtype=np.int64)
        batch = max(1, QUERY_BATCH_BYTES // (8 * n_f))
        tops = []
        for b0 in range(0, n_q, batch):
            qb = slice(b0, min(b0 + batch, n_q))
            counts = _select.per_block(kernels.cooccurrence, acts, [valid], new_axes={"q": qb.stop - b0, "g": n_f},
                                       dtype=np.int64, query_idx=query_idx[qb], feature_idx=sel.feature_idx,
                                       totals=False).sum(axis=2)
            if by is None:
                counts = counts.sum(axis=0, keepdims=True)
            nq = n_query[..., qb].rechunk({2: -1})
            tops.append(da.blockwise(kernels.top_partners, "glqkv", counts, "glqf", n_feature, "glf", nq, "glq",
                                     n_valid, "g", new_axes={"k": k, "v": len(kernels.PARTNER_FIELDS)},
                                     concatenate=True, dtype=np.float64, self_pos=self_pos[qb],
                                     feature_ids=sel.features, k=k, rank_by=rank_by))
        top = da.concatenate(tops, axis=2)
        if by is None:
            top, n_query, n_valid = top[0], n_query[0], n_valid[0]
        coords = {**{name: c for name, c in coords.items() if name != "feature"}, "rank": ("rank", np.arange(k))}
        d = [*dims, "query", "rank"]
        out: dict[str, Any] = {}
        for i, name in enumerate(kernels.PARTNER_FIELDS):
            x = top[..., i]
            out[name] = (d, x.astype(np.int64) if name in ("feature", "count", "n_feature") else x)
        out["n_query"] = ([*dims, "query"], n_query)
        out["n_valid"] = (dims[:-1], n_valid)
        return xr.Dataset(out, coords=coords).assign_attrs(top_k=k, rank_by=rank_by)

    out = _select.over_layer_types(sel, one)
    return out.isel(query=0) if q_scalar else out


def metric_by_activity(
    ds: xr.Dataset,
    layer_type: str | Sequence[str] | None = None,
    *,
    metrics: Sequence[str] = ("ce_loss", "entropy"),
    by: str | None = None,
    author: str | Sequence[str] | None = None,
    layer: int | Sequence[int] | None = None,
    doc: int | slice | Sequence[int] | None = None,
    feature: int | Sequence[int] | None = None,
) -> xr.Dataset:
    """Mean of per-token metrics (``ce_loss``, ``entropy``) on valid tokens where each feature is
    active vs where it is not, dims ``[author,] layer, feature``. For each metric ``m``:
    ``m_active``, ``m_inactive``, ``m_diff`` (active − inactive; NaN where either side is empty);
    plus ``n_active``/``n_inactive`` (valid tokens with a finite first metric). Tokens where a
    metric is NaN are left out of that metric."""
    by = _select.check_by(by)
    metrics = list(metrics)
    for m in metrics:
        if m not in ds.data_vars or ds[m].dims != ("author", "doc", "tok"):
            raise StatsError(f"{m!r} is not a per-token variable of this run")
    if not metrics:
        raise StatsError("name at least one metric")
    sel = _select.make_selection(ds, layer_type, author=author, layer=layer, doc=doc, feature=feature)

    def one(lt: str) -> xr.Dataset:
        acts = _select.sae_array(ds, sel, lt)
        valid = _select.token_array(ds, sel, "valid_mask", acts)
        mvals = [_select.token_array(ds, sel, m, acts) for m in metrics]
        parts = _select.per_block(kernels.metric_sums, acts, [valid, *mvals],
                          new_axes={"g": sel.n_features, "s": 2 * len(metrics)}, dtype=np.float64,
                          feature_idx=sel.feature_idx).sum(axis=2)
        dims, coords = _select.group_coords(sel, by)
        coords["feature"] = ("feature", sel.features)
        out: dict[str, xr.DataArray] = {}
        for i, (m, mv) in enumerate(zip(metrics, mvals, strict=True)):
            fin = valid & da.isfinite(mv)
            total = da.where(fin, mv, 0).astype(np.float64).sum(axis=(1, 2))
            n_tot = fin.sum(axis=(1, 2), dtype=np.int64)
            s_act, n_act = parts[..., 2 * i], parts[..., 2 * i + 1]
            if by is None:
                total, n_tot, s_act, n_act = total.sum(), n_tot.sum(), s_act.sum(axis=0), n_act.sum(axis=0)
            s_act_x = xr.DataArray(s_act, dims=[*dims, "feature"], coords=coords)
            n_act_x = xr.DataArray(n_act, dims=[*dims, "feature"], coords=coords)
            total_x = xr.DataArray(total, dims=dims[:-1])
            n_tot_x = xr.DataArray(n_tot, dims=dims[:-1])
            n_in = n_tot_x - n_act_x
            active = s_act_x / n_act_x.where(n_act_x > 0)
            inactive = (total_x - s_act_x) / n_in.where(n_in > 0)
            out[f"{m}_active"], out[f"{m}_inactive"], out[f"{m}_diff"] = active, inactive, active - inactive
            if i == 0:
                out["n_active"], out["n_inactive"] = n_act_x.astype(np.int64), n_in.astype(np.int64)
        return xr.Dataset(out)

    return _select.over_layer_types(sel, one)
