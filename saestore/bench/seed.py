"""BASELINE ONLY: the seed project's on-disk format, kept so the benchmarks can measure it.

Why this module may import pickle (the one exception to tests/test_bad_input.py's "nothing
executes from data" scan): it reproduces the format saestore replaces, whose metadata file is a
pickle, and exists for the benchmark only. It only reads pickles it wrote itself, in the
benchmark's temporary folder. saestore never writes or reads this format otherwise (PROTOCOL.md
§4 forbids it): no module of the package outside ``saestore/bench/`` imports this one, which the
same test checks, so extraction and reading can never reach it.

What the seed script (``get_sae_features.py``) does, as modelled here:

* it runs the model with all SAEs spliced in, keeps every batch's **dense** SAE activations
  (``torch`` tensors of shape (batch, max_seq_len - 1, d_sae)) in RAM, author by author;
* after an author, for every (layer type, layer) it concatenates the batches, converts the dense
  (doc · tok, feature) matrix to ``scipy.sparse.csr_matrix`` and writes ``{stem}.sparse.npz``
  (``scipy.sparse.save_npz``, deflate) plus ``{stem}.meta.pkl``: a pickled dict with the
  author, the SAE, the shape and the per-document and per-token data (texts, document ids,
  token ids and decoded tokens, CE loss, entropy, attention mask);
* its dense mode writes ``{stem}.npz`` with ``np.savez_compressed`` instead of the CSR file.

The exact fields of the seed's metadata object are an assumption (the seed's documents describe
"a pickled metadata object" holding what saestore keeps in its per-token and per-document
variables); the benchmarks count its bytes separately from the activations. scipy (the ``bench``
extra) is imported where it is used, so that importing this module, and with it
``python -m saestore.bench``, needs only the core install (the command then names the extra).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse

SPARSE_SUFFIX = ".sparse.npz"
DENSE_SUFFIX = ".npz"
META_SUFFIX = ".meta.pkl"


def seed_stem(root: Path | str, author: str, layer_type: str, layer: int) -> Path:
    """``{root}/{author}/{layer_type}_layer{layer}``: one file pair per (author, layer type, layer)."""
    return Path(root) / author / f"{layer_type}_layer{layer}"


def make_meta(*, author: str, layer_type: str, layer: int, shape: tuple[int, int, int], texts: Sequence[str],
              doc_ids: np.ndarray, token_ids_DT: np.ndarray, tokens: Sequence[Sequence[str]],
              ce_loss_DT: np.ndarray, entropy_DT: np.ndarray, mask_DT: np.ndarray) -> dict[str, Any]:
    """The seed's metadata object for one (author, layer type, layer) file."""
    return {"author": author, "layer_type": layer_type, "layer": int(layer), "shape": tuple(int(s) for s in shape),
            "sae_id": f"layer_{layer}/width_{shape[2] // 1024}k/canonical", "texts": list(texts),
            "doc_ids": np.asarray(doc_ids, dtype=np.int64), "token_ids": np.asarray(token_ids_DT, dtype=np.int64),
            "tokens": [list(t) for t in tokens], "ce_loss": np.asarray(ce_loss_DT, dtype=np.float32),
            "entropy": np.asarray(entropy_DT, dtype=np.float32), "attention_mask": np.asarray(mask_DT, dtype=bool)}


def _write_meta(meta: Mapping[str, Any], stem: Path) -> Path:
    path = stem.with_name(stem.name + META_SUFFIX)
    with open(path, "wb") as f:
        pickle.dump(dict(meta), f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def read_meta(stem: Path | str) -> dict[str, Any]:
    """Load the seed's metadata object (the benchmark only reads files it wrote itself)."""
    stem = Path(stem)
    with open(stem.with_name(stem.name + META_SUFFIX), "rb") as f:
        return pickle.load(f)


def save_sparse(csr: scipy.sparse.csr_matrix, meta: Mapping[str, Any], stem: Path | str) -> list[Path]:
    """Write ``{stem}.sparse.npz`` (CSR, deflate) and ``{stem}.meta.pkl``; return both paths."""
    import scipy.sparse

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz = stem.with_name(stem.name + SPARSE_SUFFIX)
    scipy.sparse.save_npz(npz, csr, compressed=True)
    return [npz, _write_meta(meta, stem)]


def save_dense(acts_DTF: np.ndarray, meta: Mapping[str, Any], stem: Path | str) -> list[Path]:
    """The seed's dense mode: ``{stem}.npz`` (``np.savez_compressed``) and ``{stem}.meta.pkl``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz = stem.with_name(stem.name + DENSE_SUFFIX)
    np.savez_compressed(npz, activations=acts_DTF)
    return [npz, _write_meta(meta, stem)]


def csr_from_dense(acts_DTF: np.ndarray) -> scipy.sparse.csr_matrix:
    """The seed's conversion: the dense (doc, tok, feature) array as a (doc · tok, feature) CSR."""
    import scipy.sparse

    n_docs, n_tok, n_features = acts_DTF.shape
    return scipy.sparse.csr_matrix(acts_DTF.reshape(n_docs * n_tok, n_features))


def csr_from_nonzeros(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                      shape: tuple[int, int]) -> scipy.sparse.csr_matrix:
    """The same CSR matrix as :func:`csr_from_dense` gives, built from row-major nonzeros (no dense
    detour; used to lay out large baseline files cheaply — the bytes are identical)."""
    import scipy.sparse

    rows = np.asarray(rows, dtype=np.int64)
    indptr = np.zeros(shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return scipy.sparse.csr_matrix((np.asarray(values, dtype=np.float32), np.asarray(cols, dtype=np.int32), indptr),
                                   shape=shape)


def save_from_torch(batches_BTF: Sequence[Any], meta: Mapping[str, Any], stem: Path | str) -> list[Path]:
    """The seed's save path for one (author, layer type, layer): ``torch.cat`` the dense batches
    held in RAM, convert to CSR, write the CSR file and the metadata."""
    import torch

    dense = torch.cat(list(batches_BTF), dim=0).numpy()
    return save_sparse(csr_from_dense(dense), meta, stem)


def load_sparse(stem: Path | str) -> scipy.sparse.csr_matrix:
    """Read one CSR file back (the whole author, every token)."""
    import scipy.sparse

    stem = Path(stem)
    return scipy.sparse.load_npz(stem.with_name(stem.name + SPARSE_SUFFIX)).tocsr()


def read_document(stem: Path | str, doc: int, n_tok: int) -> scipy.sparse.csr_matrix:
    """One document's (tok, feature) activations: the seed must load the author's whole file."""
    return load_sparse(stem)[doc * n_tok:(doc + 1) * n_tok]


def feature_stats(stems: Sequence[Path | str]) -> dict[str, np.ndarray]:
    """Frequency, mean and max per feature for each stem (one author each): load every file, then
    scipy column reductions. ``n_valid`` comes from the metadata's attention mask."""
    freq, mean, vmax = [], [], []
    for stem in stems:
        csr = load_sparse(stem)
        n_valid = int(np.count_nonzero(read_meta(stem)["attention_mask"]))
        count = np.bincount(csr.indices, minlength=csr.shape[1])
        total = np.asarray(csr.sum(axis=0, dtype=np.float64)).ravel()
        peak = csr.max(axis=0).toarray().ravel()
        freq.append(count / n_valid)
        mean.append(total / n_valid)
        vmax.append(peak)
    return {"frequency": np.array(freq), "mean": np.array(mean), "max": np.array(vmax)}
