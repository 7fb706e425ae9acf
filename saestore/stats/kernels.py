"""Per-block kernels: one SAE block (sparse.COO, numpy or SparseActs) plus its per-token blocks in, a small
dense partial out. Pure numpy on the nonzeros — no dense copy of a sparse block. (The full scan of
whole doc-chunks skips blocks and kernels: ``sparse_coo.accumulate`` reduces the chunk bytes.)

Shapes: an SAE block is ``acts_11DTF`` (one author, one layer, D docs, T tokens, F features);
per-token blocks are ``*_1DT``. "Rows" index the block's tokens, ``row = d * T + t``. Every kernel
only looks at nonzeros on valid tokens (``valid_1DT``), restricted to ``feature_idx`` when given
(feature positions, remapped to ``0 … F'-1`` in that order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sparse

from saestore.errors import StatsError
from saestore.nonzeros import POOLS, SparseActs, pool

NO_POS = -1.0


def block_nonzeros(acts_11DTF: Any, valid_1DT: np.ndarray,
                   feature_idx: np.ndarray | None = None) -> tuple[SparseActs, np.ndarray]:
    """The nonzeros of a block on valid tokens, features renumbered to ``feature_idx`` order
    (:class:`~saestore.nonzeros.SparseActs`), and the block's ``(D, T)`` valid mask."""
    valid_DT = np.asarray(valid_1DT, dtype=bool)[0]
    if isinstance(acts_11DTF, SparseActs):  # decoded straight from the chunk (_select.source_sae_array)
        nz = acts_11DTF.select_features(feature_idx)
    elif isinstance(acts_11DTF, sparse.SparseArray):
        x = acts_11DTF if isinstance(acts_11DTF, sparse.COO) else sparse.COO(acts_11DTF)
        if x.fill_value != 0:
            raise StatsError(f"SAE blocks must have fill value 0, got {x.fill_value}")
        nz = SparseActs.from_coo(x).select_features(feature_idx)
    else:
        arr = np.asarray(acts_11DTF)[0, 0]
        nz = SparseActs.from_dense(arr if feature_idx is None else arr[..., feature_idx])
    return nz.at_valid(valid_DT), valid_DT


def feature_moments(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, F', 3)`` float64: per feature [active count, sum, max of the nonzeros (-inf if none)]."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    out = np.empty((nz.n_features, 3), dtype=np.float64)
    out[:, 0] = np.bincount(nz.cols, minlength=nz.n_features)
    out[:, 1] = np.bincount(nz.cols, weights=nz.values, minlength=nz.n_features)
    vmax = np.full(nz.n_features, -np.inf)
    np.maximum.at(vmax, nz.cols, nz.values.astype(np.float64))
    out[:, 2] = vmax
    return out[None, None, None]


def value_histogram(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None,
                    edges: np.ndarray) -> np.ndarray:
    """``(1, 1, 1, F', n_bins + 2)`` int64: nonzero values per bin; bin 0 is below ``edges[0]``,
    bin ``i`` is ``[edges[i-1], edges[i])``, the last bin is ``>= edges[-1]``."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    nb = edges.size + 1
    b = np.searchsorted(edges, nz.values, side="right")
    out = np.bincount(nz.cols * nb + b, minlength=nz.n_features * nb).reshape(nz.n_features, nb)
    return out[None, None, None]


def l0_tokens(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, D, T)`` int32: active features per token, -1 at padding."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    l0 = np.bincount(nz.rows, minlength=nz.n_docs * nz.n_tok).reshape(nz.n_docs, nz.n_tok)
    return np.where(valid_DT, l0, -1).astype(np.int32)[None, None]


def l0_histogram(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, F' + 1)`` int64: number of valid tokens with L0 = 0 … F'."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    l0 = np.bincount(nz.rows, minlength=nz.n_docs * nz.n_tok)[valid_DT.ravel()]
    return np.bincount(l0, minlength=nz.n_features + 1)[None, None, None]


def top_k(acts_11DTF: Any, valid_1DT: np.ndarray, aidx_1: np.ndarray, didx_D: np.ndarray, *,
          feature_idx: np.ndarray | None, k: int, window: int, n_docs_sel: int) -> np.ndarray:
    """``(1, 1, 1, F', k, 2 + 2·window + 1)`` float64, per feature its k largest values in the block:
    ``[..., 0]`` value (-inf for an empty slot), ``[..., 1]`` flat position
    ``(author_pos · n_docs_sel + doc_pos) · T + tok`` (-1 if empty), ``[..., 2:]`` the feature's
    activation at ``tok - window … tok + window`` of the same document (NaN outside it or at padding).
    Ties are broken by position, so results do not depend on the chunking or the scheduler."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    n_w = 2 * window + 1
    out = np.full((nz.n_features, k, 2 + n_w), np.nan)
    out[..., 0] = -np.inf
    out[..., 1] = NO_POS
    if nz.values.size:
        order = np.lexsort((nz.rows, -nz.values, nz.cols))
        f_sorted = nz.cols[order]
        starts = np.searchsorted(f_sorted, np.arange(nz.n_features))
        rank = np.arange(order.size) - starts[f_sorted]
        keep = rank < k
        idx, f, r = order[keep], f_sorted[keep], rank[keep]
        rows = nz.rows[idx]
        d_local, t = np.divmod(rows, nz.n_tok)
        out[f, r, 0] = nz.values[idx]
        out[f, r, 1] = ((int(aidx_1[0]) * n_docs_sel + np.asarray(didx_D)[d_local]) * nz.n_tok + t).astype(np.float64)
        out[f, r, 2:] = _window_acts(nz, valid_DT, d_local, t, f, window)
    return out[None, None, None]


def _window_acts(nz: SparseActs, valid_DT: np.ndarray, d_local: np.ndarray, t: np.ndarray, f: np.ndarray,
                 window: int) -> np.ndarray:
    """``(N, 2·window + 1)``: feature ``f[i]``'s activation at tokens ``t[i] - window … t[i] + window``
    of block document ``d_local[i]`` (0 where inactive, NaN outside the document or at padding)."""
    key = nz.rows * nz.n_features + nz.cols
    srt = np.argsort(key, kind="stable")
    key_s, val_s = key[srt], nz.values[srt]
    out = np.full((t.size, 2 * window + 1), np.nan)
    for j, o in enumerate(range(-window, window + 1)):
        tt = t + o
        inside = (tt >= 0) & (tt < nz.n_tok)
        tt_c = np.clip(tt, 0, nz.n_tok - 1)
        ok = inside & valid_DT[d_local, tt_c]
        q = (d_local * nz.n_tok + tt_c) * nz.n_features + f
        i = np.minimum(np.searchsorted(key_s, q), max(key_s.size - 1, 0))
        found = key_s[i] == q if key_s.size else np.zeros(q.shape, dtype=bool)
        out[:, j] = np.where(ok, np.where(found, val_s[i] if key_s.size else 0.0, 0.0), np.nan)
    return out


def _hash01(x: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) for each non-negative int64 (splitmix64's finalizer):
    the same on every machine, so a hash-ranked sample does not depend on chunking or scheduler."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def bin_samples(acts_11DTF: Any, valid_1DT: np.ndarray, aidx_1: np.ndarray, didx_D: np.ndarray, *,
                feature_idx: np.ndarray | None, edges_GB: np.ndarray, m: int, window: int,
                n_docs_sel: int) -> np.ndarray:
    """``(1, 1, 1, F'·B, m, 2 + 2·window + 1)``, in :func:`top_k`'s layout: for each selected
    feature ``g`` and value bin ``b`` (``edges_GB[g, b] <= value < edges_GB[g, b + 1]``, ``B`` =
    ``edges_GB.shape[1] - 1``) at row ``g·B + b`` the ``m`` nonzeros of the block with the highest
    :func:`_hash01` of (flat position, feature); column 0 holds that score, so :func:`merge_top_k`
    keeps a uniform sample of each bin that does not depend on the chunking. The value is the
    window's centre."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    n_b = edges_GB.shape[1] - 1
    out = np.full((nz.n_features * n_b, m, 2 + 2 * window + 1), np.nan)
    out[..., 0] = -np.inf
    out[..., 1] = NO_POS
    if nz.values.size:
        e = np.asarray(edges_GB, dtype=np.float64)[nz.cols]
        b = (nz.values[:, None] >= e).sum(axis=1) - 1
        ok = (b >= 0) & (b < n_b)
        rows, cols, b = nz.rows[ok], nz.cols[ok], b[ok]
        d_local, t = np.divmod(rows, nz.n_tok)
        pos = (int(aidx_1[0]) * n_docs_sel + np.asarray(didx_D)[d_local]) * nz.n_tok + t
        feat = cols if feature_idx is None else np.asarray(feature_idx)[cols]
        score = _hash01(pos * (1 << 20) + feat)
        g = cols * n_b + b
        order = np.lexsort((pos, -score, g))
        g_sorted = g[order]
        rank = np.arange(order.size) - np.searchsorted(g_sorted, np.arange(nz.n_features * n_b))[g_sorted]
        keep = rank < m
        idx, gg, r = order[keep], g_sorted[keep], rank[keep]
        out[gg, r, 0] = score[idx]
        out[gg, r, 1] = pos[idx].astype(np.float64)
        out[gg, r, 2:] = _window_acts(nz, valid_DT, d_local[idx], t[idx], cols[idx], window)
    return out[None, None, None]


def merge_top_k(x: np.ndarray, axis: tuple[int, ...] | int, keepdims: bool, k: int) -> np.ndarray:
    """Reduce top-k partials ``(..., F, K, P)`` over ``axis`` (leading axes only) to the best ``k``
    by value, ties by position (a ``dask.array.reduction`` chunk/combine/aggregate function)."""
    nd = x.ndim
    axes = tuple(sorted(a % nd for a in ((axis,) if isinstance(axis, int) else axis)))
    kept = [i for i in range(nd - 3) if i not in axes]
    y = x.transpose(*kept, nd - 3, *axes, nd - 2, nd - 1)
    y = y.reshape(*y.shape[: len(kept) + 1], -1, y.shape[-1])
    pos = np.where(y[..., 1] < 0, np.inf, y[..., 1])
    order = np.lexsort((pos, -y[..., 0]), axis=-1)[..., :k]
    out = np.take_along_axis(y, order[..., None], axis=-2)
    return np.expand_dims(out, axes) if keepdims else out


def doc_pool(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None, stat: str) -> sparse.COO:
    """``(1, 1, D, F')`` sparse.COO: per document and feature the ``sum``, ``mean`` (over the
    document's valid tokens) or ``max`` (over valid tokens, zeros included) of the activations."""
    if stat not in POOLS:
        raise StatsError(f"stat must be sum, mean or max, not {stat!r}")
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    d, f, data = pool(nz.doc, nz.cols, nz.values, valid_DT.sum(axis=1), nz.n_features, stat)
    zeros = np.zeros(d.size, np.int64)
    return sparse.COO(np.stack([zeros, zeros, d, f]), data, shape=(1, 1, nz.n_docs, nz.n_features),
                      has_duplicates=False, sorted=True, fill_value=0.0)


def metric_sums(acts_11DTF: Any, valid_1DT: np.ndarray, *metrics_1DT: np.ndarray,
                feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, F', 2·M)`` float64: per metric the sum of the metric over tokens where the feature
    is active and the metric finite, and the number of such tokens."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    out = np.empty((nz.n_features, 2 * len(metrics_1DT)))
    for m, metric in enumerate(metrics_1DT):
        mv = np.asarray(metric, dtype=np.float64)[0].ravel()[nz.rows]
        fin = np.isfinite(mv)
        out[:, 2 * m] = np.bincount(nz.cols[fin], weights=mv[fin], minlength=nz.n_features)
        out[:, 2 * m + 1] = np.bincount(nz.cols[fin], minlength=nz.n_features)
    return out[None, None, None]


def cooccurrence(acts_11DTF: Any, valid_1DT: np.ndarray, *, query_idx: np.ndarray,
                 feature_idx: np.ndarray | None, totals: bool = True) -> np.ndarray:
    """``(1, 1, 1, Q (+ 1), F')`` int64: row q counts, for every feature, the tokens where it and query
    feature ``query_idx[q]`` (a position among all features) are both active; with ``totals`` a last
    row counts the tokens where each feature is active. One pass over the pairs (query nonzero,
    feature nonzero) of each token, in numpy: memory is the pairs plus the ``(Q, F')`` output."""
    full, _ = block_nonzeros(acts_11DTF, valid_1DT, None)
    kept = full.select_features(feature_idx)
    n_f = kept.n_features
    uq, inv = np.unique(np.asarray(query_idx, dtype=np.int64), return_inverse=True)
    qpos = np.full(full.n_features, -1, dtype=np.int64)
    qpos[uq] = np.arange(uq.size)
    is_q = qpos[full.cols] >= 0
    q_rows, q_q = full.rows[is_q], qpos[full.cols[is_q]]
    order = np.argsort(kept.rows, kind="stable")
    k_cols = kept.cols[order]
    per_row = np.bincount(kept.rows, minlength=full.n_docs * full.n_tok)
    start = np.cumsum(per_row) - per_row
    n = per_row[q_rows]  # partners of each query nonzero: the kept nonzeros of its token
    first = np.cumsum(n) - n
    idx = np.repeat(start[q_rows] - first, n) + np.arange(int(n.sum()))
    pairs = np.repeat(q_q, n) * n_f + k_cols[idx]
    counts = np.bincount(pairs, minlength=uq.size * n_f).reshape(uq.size, n_f)[inv]
    if totals:
        counts = np.concatenate([counts, np.bincount(kept.cols, minlength=n_f)[None]])
    return counts.astype(np.int64, copy=False)[None, None, None]


#: the values :func:`top_partners` returns per (query, rank), in this order
PARTNER_FIELDS = ("feature", "count", "n_feature", "p_given_query", "lift", "jaccard")


def cooccurrence_scores(count: np.ndarray, n_query: np.ndarray, n_feature: np.ndarray,
                        n_valid: np.ndarray) -> dict[str, np.ndarray]:
    """``p_given_query``, ``lift``, ``jaccard`` from counts (broadcast together; NaN where undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c = count.astype(np.float64)
        p = np.where(n_query > 0, c / n_query, np.nan)
        base = np.where(n_valid > 0, n_feature / n_valid, np.nan)
        lift = np.where(base > 0, p / base, np.nan)
        union = n_query + n_feature - c
        jaccard = np.where(n_query + n_feature > 0, c / union, np.nan)
    return {"p_given_query": p, "lift": lift, "jaccard": jaccard}


def top_partners(count_GLQF: np.ndarray, n_feature_GLF: np.ndarray, n_query_GLQ: np.ndarray,
                 n_valid_G: np.ndarray, *, self_pos: np.ndarray, feature_ids: np.ndarray, k: int,
                 rank_by: str) -> np.ndarray:
    """``(G, L, Q, k, len(PARTNER_FIELDS))`` float64: per query its ``k`` features with the highest
    ``rank_by`` among those active with it at least once, the query itself left out
    (``self_pos[q]``: its position among the features, -1 if it is not one); ties by feature id.
    Empty ranks: feature -1, count and n_feature 0, the rest NaN."""
    nq = n_query_GLQ[..., None].astype(np.float64)
    nf = n_feature_GLF[:, :, None, :].astype(np.float64)
    nv = np.asarray(n_valid_G, dtype=np.float64).reshape(-1, 1, 1, 1)
    if rank_by == "count":
        score = count_GLQF.astype(np.float64)
    else:  # the one score ranked by over every feature; the others only at the chosen ones
        score = cooccurrence_scores(count_GLQF, nq, nf, nv)[rank_by]
    score[np.isnan(score) | (count_GLQF == 0)] = -np.inf
    q_self = np.flatnonzero(self_pos >= 0)
    score[:, :, q_self, self_pos[q_self]] = -np.inf
    ids = np.broadcast_to(np.asarray(feature_ids), score.shape)
    order = np.lexsort((ids, -score), axis=-1)[..., :k]
    ok = np.take_along_axis(score, order, axis=-1) > -np.inf
    count = np.take_along_axis(count_GLQF, order, axis=-1)
    n_feature = np.take_along_axis(np.broadcast_to(nf, score.shape), order, axis=-1)
    values = {"feature": np.take_along_axis(ids, order, axis=-1), "count": count, "n_feature": n_feature,
              **cooccurrence_scores(count, nq, n_feature, nv)}
    out = np.full((*order.shape, len(PARTNER_FIELDS)), np.nan)
    for i, name in enumerate(PARTNER_FIELDS):
        out[..., i] = np.where(ok, values[name], {"feature": -1, "count": 0, "n_feature": 0}.get(name, np.nan))
    return out


# --- top tokens: variable-size partials, combined with dask.delayed -----------------------------------

TOKEN_SHIFT = 32


def token_sums(acts_11DTF: Any, valid_1DT: np.ndarray, token_id_1DT: np.ndarray, *,
               feature_idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(key, sum, n_active)`` per (feature, token id) present in the block; ``key = f << 32 | token_id``."""
    nz, valid_DT = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    tid = np.asarray(token_id_1DT, dtype=np.int64)[0].ravel()[nz.rows]
    key = (nz.cols << TOKEN_SHIFT) | (tid & 0xFFFFFFFF)
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq, np.bincount(inv, weights=nz.values, minlength=uniq.size), np.bincount(inv, minlength=uniq.size)


def merge_token_sums(*parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add up :func:`token_sums` partials."""
    key = np.concatenate([p[0] for p in parts])
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=np.concatenate([p[1] for p in parts]), minlength=uniq.size)
    cnt = np.bincount(inv, weights=np.concatenate([p[2] for p in parts]), minlength=uniq.size)
    return uniq, sums, cnt.astype(np.int64)


def token_counts(valid_1DT: np.ndarray, token_id_1DT: np.ndarray, token_1DT: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(token_id, occurrences, token text)`` over the valid tokens of a block, ids sorted."""
    valid = np.asarray(valid_1DT, dtype=bool)[0]
    ids = np.asarray(token_id_1DT, dtype=np.int64)[0][valid]
    text = np.asarray(token_1DT, dtype=object)[0][valid]
    uniq, first, cnt = np.unique(ids, return_index=True, return_counts=True)
    return uniq, cnt, text[first]


def merge_token_counts(*parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add up :func:`token_counts` partials (the text of a token id is taken from its first part)."""
    ids = np.concatenate([p[0] for p in parts])
    uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    cnt = np.bincount(inv, weights=np.concatenate([p[1] for p in parts]), minlength=uniq.size).astype(np.int64)
    text = np.concatenate([np.asarray(p[2], dtype=object) for p in parts])[first] if ids.size else \
        np.zeros(0, dtype=object)
    return uniq, cnt, text
