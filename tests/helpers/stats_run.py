"""A small synthetic run for the statistics tests, written with the real writer, plus the dense
numpy arrays it was written from (the reference every statistic is checked against)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saestore import protocol
from saestore.bench.workloads import synthetic_attrs
from saestore.writer import ChunkData, RunLayout, RunWriter, SparseActs, create_run, finalize_run

AUTHORS = ("a/b", "zoë", "c")
N_DOCS = (5, 3, 4)
CHUNK_DOCS = 2
N_TOK = 10
N_FEAT = 40
LAYERS = (2, 5)
LAYER_TYPES = ("res", "mlp")
VOCAB = 25


@dataclass
class Reference:
    """The dense arrays a run was written from; SAE arrays are ``acts_ALDTF`` per layer type."""

    path: str
    acts: dict[str, np.ndarray]
    valid_ADT: np.ndarray
    token_id_ADT: np.ndarray
    token_ADT: np.ndarray
    ce_loss_ADT: np.ndarray
    entropy_ADT: np.ndarray
    text_AD: np.ndarray
    doc_id_AD: np.ndarray


def make_layout(storage_format: str = "sparse") -> RunLayout:
    storage = protocol.StorageInfo(format=storage_format, value_dtype="float32", chunk_docs=CHUNK_DOCS,
                                   shard_docs=2 * CHUNK_DOCS)
    return RunLayout(authors=AUTHORS, n_docs=N_DOCS, n_tok=N_TOK, layer_types=LAYER_TYPES, layers=LAYERS,
                     n_features=N_FEAT, storage=storage)


def make_attrs(layout: RunLayout) -> protocol.RunAttrs:
    return synthetic_attrs(layout, {"model": "synthetic-stats", "seed": 7}, expected_l0=5.0, sae_path="/nowhere",
                           hook_layer=1)


def _density(rng: np.random.Generator, author: int) -> np.ndarray:
    """Per-feature firing probability: features 0-2 dead, 3 dense, 4 specific to author 0, 5 to author 2."""
    p = rng.uniform(0.02, 0.25, size=N_FEAT)
    p[:3] = 0.0
    p[3] = 0.7
    p[4] = 0.6 if author == 0 else 0.02
    p[5] = 0.5 if author == 2 else 0.0
    return p


def make_reference(path: str, seed: int = 0) -> Reference:
    """Draw the run's contents (deterministic)."""
    rng = np.random.default_rng(seed)
    A, D, L = len(AUTHORS), max(N_DOCS), len(LAYERS)
    valid = np.zeros((A, D, N_TOK), dtype=bool)
    for a, n in enumerate(N_DOCS):
        lengths = rng.integers(2, N_TOK + 1, size=n)
        lengths[0] = N_TOK
        valid[a, :n] = np.arange(N_TOK)[None, :] < lengths[:, None]
    acts = {}
    for lt in LAYER_TYPES:
        x = np.zeros((A, L, D, N_TOK, N_FEAT), dtype=np.float32)
        for a in range(A):
            p = _density(rng, a)
            for li in range(L):
                on = rng.random((D, N_TOK, N_FEAT)) < p
                v = rng.lognormal(0.0, 1.5, size=on.shape).astype(np.float32)
                x[a, li] = np.where(on & valid[a][..., None], v, 0.0)
        # a few values outside the default histogram range, to exercise the end bins
        x[0, 0, 0, 0, 10] = 2e-4
        x[1, 1, 0, 1, 11] = 3e4
        acts[lt] = x
    token_id = np.where(valid, rng.integers(0, VOCAB, size=valid.shape), -1).astype(np.int32)
    token = np.where(valid, np.char.add("w", token_id.astype(str)), "").astype(object)
    ce = np.where(valid, rng.exponential(2.0, size=valid.shape), np.nan).astype(np.float32)
    ent = np.where(valid, rng.exponential(3.0, size=valid.shape), np.nan).astype(np.float32)
    text = np.full((A, D), "", dtype=object)
    doc_id = np.full((A, D), -1, dtype=np.int64)
    for a, n in enumerate(N_DOCS):
        for d in range(n):
            text[a, d] = f"text of doc {d} by {AUTHORS[a]}"
            doc_id[a, d] = 100 * a + d
    return Reference(path=path, acts=acts, valid_ADT=valid, token_id_ADT=token_id, token_ADT=token,
                     ce_loss_ADT=ce, entropy_ADT=ent, text_AD=text, doc_id_AD=doc_id)


def write_run(path: str | Path, storage_format: str = "sparse", seed: int = 0, authors: Sequence[int] | None = None,
              finalize: bool = True) -> Reference:
    """Write the reference run at ``path`` with RunWriter; returns the reference. ``authors``: write only
    these authors' doc-chunks (default all); ``finalize=False`` leaves the run ``running``."""
    path = str(path)
    ref = make_reference(path, seed)
    layout = make_layout(storage_format)
    create_run(path, layout, make_attrs(layout))
    writer = RunWriter(path)
    for a in range(len(AUTHORS)) if authors is None else authors:
        for c in range(layout.n_chunks(a)):
            r = layout.chunk_docs_range(a, c)
            sl = slice(r.start, r.stop)
            acts = {}
            for lt in LAYER_TYPES:
                for li, layer in enumerate(LAYERS):
                    x = ref.acts[lt][a, li, sl]
                    acts[(lt, layer)] = SparseActs.from_dense(x) if storage_format == "sparse" else x
            writer.write_chunk(a, c, ChunkData(
                token_id_DT=ref.token_id_ADT[a, sl], token_DT=ref.token_ADT[a, sl], valid_DT=ref.valid_ADT[a, sl],
                ce_loss_DT=ref.ce_loss_ADT[a, sl], entropy_DT=ref.entropy_ADT[a, sl], text_D=list(ref.text_AD[a, sl]),
                doc_id_D=ref.doc_id_AD[a, sl], doc_length_D=ref.valid_ADT[a, sl].sum(-1).astype(np.int32),
                n_truncated_D=np.zeros(len(r), np.int32), acts=acts))
    if finalize:
        finalize_run(path)
    return ref
