"""Per-block kernels: one SAE block (sparse.COO or numpy) plus its per-token blocks in, a small
dense partial out. Pure numpy on the nonzeros — no dense copy of a sparse block, no numba.

Shapes: an SAE block is ``acts_11DTF`` (one author, one layer, D docs, T tokens, F features);
per-token blocks are ``*_1DT``. "Rows" index the block's tokens, ``row = d * T + t``. Every kernel
only looks at nonzeros on valid tokens (``valid_1DT``), restricted to ``feature_idx`` when given
(feature positions, remapped to ``0 … F'-1`` in that order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sparse

from saestore.errors import StatsError

NO_POS = -1.0


@dataclass(frozen=True)
class Nonzeros:
    """The valid nonzeros of one block: ``rows`` (int64), ``feat`` (int64, remapped), ``vals`` (float32)."""

    rows: np.ndarray
    feat: np.ndarray
    vals: np.ndarray
    n_docs: int
    n_tok: int
    n_feat: int
    valid_DT: np.ndarray


def block_nonzeros(acts_11DTF: Any, valid_1DT: np.ndarray, feature_idx: np.ndarray | None = None) -> Nonzeros:
    """Nonzeros of a block on valid tokens, in row-major order of (row, original feature)."""
    valid_DT = np.asarray(valid_1DT, dtype=bool)[0]
    n_docs, n_tok = valid_DT.shape
    if isinstance(acts_11DTF, sparse.SparseArray):
        x = acts_11DTF if isinstance(acts_11DTF, sparse.COO) else sparse.COO(acts_11DTF)
        if x.fill_value != 0:
            raise StatsError(f"SAE blocks must have fill value 0, got {x.fill_value}")
        n_feat = x.shape[4]
        c = x.coords
        rows = c[2].astype(np.int64) * n_tok + c[3]
        feat = c[4].astype(np.int64)
        vals = x.data
        keep = valid_DT.ravel()[rows] & (vals != 0)
        if feature_idx is not None:
            lut = np.full(n_feat, -1, dtype=np.int64)
            lut[feature_idx] = np.arange(feature_idx.size)
            feat = lut[feat]
            keep &= feat >= 0
            n_feat = int(feature_idx.size)
        if not keep.all():
            rows, feat, vals = rows[keep], feat[keep], vals[keep]
    else:
        arr = np.asarray(acts_11DTF)[0, 0]
        if feature_idx is not None:
            arr = arr[..., feature_idx]
        n_feat = arr.shape[-1]
        d, t, feat = np.nonzero(arr)
        vals = arr[d, t, feat]
        keep = valid_DT[d, t]
        rows = d.astype(np.int64) * n_tok + t
        feat = feat.astype(np.int64)
        if not keep.all():
            rows, feat, vals = rows[keep], feat[keep], vals[keep]
    return Nonzeros(rows=rows, feat=feat, vals=np.asarray(vals, dtype=np.float32), n_docs=n_docs, n_tok=n_tok,
                    n_feat=n_feat, valid_DT=valid_DT)


def feature_moments(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, F', 3)`` float64: per feature [active count, sum, max of the nonzeros (-inf if none)]."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    out = np.empty((nz.n_feat, 3), dtype=np.float64)
    out[:, 0] = np.bincount(nz.feat, minlength=nz.n_feat)
    out[:, 1] = np.bincount(nz.feat, weights=nz.vals, minlength=nz.n_feat)
    vmax = np.full(nz.n_feat, -np.inf)
    np.maximum.at(vmax, nz.feat, nz.vals.astype(np.float64))
    out[:, 2] = vmax
    return out[None, None, None]


def value_histogram(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None,
                    edges: np.ndarray) -> np.ndarray:
    """``(1, 1, 1, F', n_bins + 2)`` int64: nonzero values per bin; bin 0 is below ``edges[0]``,
    bin ``i`` is ``[edges[i-1], edges[i])``, the last bin is ``>= edges[-1]``."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    nb = edges.size + 1
    b = np.searchsorted(edges, nz.vals, side="right")
    out = np.bincount(nz.feat * nb + b, minlength=nz.n_feat * nb).reshape(nz.n_feat, nb)
    return out[None, None, None]


def l0_tokens(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, D, T)`` int32: active features per token, -1 at padding."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    l0 = np.bincount(nz.rows, minlength=nz.n_docs * nz.n_tok).reshape(nz.n_docs, nz.n_tok)
    return np.where(nz.valid_DT, l0, -1).astype(np.int32)[None, None]


def l0_histogram(acts_11DTF: Any, valid_1DT: np.ndarray, *, feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, F' + 1)`` int64: number of valid tokens with L0 = 0 … F'."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    l0 = np.bincount(nz.rows, minlength=nz.n_docs * nz.n_tok)[nz.valid_DT.ravel()]
    return np.bincount(l0, minlength=nz.n_feat + 1)[None, None, None]


def top_k(acts_11DTF: Any, valid_1DT: np.ndarray, aidx_1: np.ndarray, didx_D: np.ndarray, *,
          feature_idx: np.ndarray | None, k: int, window: int, n_docs_sel: int) -> np.ndarray:
    """``(1, 1, 1, F', k, 2 + 2·window + 1)`` float64, per feature its k largest values in the block:
    ``[..., 0]`` value (-inf for an empty slot), ``[..., 1]`` flat position
    ``(author_pos · n_docs_sel + doc_pos) · T + tok`` (-1 if empty), ``[..., 2:]`` the feature's
    activation at ``tok - window … tok + window`` of the same document (NaN outside it or at padding).
    Ties are broken by position, so results do not depend on the chunking or the scheduler."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    n_w = 2 * window + 1
    out = np.full((nz.n_feat, k, 2 + n_w), np.nan)
    out[..., 0] = -np.inf
    out[..., 1] = NO_POS
    if nz.vals.size:
        order = np.lexsort((nz.rows, -nz.vals, nz.feat))
        f_sorted = nz.feat[order]
        starts = np.searchsorted(f_sorted, np.arange(nz.n_feat))
        rank = np.arange(order.size) - starts[f_sorted]
        keep = rank < k
        idx, f, r = order[keep], f_sorted[keep], rank[keep]
        rows = nz.rows[idx]
        d_local, t = np.divmod(rows, nz.n_tok)
        out[f, r, 0] = nz.vals[idx]
        out[f, r, 1] = ((int(aidx_1[0]) * n_docs_sel + np.asarray(didx_D)[d_local]) * nz.n_tok + t).astype(np.float64)
        if window >= 0:
            key = nz.rows * nz.n_feat + nz.feat
            srt = np.argsort(key, kind="stable")
            key_s, val_s = key[srt], nz.vals[srt]
            for j, o in enumerate(range(-window, window + 1)):
                tt = t + o
                inside = (tt >= 0) & (tt < nz.n_tok)
                tt_c = np.clip(tt, 0, nz.n_tok - 1)
                ok = inside & nz.valid_DT[d_local, tt_c]
                q = (d_local * nz.n_tok + tt_c) * nz.n_feat + f
                i = np.minimum(np.searchsorted(key_s, q), max(key_s.size - 1, 0))
                found = key_s[i] == q
                out[f, r, 2 + j] = np.where(ok, np.where(found, val_s[i], 0.0), np.nan)
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
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    d = nz.rows // nz.n_tok
    key = d * nz.n_feat + nz.feat
    uniq, inv = np.unique(key, return_inverse=True)
    d_u, f_u = np.divmod(uniq, nz.n_feat)
    doc_len = nz.valid_DT.sum(axis=1)
    if stat in ("sum", "mean"):
        data = np.bincount(inv, weights=nz.vals, minlength=uniq.size)
        if stat == "mean":
            data = data / doc_len[d_u]
    elif stat == "max":
        data = np.full(uniq.size, -np.inf)
        np.maximum.at(data, inv, nz.vals.astype(np.float64))
        n_active = np.bincount(inv, minlength=uniq.size)
        data = np.where(n_active < doc_len[d_u], np.maximum(data, 0.0), data)
    else:
        raise StatsError(f"stat must be sum, mean or max, not {stat!r}")
    keep = data != 0
    coords = np.stack([np.zeros(keep.sum(), np.int64), np.zeros(keep.sum(), np.int64), d_u[keep], f_u[keep]])
    return sparse.COO(coords, data[keep], shape=(1, 1, nz.n_docs, nz.n_feat), has_duplicates=False, sorted=True,
                      fill_value=0.0)


def metric_sums(acts_11DTF: Any, valid_1DT: np.ndarray, *metrics_1DT: np.ndarray,
                feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, F', 2·M)`` float64: per metric the sum of the metric over tokens where the feature
    is active and the metric finite, and the number of such tokens."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    out = np.empty((nz.n_feat, 2 * len(metrics_1DT)))
    for m, metric in enumerate(metrics_1DT):
        mv = np.asarray(metric, dtype=np.float64)[0].ravel()[nz.rows]
        fin = np.isfinite(mv)
        out[:, 2 * m] = np.bincount(nz.feat[fin], weights=mv[fin], minlength=nz.n_feat)
        out[:, 2 * m + 1] = np.bincount(nz.feat[fin], minlength=nz.n_feat)
    return out[None, None, None]


def cooccurrence(acts_11DTF: Any, valid_1DT: np.ndarray, *, query_idx: np.ndarray,
                 feature_idx: np.ndarray | None) -> np.ndarray:
    """``(1, 1, 1, Q + 1, F')`` int64: row q counts, for every feature, the tokens where it and query
    feature ``query_idx[q]`` (a position among all features) are both active; the last row counts
    the tokens where each feature is active."""
    full = block_nonzeros(acts_11DTF, valid_1DT, None)
    if feature_idx is None:
        feat, n_feat = full.feat, full.n_feat
    else:
        lut = np.full(full.n_feat, -1, dtype=np.int64)
        lut[feature_idx] = np.arange(feature_idx.size)
        feat, n_feat = lut[full.feat], int(feature_idx.size)
    sel = feat >= 0
    out = np.empty((query_idx.size + 1, n_feat), dtype=np.int64)
    for q, fq in enumerate(query_idx):
        q_rows = full.rows[full.feat == fq]
        both = sel & np.isin(full.rows, q_rows)
        out[q] = np.bincount(feat[both], minlength=n_feat)
    out[-1] = np.bincount(feat[sel], minlength=n_feat)
    return out[None, None, None]


# --- top tokens: variable-size partials, combined with dask.delayed -----------------------------------

TOKEN_SHIFT = 32


def token_sums(acts_11DTF: Any, valid_1DT: np.ndarray, token_id_1DT: np.ndarray, *,
               feature_idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(key, sum, n_active)`` per (feature, token id) present in the block; ``key = f << 32 | token_id``."""
    nz = block_nonzeros(acts_11DTF, valid_1DT, feature_idx)
    tid = np.asarray(token_id_1DT, dtype=np.int64)[0].ravel()[nz.rows]
    key = (nz.feat << TOKEN_SHIFT) | (tid & 0xFFFFFFFF)
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq, np.bincount(inv, weights=nz.vals, minlength=uniq.size), np.bincount(inv, minlength=uniq.size)


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
