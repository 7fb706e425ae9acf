"""The formats saestore is compared with: the seed's files and a delphi-style latent cache.

The seed's format (CSR ``.sparse.npz`` or dense ``.npz`` plus a metadata file) is implemented in
:mod:`saestore.bench.seed`, the one module of the package allowed to import pickle (the seed's
metadata file is an executable serialization that saestore itself must never write; only the
benchmark imports it). The delphi-style cache is implemented here: delphi's
``LatentCache.save_splits`` layout (per feature range, ``locations`` (nnz, 3) uint16 = sequence,
position, feature − start, ``activations`` float16, and by default the ``tokens`` of every
sequence, in safetensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saestore.bench import seed
from saestore.bench.workloads import ActSlice
from saestore.errors import BenchError

__all__ = ["BenchError", "seed_meta", "write_seed_sparse", "write_seed_dense", "write_delphi", "DELPHI_SPLITS"]

DELPHI_SPLITS = 5
"""delphi's default ``n_splits`` (CacheConfig)."""


def seed_meta(sl: ActSlice) -> dict:
    """The seed's metadata object for a slice (texts, ids, tokens, metrics, mask)."""
    valid = sl.per_token("valid")
    tokens = sl.per_token("token")
    return seed.make_meta(
        author=sl.author, layer_type=sl.layer_type, layer=sl.layer, shape=(sl.n_docs, sl.n_tok, sl.n_features),
        texts=[str(t) for t in sl.per_doc("text_D")], doc_ids=np.asarray(sl.per_doc("doc_id_D")),
        token_ids_DT=sl.per_token("token_id"),
        tokens=[[str(x) for x in row[m]] for row, m in zip(tokens, valid, strict=True)],
        ce_loss_DT=sl.per_token("ce_loss"), entropy_DT=sl.per_token("entropy"), mask_DT=valid)


def seed_csr(sl: ActSlice, values: np.ndarray | None = None):
    """The seed's CSR matrix of a slice; ``values`` replaces the stored values (index-only sizing)."""
    a = sl.acts()
    return seed.csr_from_nonzeros(a.rows, a.cols, a.values if values is None else values,
                                  (sl.n_docs * sl.n_tok, sl.n_features))


def write_seed_sparse(sl: ActSlice, stem: Path) -> dict[str, int]:
    """Write the seed's sparse pair for a slice; return ``{"acts": bytes, "meta": bytes}``."""
    npz, meta = seed.save_sparse(seed_csr(sl), seed_meta(sl), stem)
    return {"acts": npz.stat().st_size, "meta": meta.stat().st_size}


def write_seed_dense(sl: ActSlice, stem: Path) -> dict[str, int]:
    """Write the seed's dense pair (``np.savez_compressed``) for a slice."""
    npz, meta = seed.save_dense(sl.dense(), seed_meta(sl), stem)
    return {"acts": npz.stat().st_size, "meta": meta.stat().st_size}


def delphi_split_bounds(n_features: int, n_splits: int = DELPHI_SPLITS) -> list[tuple[int, int]]:
    """delphi's feature ranges: ``torch.arange(width).chunk(n_splits)``, inclusive ends."""
    size = -(-n_features // n_splits)
    return [(s, min(s + size, n_features) - 1) for s in range(0, n_features, size)]


def write_delphi(sl: ActSlice, folder: Path, *, save_tokens: bool = True) -> int:
    """Write a delphi-style cache of a slice (one file per feature range); return its bytes."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d, t, f, v = sl.nonzeros()
    tokens = sl.per_token("token_id").astype(np.int64)
    total = 0
    for start, end in delphi_split_bounds(sl.n_features):
        mask = (f >= start) & (f <= end)
        loc = np.stack([d[mask], t[mask], f[mask] - start], axis=1)
        dtype = np.uint16 if loc.size == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16) else np.uint32
        data = {"locations": np.ascontiguousarray(loc.astype(dtype)),
                "activations": v[mask].astype(np.float16)}
        if save_tokens:
            data["tokens"] = tokens
        out = folder / f"{start}_{end}.safetensors"
        save_file(data, str(out))
        total += out.stat().st_size
    return total
