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

import numpy as np


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


def _shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    n_docs, n_tok, n_feat = (int(s) for s in shape)
    return (n_docs, n_tok, n_feat)
