"""The data every benchmark section runs on: synthetic runs, and one (author, layer type, layer)
"slice" of activations read back from any run (synthetic or a real extraction).

A :class:`SyntheticWorkload` is a run layout plus the generator's knobs; its chunks come from
:func:`saestore.bench.synthetic.synthetic_run_data` and depend only on ``(seed, author, chunk)``,
so the saestore writer, the seed baseline and the statistics all see exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saestore import protocol
from saestore.nonzeros import SparseActs
from saestore.writer import ChunkData, RunLayout, RunWriter, create_run, finalize_run

__all__ = ["SyntheticWorkload", "ActSlice", "synthetic_attrs", "read_slice", "write_slice", "tree_bytes"]


@dataclass(frozen=True, kw_only=True)
class SyntheticWorkload:
    """A synthetic run: ``n_authors`` authors of ``n_docs`` documents, SAE-like activations."""

    n_authors: int
    n_docs: int
    """documents per author."""
    n_tok: int
    """token positions per document (max_seq_len - 1)."""
    n_features: int = 16384
    l0: float = 70.0
    """mean active features per real token."""
    pad_frac: float = 0.49
    layer_types: tuple[str, ...] = protocol.LAYER_TYPES
    layers: tuple[int, ...] = (12,)
    chunk_docs: int = 4
    seed: int = 0

    @property
    def authors(self) -> tuple[str, ...]:
        return tuple(f"author{a:02d}" for a in range(self.n_authors))

    def layout(self, storage_format: str = "sparse", value_dtype: str = "float32") -> RunLayout:
        storage = protocol.StorageInfo(format=storage_format, value_dtype=value_dtype, chunk_docs=self.chunk_docs)
        return RunLayout(authors=self.authors, n_docs=(self.n_docs,) * self.n_authors, n_tok=self.n_tok,
                         layer_types=self.layer_types, layers=self.layers, n_features=self.n_features,
                         storage=storage)

    def chunks(self) -> Iterator[tuple[int, int, ChunkData]]:
        """``(author_idx, chunk_idx, ChunkData)`` for every doc-chunk, generated lazily."""
        from saestore.bench.synthetic import synthetic_run_data

        yield from synthetic_run_data(self.layout(), l0=self.l0, pad_frac=self.pad_frac, seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyntheticWorkload:
        data = dict(data)
        data["layer_types"] = tuple(data["layer_types"])
        data["layers"] = tuple(data["layers"])
        return cls(**data)

    def scaled(self, factor: int) -> SyntheticWorkload:
        """The same run with ``factor`` times the documents per author."""
        return dataclasses.replace(self, n_docs=self.n_docs * factor)


def synthetic_attrs(layout: RunLayout, config: dict[str, Any] | None = None, *, model: str = "synthetic-bench",
                    expected_l0: float | None = None, sae_path: str | None = None,
                    hook_layer: int | None = None) -> protocol.RunAttrs:
    """Root attributes of a synthetic run (benchmarks and tests): one made-up JumpReLU SAE per
    (layer type, layer) of ``layout``, status running, a fixed creation time.

    ``config`` is the run's configuration; by default the layout's sizes under ``model`` (so the
    config hash covers the layout). The attributes' model is ``config["model"]`` ("synthetic" if
    absent). Each SAE has ``expected_l0`` and ``sae_path`` as given and reads
    ``blocks.{hook_layer}.hook_resid_post`` (default: its own layer)."""
    if config is None:
        config = {"model": model, "authors": list(layout.authors), "n_docs": list(layout.n_docs),
                  "n_tok": layout.n_tok, "n_features": layout.n_features, "layer_types": list(layout.layer_types),
                  "layers": list(layout.layers), "storage": dataclasses.asdict(layout.storage)}

    def sae(layer: int) -> protocol.SAEInfo:
        hook = f"blocks.{layer if hook_layer is None else hook_layer}.hook_resid_post"
        return protocol.SAEInfo(release=None, sae_id=None, path=sae_path, hook_name=hook, width=layout.n_features,
                                expected_l0=expected_l0, architecture="jumprelu")

    saes = {lt: {str(layer): sae(layer) for layer in layout.layers} for lt in layout.layer_types}
    return protocol.RunAttrs(
        protocol_version=protocol.PROTOCOL_VERSION, layout=protocol.LAYOUT, status="running",
        created_at="2026-01-01T00:00:00+00:00", finalized_at=None, config=config,
        config_hash=protocol.config_hash(config), model=str(config.get("model", "synthetic")), setting="baseline",
        prompt_template=None, use_error_term=False, storage=layout.storage, saes=saes)


@dataclass(frozen=True, kw_only=True)
class ActSlice:
    """One (author, layer type, layer) worth of activations with the author's per-token data."""

    author: str
    layer_type: str
    layer: int
    n_tok: int
    n_features: int
    chunk_docs: int
    chunks: tuple[ChunkData, ...]
    """doc-chunks in order; ``acts`` holds only ``(layer_type, layer)`` as SparseActs."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.layer_type, self.layer)

    @property
    def n_docs(self) -> int:
        return sum(len(c.doc_id_D) for c in self.chunks)

    @property
    def nnz(self) -> int:
        return sum(c.acts[self.key].nnz for c in self.chunks)

    @property
    def n_valid(self) -> int:
        return sum(int(np.count_nonzero(c.valid_DT)) for c in self.chunks)

    def acts(self) -> SparseActs:
        """The nonzeros of the whole author, ``(n_docs, n_tok, n_features)``."""
        return SparseActs.concat([c.acts[self.key] for c in self.chunks])

    def nonzeros(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(doc, tok, feature, value) of every nonzero, row-major, ``doc`` over the whole author."""
        a = self.acts()
        return a.doc, a.tok, a.feature, a.values

    def dense(self) -> np.ndarray:
        """The dense float32 (doc, tok, feature) array (n_docs · n_tok · n_features · 4 bytes)."""
        return self.acts().to_dense()

    def active_per_token(self) -> np.ndarray:
        return self.acts().active_per_token().ravel()

    def per_token(self, name: str) -> np.ndarray:
        """A per-token field over the whole author: token_id, token, valid, ce_loss or entropy."""
        field = {"token_id": "token_id_DT", "token": "token_DT", "valid": "valid_DT", "ce_loss": "ce_loss_DT",
                 "entropy": "entropy_DT"}[name]
        return np.concatenate([getattr(c, field) for c in self.chunks], axis=0)

    def per_doc(self, name: str) -> list[Any]:
        return [x for c in self.chunks for x in getattr(c, name)]

    def layout(self, storage_format: str = "sparse", value_dtype: str = "float32") -> RunLayout:
        storage = protocol.StorageInfo(format=storage_format, value_dtype=value_dtype, chunk_docs=self.chunk_docs)
        return RunLayout(authors=(self.author,), n_docs=(self.n_docs,), n_tok=self.n_tok,
                         layer_types=(self.layer_type,), layers=(self.layer,), n_features=self.n_features,
                         storage=storage)


def slice_from_chunks(chunks: Iterator[tuple[int, int, ChunkData]], author_idx: int, author: str,
                      layer_type: str, layer: int, n_tok: int, n_features: int, chunk_docs: int) -> ActSlice:
    """Keep one author's chunks and one (layer type, layer) of their activations."""
    kept = [dataclasses.replace(data, acts={(layer_type, layer): data.acts[(layer_type, layer)]})
            for a, _, data in chunks if a == author_idx]
    return ActSlice(author=author, layer_type=layer_type, layer=layer, n_tok=n_tok, n_features=n_features,
                    chunk_docs=chunk_docs, chunks=tuple(kept))


def read_slice(path: str | Path, author_idx: int, layer_type: str, layer: int) -> ActSlice:
    """Read one (author, layer type, layer) of a stored run back, chunk by chunk (sparse decode)."""
    import zarr

    from saestore.reader import read_chunk_acts
    from saestore.writer import read_layout

    path = str(path)
    group = zarr.open_group(path, mode="r")
    layout = read_layout(group)
    li = layout.layers.index(layer)
    n_tok = layout.n_tok
    chunks = []
    sae_arr = group[layer_type]
    for c in range(layout.n_chunks(author_idx)):
        docs = layout.chunk_docs_range(author_idx, c)
        n_d = len(docs)
        acts = read_chunk_acts(sae_arr, (author_idx, li, c, 0, 0)).docs(0, n_d)
        sl = (author_idx, slice(docs.start, docs.stop))

        def var(name: str, sl: tuple = sl) -> np.ndarray:
            return group[name][sl]

        chunks.append(ChunkData(
            token_id_DT=var("token_id"), token_DT=var("token"), valid_DT=var("valid_mask"),
            ce_loss_DT=var("ce_loss"), entropy_DT=var("entropy"), text_D=[str(x) for x in var("text")],
            doc_id_D=var("doc_id"), doc_length_D=var("doc_length"), n_truncated_D=var("n_truncated"),
            acts={(layer_type, layer): acts}))
    return ActSlice(author=layout.authors[author_idx], layer_type=layer_type, layer=layer, n_tok=n_tok,
                    n_features=layout.n_features, chunk_docs=layout.storage.chunk_docs, chunks=tuple(chunks))


def write_workload(wl: SyntheticWorkload, path: str | Path, *, layout: RunLayout | None = None,
                   attrs: protocol.RunAttrs | None = None) -> dict[str, Any]:
    """Write every doc-chunk of ``wl`` into a new run at ``path`` (a folder or a URL) with
    :class:`RunWriter`, timing the writes alone: ``{nnz, write_s, write_nnz_per_s}``."""
    import time

    layout = layout or wl.layout()
    create_run(str(path), layout, attrs or synthetic_attrs(layout))
    writer = RunWriter(str(path))
    nnz = 0
    t0 = time.perf_counter()
    for a, c, data in wl.chunks():
        writer.write_chunk(a, c, data)
        nnz += sum(acts.nnz for acts in data.acts.values())
    seconds = time.perf_counter() - t0
    finalize_run(str(path))
    return {"nnz": nnz, "write_s": seconds, "write_nnz_per_s": nnz / max(seconds, 1e-9)}


def write_slice(sl: ActSlice, path: str | Path, storage_format: str = "sparse",
                value_dtype: str = "float32") -> Path:
    """Store a slice as its own one-author saestore run (dense slices get dense SAE chunks)."""
    layout = sl.layout(storage_format, value_dtype)
    create_run(str(path), layout, synthetic_attrs(layout), mode="overwrite")
    writer = RunWriter(str(path))
    for c, data in enumerate(sl.chunks):
        if storage_format == "dense":
            data = dataclasses.replace(data, acts={sl.key: data.acts[sl.key].to_dense()})
        writer.write_chunk(0, c, data)
    finalize_run(str(path))
    return Path(path)


def tree_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (a file's own size if it is one)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
