"""The nonzeros of one SAE chunk: the one in-memory type the extractor, the writer, the reader's
kernels, the torch readers and the benchmarks share.

A chunk of an SAE variable is a ``(doc, tok, feature)`` block (its leading ``author``/``layer`` axes
have size 1). ``sparse_coo`` stores it as rows of features, row = ``doc * n_tok + tok``, so the
type keeps exactly that: ``rows``, ``cols`` (feature ids) and ``values``, in row-major order without
duplicates — what ``torch.nonzero`` of a ``(doc, tok, feature)`` tensor gives and what
``sparse_coo.decode_rows`` returns. ``doc`` and ``tok`` are derived when a caller wants them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from saestore.errors import SaestoreError


@dataclass(frozen=True, kw_only=True)
class SparseActs:
    """Nonzero activations of one ``(n_docs, n_tok, n_features)`` chunk, row-major.

    ``rows`` (int64) index the chunk viewed as ``(n_docs * n_tok, n_features)``, ``cols`` (int64)
    are feature ids, ``values`` are float32 nonzeros. ``shape`` is ``(n_docs, n_tok, n_features)``.
    """

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple[int, int, int]

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_coords(cls, doc: np.ndarray, tok: np.ndarray, feature: np.ndarray, values: np.ndarray,
                    shape: tuple[int, int, int]) -> SparseActs:
        """From per-nonzero ``(doc, tok, feature)`` coordinates (row-major order, no duplicates)."""
        n_tok = int(shape[1])
        rows = np.asarray(doc, dtype=np.int64) * n_tok + np.asarray(tok, dtype=np.int64)
        return cls(rows=rows, cols=np.asarray(feature, dtype=np.int64),
                   values=np.asarray(values, dtype=np.float32), shape=_shape(shape))

    @classmethod
    def from_dense(cls, acts_DTF: np.ndarray) -> SparseActs:
        """The nonzeros of a dense ``(doc, tok, feature)`` array."""
        acts_DTF = np.asarray(acts_DTF)
        n_docs, n_tok, n_feat = acts_DTF.shape
        flat = acts_DTF.reshape(n_docs * n_tok, n_feat)
        rows, cols = np.nonzero(flat)
        return cls(rows=rows.astype(np.int64), cols=cols.astype(np.int64),
                   values=np.asarray(flat[rows, cols], dtype=np.float32), shape=(n_docs, n_tok, n_feat))

    @classmethod
    def from_coo(cls, block: Any) -> SparseActs:
        """The nonzeros of a ``sparse.COO`` block whose last three axes are ``(doc, tok, feature)``
        and whose leading axes (author, layer) have size 1, as ``open_run``'s dask blocks are.
        Explicit zeros are dropped."""
        *lead, n_docs, n_tok, n_feat = block.shape
        if any(n != 1 for n in lead):
            raise SaestoreError(f"a block of shape {block.shape} has leading axes of size > 1; select one author "
                                "and one layer per block")
        c = block.coords
        rows = c[-3].astype(np.int64) * n_tok + c[-2]
        acts = cls(rows=rows, cols=c[-1].astype(np.int64), values=np.asarray(block.data, dtype=np.float32),
                   shape=(int(n_docs), int(n_tok), int(n_feat)))
        return acts.where(acts.values != 0)

    @classmethod
    def concat(cls, parts: list[SparseActs]) -> SparseActs:
        """Chunks of the same ``(n_tok, n_features)`` one after the other along ``doc``."""
        if not parts:
            raise SaestoreError("SparseActs.concat needs at least one part")
        n_tok, n_feat = parts[0].n_tok, parts[0].n_features
        if any((p.n_tok, p.n_features) != (n_tok, n_feat) for p in parts):
            raise SaestoreError(f"cannot concatenate chunks of shapes {[p.shape for p in parts]} along doc")
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p.n_docs * n_tok for p in parts[:-1]])
        return cls(rows=np.concatenate([p.rows + o for p, o in zip(parts, offsets, strict=True)]),
                   cols=np.concatenate([p.cols for p in parts]), values=np.concatenate([p.values for p in parts]),
                   shape=(sum(p.n_docs for p in parts), n_tok, n_feat))

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> SparseActs:
        z = np.zeros(0, dtype=np.int64)
        return cls(rows=z, cols=z, values=np.zeros(0, dtype=np.float32), shape=_shape(shape))

    # -- views ----------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.values.size)

    @property
    def n_docs(self) -> int:
        return self.shape[0]

    @property
    def n_tok(self) -> int:
        return self.shape[1]

    @property
    def n_features(self) -> int:
        return self.shape[2]

    @property
    def doc(self) -> np.ndarray:
        """Chunk-local document index of each nonzero."""
        return self.rows // self.n_tok

    @property
    def tok(self) -> np.ndarray:
        """Token position of each nonzero."""
        return self.rows % self.n_tok

    @property
    def feature(self) -> np.ndarray:
        """Feature id of each nonzero (the same array as ``cols``)."""
        return self.cols

    def active_per_token(self) -> np.ndarray:
        """Number of active features at every position, shape ``(n_docs, n_tok)``."""
        return np.bincount(self.rows, minlength=self.n_docs * self.n_tok).reshape(self.n_docs, self.n_tok)

    # -- transformations ------------------------------------------------------------------------
    def where(self, keep: np.ndarray) -> SparseActs:
        """The nonzeros where the boolean per-nonzero mask ``keep`` is True."""
        if keep.all():
            return self
        return SparseActs(rows=self.rows[keep], cols=self.cols[keep], values=self.values[keep], shape=self.shape)

    def at_valid(self, valid_DT: np.ndarray) -> SparseActs:
        """Only the nonzeros at valid tokens (``valid_DT`` is a ``(n_docs, n_tok)`` bool mask)."""
        return self.where(np.asarray(valid_DT, dtype=bool).ravel()[self.rows])

    def select_features(self, feature_idx: np.ndarray | None) -> SparseActs:
        """Keep the features ``feature_idx`` (in that order) and renumber them 0 … len-1."""
        if feature_idx is None:
            return self
        feature_idx = np.asarray(feature_idx, dtype=np.int64)
        lut = np.full(self.n_features, -1, dtype=np.int64)
        lut[feature_idx] = np.arange(feature_idx.size)
        cols = lut[self.cols]
        keep = cols >= 0
        return SparseActs(rows=self.rows[keep], cols=cols[keep], values=self.values[keep],
                          shape=(self.n_docs, self.n_tok, int(feature_idx.size)))

    def docs(self, start: int, stop: int) -> SparseActs:
        """The nonzeros of documents ``start … stop-1``, renumbered from 0 (rows stay row-major)."""
        lo, hi = np.searchsorted(self.rows, [start * self.n_tok, stop * self.n_tok])
        return SparseActs(rows=self.rows[lo:hi] - start * self.n_tok, cols=self.cols[lo:hi],
                          values=self.values[lo:hi], shape=(stop - start, self.n_tok, self.n_features))

    def to_dense(self, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """The dense ``(doc, tok, feature)`` array (mind its size)."""
        out = np.zeros(self.shape, dtype=dtype)
        out.reshape(-1, self.n_features)[self.rows, self.cols] = self.values
        return out

    def to_coo(self, leading: tuple[int, ...] = ()) -> object:
        """A ``sparse.COO`` of shape ``leading + shape`` (leading axes of size 1 get coordinate 0)."""
        import sparse

        ndim = len(leading) + 3
        coords = np.zeros((ndim, self.nnz), dtype=np.int64)
        coords[-3] = self.doc
        coords[-2] = self.tok
        coords[-1] = self.cols
        return sparse.COO(coords, self.values, shape=tuple(leading) + self.shape, has_duplicates=False,
                          sorted=True, fill_value=0.0)


def summarize(acts: SparseActs) -> np.ndarray:
    """``(n_features, 4)`` float64 per feature: [count, sum, max, sum of squares] of the nonzeros,
    max 0 where count is 0 (PROTOCOL.md §2.8, the ``summary`` coordinate's order). The writer
    stores it per doc-chunk and ``validate`` recomputes it from the decoded chunk with this one
    function, so the two agree bit for bit."""
    n = acts.n_features
    v = np.asarray(acts.values, dtype=np.float64)
    out = np.zeros((n, 4), dtype=np.float64)
    out[:, 0] = np.bincount(acts.cols, minlength=n)
    out[:, 1] = np.bincount(acts.cols, weights=acts.values, minlength=n)
    vmax = np.full(n, -np.inf)
    np.maximum.at(vmax, acts.cols, v)
    out[:, 2] = np.where(out[:, 0] > 0, vmax, 0.0)
    out[:, 3] = np.bincount(acts.cols, weights=v * v, minlength=n)
    return out


def combine_summaries(parts_CF4: np.ndarray) -> np.ndarray:
    """``(F, 4)``: the summaries of the union of the doc-chunks whose :func:`summarize` rows are
    ``parts_CF4`` -- counts, sums and sums of squares add, max is the largest where the feature
    is active (0 where it never is). The shard summaries of PROTOCOL.md §2.8: the writer stores
    them and ``validate`` recomputes them with this one function."""
    parts = np.asarray(parts_CF4, dtype=np.float64)
    out = parts.sum(axis=0)
    active = parts[..., 0] > 0
    out[:, 2] = np.where(active.any(axis=0), np.where(active, parts[..., 2], -np.inf).max(axis=0), 0.0)
    return out


POOLS = ("mean", "max", "sum")
"""How :func:`pool` combines a document's tokens."""


def pool(group: np.ndarray, cols: np.ndarray, values: np.ndarray, group_size: np.ndarray, n_features: int,
         stat: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool nonzeros by group (a document): ``(group, col, value)`` of every nonzero pooled value,
    sorted by (group, col), values float64.

    ``group``/``cols``/``values`` are per nonzero; ``group_size[g]`` is the number of tokens in group
    ``g`` (its valid tokens). ``sum`` adds, ``mean`` is the sum over ``group_size``, ``max`` is the
    largest value with the zeros of tokens where the feature is off included (so a feature that is
    negative wherever active but off somewhere pools to 0).
    """
    if stat not in POOLS:
        raise SaestoreError(f"pool must be one of {', '.join(POOLS)}, not {stat!r}")
    key = np.asarray(group, dtype=np.int64) * n_features + np.asarray(cols, dtype=np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    g_u, c_u = np.divmod(uniq, n_features)
    if stat == "max":
        data = np.full(uniq.size, -np.inf)
        np.maximum.at(data, inv, np.asarray(values, dtype=np.float64))
        off_somewhere = np.bincount(inv, minlength=uniq.size) < group_size[g_u]
        data = np.where(off_somewhere, np.maximum(data, 0.0), data)
    else:
        data = np.bincount(inv, weights=np.asarray(values, dtype=np.float64), minlength=uniq.size)
        if stat == "mean":
            data = data / group_size[g_u]
    keep = data != 0
    return g_u[keep], c_u[keep], data[keep]


def _shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    n_docs, n_tok, n_feat = (int(s) for s in shape)
    return (n_docs, n_tok, n_feat)
