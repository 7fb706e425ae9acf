"""Synthetic SAE-like activations for benchmarks and tests (pure numpy, deterministic, fast).

Real SAE latents (e.g. Gemma Scope JumpReLU, width 16,384, L0 ≈ 70) have three properties that
decide how well a sparse format compresses them, and this module reproduces each:

* **Zipf-like feature frequencies**: feature ``f`` fires on a token with probability
  ``p_f = min(max_density, c · rank_f^-s)``, ``c`` solved so that ``Σ p_f = l0``. A handful of
  features fire on most tokens, the long tail rarely. Ranks are shuffled over feature ids, so
  frequent features are not all at small ids.
* **Positive, incompressible values**: ``value = scale_f · lognormal(0, σ)`` with a per-feature
  ``scale_f ~ lognormal(0, 1)``; float32 mantissas are as random as real ones.
* **Padding**: documents have ragged lengths (right padding); padding tokens are all zero and
  ``pad_frac`` of the chunk's positions are padding.

Features fire independently per token (Bernoulli(p_f)), sampled without materialising the
``n_tok × n_features`` matrix: per feature a Poisson number of hits with rate
``-log(1 - p_f)`` per token, placed uniformly and deduplicated, which is exactly Bernoulli(p_f)
per token. A (4, 1024, 16384) chunk with L0 70 takes a few milliseconds.

>>> chunk = synthetic_sae_chunk(n_docs=2, n_tok=64, n_features=512, l0=10, pad_frac=0.25, seed=1)
>>> chunk.shape, chunk.valid_DT.sum()
((2, 64, 512), np.int64(96))
>>> bool((chunk.values > 0).all()), bool(chunk.valid_DT[chunk.doc, chunk.tok].all())
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from saestore.errors import BenchError
from saestore.nonzeros import SparseActs

if TYPE_CHECKING:
    from saestore.writer import ChunkData, RunLayout

__all__ = [
    "SyntheticSAE",
    "SyntheticChunk",
    "make_synthetic_sae",
    "zipf_densities",
    "doc_lengths",
    "sample_chunk",
    "synthetic_sae_chunk",
    "synthetic_run_data",
    "index_entropy_bound_bits",
]


def zipf_densities(n_features: int, l0: float, *, zipf_exponent: float = 1.0, max_density: float = 0.95) -> np.ndarray:
    """Firing probability of each feature *by rank* (descending), summing to ``l0``.

    ``p_r = min(max_density, c · r^-zipf_exponent)`` for ranks ``r = 1 … n_features``, with ``c``
    found by bisection. Raises ValueError if ``l0`` cannot be reached (``l0 > max_density · n_features``).
    """
    if n_features < 1 or not 0 < max_density <= 1:
        raise BenchError(f"need n_features >= 1 and 0 < max_density <= 1, got {n_features}, {max_density}")
    if not 0 <= l0 <= max_density * n_features:
        raise BenchError(f"l0 {l0} is not reachable with {n_features} features of density <= {max_density}")
    base = np.arange(1, n_features + 1, dtype=np.float64) ** -float(zipf_exponent)
    if l0 == 0:
        return np.zeros(n_features)
    lo, hi = 0.0, max_density / base[-1]  # at hi every feature is capped
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(max_density, mid * base).sum() < l0:
            lo = mid
        else:
            hi = mid
    return np.minimum(max_density, hi * base)


@dataclass(frozen=True, kw_only=True)
class SyntheticSAE:
    """The fixed per-feature statistics of one synthetic SAE (shared by all chunks of a run)."""

    density_F: np.ndarray
    """probability that each feature fires on a real token (float64, sums to ~L0)."""
    scale_F: np.ndarray
    """typical activation size of each feature (float64, positive)."""
    value_sigma: float = 0.5
    """sigma of the per-activation lognormal factor."""

    @property
    def n_features(self) -> int:
        return int(self.density_F.size)

    @property
    def l0(self) -> float:
        """Expected number of active features per real token."""
        return float(self.density_F.sum())


def make_synthetic_sae(
    n_features: int = 16384,
    l0: float = 70,
    *,
    zipf_exponent: float = 1.0,
    max_density: float = 0.95,
    value_sigma: float = 0.5,
    seed: int = 0,
) -> SyntheticSAE:
    """Draw a synthetic SAE: Zipf-like densities over shuffled feature ids, lognormal scales."""
    rng = np.random.default_rng([seed, 0x5AE])
    by_rank = zipf_densities(n_features, l0, zipf_exponent=zipf_exponent, max_density=max_density)
    density = np.empty(n_features)
    density[rng.permutation(n_features)] = by_rank
    scale = rng.lognormal(0.0, 1.0, size=n_features)
    return SyntheticSAE(density_F=density, scale_F=scale, value_sigma=value_sigma)


def doc_lengths(n_docs: int, n_tok: int, pad_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Ragged document lengths in ``[1, n_tok]`` whose padding is ``pad_frac`` of all positions
    (exactly, up to rounding and the bounds)."""
    if not 0 <= pad_frac < 1:
        raise BenchError(f"pad_frac must be in [0, 1), got {pad_frac}")
    target = min(n_docs * n_tok, max(n_docs, round((1 - pad_frac) * n_docs * n_tok)))
    mean = target / n_docs
    lengths = np.clip(np.rint(rng.normal(mean, 0.25 * n_tok, size=n_docs)), 1, n_tok).astype(np.int64)
    # move the total onto the target one token at a time, round-robin over docs that have room
    deficit = target - int(lengths.sum())
    step = 1 if deficit > 0 else -1
    order = rng.permutation(n_docs)
    while deficit:
        room = lengths[order] < n_tok if step > 0 else lengths[order] > 1
        movable = order[room]
        take = movable[: abs(deficit)]
        lengths[take] += step
        deficit -= step * take.size
    return lengths


@dataclass(frozen=True, kw_only=True)
class SyntheticChunk(SparseActs):
    """The nonzeros of one synthetic (doc, tok, feature) chunk (a :class:`SparseActs`) plus its valid mask."""

    valid_DT: np.ndarray
    """bool (n_docs, n_tok): True for real tokens; every nonzero lies on a real token."""

    def to_sparse_acts(self) -> SparseActs:
        """The nonzeros alone, as the writer takes them."""
        return SparseActs(rows=self.rows, cols=self.cols, values=self.values, shape=self.shape)


def sample_chunk(sae: SyntheticSAE, valid_DT: np.ndarray, rng: np.random.Generator) -> SyntheticChunk:
    """Draw the activations of every real token of ``valid_DT`` from ``sae``."""
    valid_DT = np.asarray(valid_DT, dtype=bool)
    n_docs, n_tok = valid_DT.shape
    n_features = sae.n_features
    real = np.flatnonzero(valid_DT.ravel())  # ascending row ids of real tokens
    n_real = real.size
    # Bernoulli(p) per (token, feature) == "at least one hit" of Poisson(-log(1-p)) per token
    rate = -np.log1p(-np.minimum(sae.density_F, 1 - 1e-12))
    hits_F = rng.poisson(rate * n_real) if n_real else np.zeros(n_features, dtype=np.int64)
    feature = np.repeat(np.arange(n_features, dtype=np.int64), hits_F)
    token = rng.integers(0, max(n_real, 1), size=feature.size, dtype=np.int64)
    key = np.unique(token * n_features + feature)  # dedupe and sort row-major
    token, feature = np.divmod(key, n_features)
    rows = real[token]
    values = sae.scale_F[feature] * rng.lognormal(0.0, sae.value_sigma, size=feature.size)
    return SyntheticChunk(rows=rows.astype(np.int64), cols=feature, values=values.astype(np.float32),
                          shape=(n_docs, n_tok, n_features), valid_DT=valid_DT)


def synthetic_sae_chunk(n_docs: int = 4, n_tok: int = 1024, *, pad_frac: float = 0.49, seed: int = 0,
                        **sae: Any) -> SyntheticChunk:
    """One SAE-like doc-chunk: ~``l0`` active features per real token, ``pad_frac`` padding.

    The defaults are the chunk of the project's codec benchmark (DESIGN.md, "The sparse codec"):
    4 docs × 1024 tokens × 16,384 features, L0 70, 49% padding (~146k nonzeros). ``sae`` are the
    keywords of :func:`make_synthetic_sae` (``n_features``, ``l0``, ``zipf_exponent``, ...).
    """
    model = make_synthetic_sae(**sae, seed=seed)
    rng = np.random.default_rng([seed, 1])
    lengths = doc_lengths(n_docs, n_tok, pad_frac, rng)
    valid_DT = np.arange(n_tok)[None, :] < lengths[:, None]
    return sample_chunk(model, valid_DT, rng)


def synthetic_run_data(
    layout: RunLayout,
    *,
    l0: float = 70,
    pad_frac: float = 0.49,
    zipf_exponent: float = 1.0,
    vocab_size: int = 50_000,
    seed: int = 0,
) -> Iterator[tuple[int, int, ChunkData]]:
    """Yield ``(author_idx, chunk_idx, ChunkData)`` for every doc-chunk of ``layout``, ready for
    :meth:`saestore.writer.RunWriter.write_chunk`.

    Each (layer type, layer) gets its own :class:`SyntheticSAE`, shared by all chunks; chunk
    contents depend only on ``(seed, author_idx, chunk_idx)``, so any worker can regenerate any
    chunk. Per-token metrics are random positive numbers (NaN at padding, like the protocol's fill).
    """
    from saestore.writer import ChunkData

    saes = {
        (lt, layer): make_synthetic_sae(layout.n_features, l0, zipf_exponent=zipf_exponent,
                                        seed=seed * 1009 + i)
        for i, (lt, layer) in enumerate((lt, layer) for lt in layout.layer_types for layer in layout.layers)
    }
    n_tok = layout.n_tok
    for a in range(len(layout.authors)):
        for c in range(layout.n_chunks(a)):
            docs = layout.chunk_docs_range(a, c)
            n_d = len(docs)
            rng = np.random.default_rng([seed, 2, a, c])
            lengths = doc_lengths(n_d, n_tok, pad_frac, rng)
            valid = np.arange(n_tok)[None, :] < lengths[:, None]
            acts = {key: sample_chunk(sae, valid, rng).to_sparse_acts() for key, sae in saes.items()}
            token_id = np.where(valid, rng.integers(0, vocab_size, size=(n_d, n_tok)), -1).astype(np.int32)
            token = np.where(valid, np.char.add("t", token_id.astype(str)), "").astype(object)
            ce = np.where(valid, rng.exponential(2.5, size=(n_d, n_tok)), np.nan).astype(np.float32)
            entropy = np.where(valid, rng.exponential(3.0, size=(n_d, n_tok)), np.nan).astype(np.float32)
            yield a, c, ChunkData(
                token_id_DT=token_id, token_DT=token, valid_DT=valid, ce_loss_DT=ce, entropy_DT=entropy,
                text_D=[f"synthetic document {d} of author {layout.authors[a]}" for d in docs],
                doc_id_D=np.asarray(list(docs), dtype=np.int64), doc_length_D=lengths.astype(np.int32),
                n_truncated_D=np.zeros(n_d, dtype=np.int32), acts=acts,
            )


def _log2_binomial(n: int, k: np.ndarray) -> np.ndarray:
    """log2 C(n, k), elementwise (used by the benchmark's information bound)."""
    k = np.asarray(k, dtype=np.int64)
    uniq, inv = np.unique(k, return_inverse=True)
    table = np.array([(math.lgamma(n + 1) - math.lgamma(int(j) + 1) - math.lgamma(n - int(j) + 1)) / math.log(2)
                      for j in uniq])
    return table[inv].reshape(k.shape) if table.size else np.zeros(k.shape)


def index_entropy_bound_bits(chunk: SyntheticChunk) -> float:
    """Σ over tokens of log2 C(n_features, k_token): the bits any code needs for the feature
    *sets* if each token's set were a uniform k-subset (ignores the skew of real frequencies)."""
    k = chunk.active_per_token().ravel()
    return float(_log2_binomial(chunk.n_features, k).sum())
