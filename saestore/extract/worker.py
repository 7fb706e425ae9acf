"""One extraction worker: a model with SAEs on one device, streaming its authors into the run.

Batches may span doc-chunks of one author; only nonzeros leave the device; a doc-chunk is written
(payloads, then marker) as soon as its last document is done, so host memory holds at most one
batch plus one doc-chunk of sparse results whatever the corpus size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from saestore import faults
from saestore.errors import SaestoreError, StoreWriteError
from saestore.extract.config import ExtractConfig
from saestore.extract.data import Document
from saestore.extract.metrics import token_metrics
from saestore.extract.models import SAESpec, encode_documents
from saestore.extract.quality import loss_recovered_ce, recon_metrics
from saestore.nonzeros import SparseActs
from saestore.writer import ChunkData, RunWriter

log = logging.getLogger(__name__)

#: SAE architectures whose activations are >= 0 (checked on every batch)
NON_NEGATIVE = ("jumprelu", "standard", "relu", "topk", "gated", "batchtopk", "matryoshka_batchtopk")


def _architecture(sae: Any) -> str:
    arch = getattr(sae.cfg, "architecture", "")
    return str(arch() if callable(arch) else arch).lower()


@dataclass(frozen=True, kw_only=True)
class AuthorWork:
    author_idx: int
    author: str
    docs: tuple[Document, ...]


@dataclass
class WorkerStats:
    """What one worker did; summed by the coordinator."""

    n_docs: int = 0
    n_tokens: int = 0
    nnz: dict[str, int] = field(default_factory=dict)  # "res/3" -> nonzeros
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # author -> error

    @classmethod
    def failing(cls, authors: Iterable[str], reason: str) -> WorkerStats:
        """The stats of a worker that did none of ``authors``, for ``reason``."""
        return cls(failed={a: reason for a in authors})

    @classmethod
    def merge(cls, parts: Iterable[WorkerStats]) -> WorkerStats:
        """The run's stats from its workers': sums, the longest wall time, every failure."""
        total = cls()
        for s in parts:
            total.n_docs += s.n_docs
            total.n_tokens += s.n_tokens
            total.seconds = max(total.seconds, s.seconds)
            total.failed.update(s.failed)
            for k, v in s.nnz.items():
                total.nnz[k] = total.nnz.get(k, 0) + v
        return total

    def first_failure(self) -> str | None:
        """The first recorded failure (authors in order) for one-line messages, naming its author."""
        return next((m if repr(a) in m else f"{a!r}: {m}" for a, m in sorted(self.failed.items())), None)


@dataclass
class _DocResult:
    token_ids: np.ndarray
    ce: np.ndarray
    entropy: np.ndarray
    n_truncated: int
    acts: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]]  # (tok, feature, value)
    quality: dict[tuple[str, int | None], np.ndarray | float] = field(default_factory=dict)  # §2.6 variables


class Extractor:
    """A loaded model + SAEs on one device, turning documents into stored doc-chunks."""

    def __init__(self, cfg: ExtractConfig, specs: Sequence[SAESpec], device: str) -> None:
        from saestore.extract.models import check_sae_matches_model, load_model, load_sae

        self.cfg, self.specs, self.device = cfg, list(specs), device
        self.model = load_model(cfg.model, device, cfg.dtype)
        self.saes = []
        for spec in self.specs:
            sae = load_sae(spec, device, cfg.dtype)
            check_sae_matches_model(sae, self.model, spec)
            self.saes.append(sae)
        self.tokenizer = self.model.tokenizer
        bos = self.tokenizer.bos_token_id
        self.bos_id = bos if bos is not None else self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self._token_text: dict[int, str] = {}
        self.n_ctx = int(self.model.cfg.n_ctx)

    def prompt_ids(self, author: str) -> list[int]:
        ids = [self.bos_id]
        if self.cfg.setting == "prompted":
            text = self.cfg.prompt_template.format(style=author)
            ids += self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def token_text(self, ids: np.ndarray) -> np.ndarray:
        """Decoded text of each token id (object array like ``ids``): each distinct id is decoded once
        per worker, alone (``decode([id])``, so the text is the token's own, not a merge with neighbours)."""
        uniq, inverse = np.unique(np.asarray(ids), return_inverse=True)
        for i in uniq.tolist():
            if i not in self._token_text:
                self._token_text[i] = self.tokenizer.decode([i])
        texts = np.empty(uniq.size, dtype=object)
        texts[:] = [self._token_text[i] for i in uniq.tolist()]
        return texts[inverse].reshape(np.shape(ids))

    @torch.inference_mode()
    def run_batch(self, prompt: list[int], docs: Sequence[Document]) -> list[_DocResult]:
        """Forward one batch of one author's documents; return per-document sparse results on the host."""
        n_tok, p_len = self.cfg.n_tok, len(prompt)
        if p_len >= self.n_ctx:
            raise SaestoreError(
                f"the prompt alone ({p_len} tokens with BOS) fills the model context {self.n_ctx}: shorten "
                "--prompt_template, or the author's name")
        if p_len + n_tok > self.n_ctx:
            raise SaestoreError(
                f"prompt ({p_len} tokens) + max_seq_len - 1 ({n_tok}) exceeds the model context {self.n_ctx}; "
                f"lower --max_seq_len to {self.n_ctx - p_len + 1}")
        doc_ids, truncated = encode_documents(self.tokenizer, [d.text for d in docs], n_tok)
        lengths = torch.tensor([len(x) for x in doc_ids], device=self.device)
        width = max(1, int(lengths.max()))
        B = len(docs)
        input_ids = torch.full((B, p_len + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, p_len + width), dtype=torch.long)
        for b, ids in enumerate(doc_ids):
            input_ids[b, : p_len + len(ids)] = torch.tensor(prompt + ids, dtype=torch.long)
            mask[b, : p_len + len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits, cache = self.model.run_with_cache_with_saes(
            input_ids, saes=self.saes, attention_mask=mask, use_error_term=self.cfg.use_error_term,
            names_filter=lambda name: name.endswith(("hook_sae_acts_post", "hook_sae_input", "hook_sae_recons")))
        faults.point("forward")
        if not torch.isfinite(logits).all():
            raise SaestoreError(
                f"the model produced NaN/inf logits on documents {[d.doc_id for d in docs]}; "
                f"try --dtype float32 (now {self.cfg.dtype})")
        ce, ent = token_metrics(logits, input_ids, p_len, width)
        valid = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        per_doc_acts: list[dict] = [{} for _ in docs]
        for spec, sae in zip(self.specs, self.saes, strict=True):
            acts = cache[f"{spec.hook_name}.hook_sae_acts_post"][:, p_len : p_len + width]
            acts = acts * valid[..., None]
            if not torch.isfinite(acts).all():
                raise SaestoreError(f"{spec.layer_type} SAE at layer {spec.layer} produced NaN/inf activations")
            arch = _architecture(sae)
            if arch in NON_NEGATIVE and bool((acts < 0).any()):
                raise SaestoreError(f"{spec.layer_type} SAE at layer {spec.layer} ({arch}) produced negative activations")
            nz = acts.nonzero()  # row-major (doc, tok, feature) order
            vals = acts[nz[:, 0], nz[:, 1], nz[:, 2]].float().cpu().numpy()
            nz = nz.cpu().numpy()
            bounds = np.searchsorted(nz[:, 0], np.arange(B + 1))
            for b in range(B):
                s, e = bounds[b], bounds[b + 1]
                per_doc_acts[b][(spec.layer_type, spec.layer)] = (nz[s:e, 1], nz[s:e, 2], vals[s:e])
        per_doc_quality: list[dict] = [{} for _ in docs]
        for spec in self.specs:
            window = slice(p_len, p_len + width)
            metrics = recon_metrics(cache[f"{spec.hook_name}.hook_sae_input"][:, window],
                                    cache[f"{spec.hook_name}.hook_sae_recons"][:, window], valid)
            for field_name, values in metrics.items():
                values = values.cpu().numpy()
                for b in range(B):
                    per_doc_quality[b][(f"{spec.layer_type}_{field_name}", spec.layer)] = values[b, : len(doc_ids[b])]
        if self.cfg.loss_recovered:
            clean, per_sae = loss_recovered_ce(self.model, self.saes, [s.hook_name for s in self.specs], input_ids,
                                               mask, p_len, width, valid)
            for b in range(B):
                per_doc_quality[b][("ce_clean", None)] = float(clean[b])
                for spec, (spliced, zeroed) in zip(self.specs, per_sae, strict=True):
                    per_doc_quality[b][(f"{spec.layer_type}_ce_spliced", spec.layer)] = float(spliced[b])
                    per_doc_quality[b][(f"{spec.layer_type}_ce_zero", spec.layer)] = float(zeroed[b])
        ce_np, ent_np = ce.cpu().numpy(), ent.cpu().numpy()
        return [
            _DocResult(token_ids=np.asarray(doc_ids[b], dtype=np.int32), ce=ce_np[b, : len(doc_ids[b])],
                       entropy=ent_np[b, : len(doc_ids[b])], n_truncated=truncated[b], acts=per_doc_acts[b],
                       quality=per_doc_quality[b])
            for b in range(B)
        ]

    def chunk_data(self, docs: Sequence[Document], results: Sequence[_DocResult]) -> ChunkData:
        """Assemble one doc-chunk's ChunkData from its documents' results."""
        n_tok, D = self.cfg.n_tok, len(docs)
        token_id = np.full((D, n_tok), -1, np.int32)
        token = np.full((D, n_tok), "", dtype=object)
        valid = np.zeros((D, n_tok), bool)
        ce = np.full((D, n_tok), np.nan, np.float32)
        ent = np.full((D, n_tok), np.nan, np.float32)
        for d, r in enumerate(results):
            n = r.token_ids.size
            token_id[d, :n] = r.token_ids
            token[d, :n] = self.token_text(r.token_ids)
            valid[d, :n] = True
            ce[d, :n], ent[d, :n] = r.ce, r.entropy
        acts: dict[tuple[str, int], SparseActs | np.ndarray] = {}
        for spec in self.specs:
            key = (spec.layer_type, spec.layer)
            parts = [r.acts[key] for r in results]
            sp = SparseActs.from_coords(
                np.concatenate([np.full(p[0].size, d, np.int64) for d, p in enumerate(parts)]),
                np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), (D, n_tok, spec.d_sae))
            if self.cfg.storage_format == "dense":
                dense = np.zeros((D, n_tok, spec.d_sae), np.float32)
                dense[sp.doc, sp.tok, sp.feature] = sp.values
                acts[key] = dense
            else:
                acts[key] = sp
        return ChunkData(
            token_id_DT=token_id, token_DT=token, valid_DT=valid, ce_loss_DT=ce, entropy_DT=ent,
            text_D=[d.text for d in docs], doc_id_D=np.array([d.doc_id for d in docs], np.int64),
            doc_length_D=valid.sum(axis=1).astype(np.int32),
            n_truncated_D=np.array([r.n_truncated for r in results], np.int32), acts=acts,
            **self._quality_arrays(results))

    def _quality_arrays(self, results: Sequence[_DocResult]) -> dict[str, dict[Any, np.ndarray]]:
        """§2.6 variables of a doc-chunk as ChunkData's ``per_sae`` ((name, layer) → (D, T) or (D,)) and
        ``per_doc`` (name → (D,))."""
        per_sae: dict[Any, np.ndarray] = {}
        per_doc: dict[Any, np.ndarray] = {}
        for (name, layer), value in results[0].quality.items():
            if isinstance(value, np.ndarray):
                arr = np.full((len(results), self.cfg.n_tok), np.nan, np.float32)
                for d, r in enumerate(results):
                    arr[d, : r.quality[(name, layer)].size] = r.quality[(name, layer)]
            else:
                arr = np.array([r.quality[(name, layer)] for r in results], np.float32)
            if layer is None:
                per_doc[name] = arr
            else:
                per_sae[(name, layer)] = arr
        return {"per_sae": per_sae, "per_doc": per_doc}


def _groups(writer: RunWriter, work: AuthorWork, batch_size: int) -> Iterator[tuple[int, list[int], list[Document]]]:
    """(first document, pending doc-chunks, documents) of every batch group with a pending doc-chunk.

    Batches never depend on what is already done: an author's doc-chunks are grouped on a fixed grid
    of ``max(1, batch_size // chunk_docs)`` chunks and each group is split into the same batches
    every time, so a resumed run computes every value exactly as an uninterrupted run would (a group
    with a finished chunk is recomputed in full; only its pending chunks are written).
    """
    layout = writer.layout
    per_group = max(1, batch_size // layout.storage.chunk_docs)
    done = writer.done_chunks(work.author_idx)
    n_chunks = layout.n_chunks(work.author_idx)
    for g0 in range(0, n_chunks, per_group):
        chunks = range(g0, min(g0 + per_group, n_chunks))
        pending = [c for c in chunks if c not in done]
        if pending:
            first = layout.chunk_docs_range(work.author_idx, chunks[0]).start
            last = layout.chunk_docs_range(work.author_idx, chunks[-1]).stop
            yield first, pending, list(work.docs[first:last])


def extract_author(ex: Extractor, writer: RunWriter, work: AuthorWork, stats: WorkerStats, pbar: Any) -> None:
    """Extract every pending doc-chunk of one author, writing each as soon as its documents are done."""
    prompt = ex.prompt_ids(work.author)
    layout = writer.layout
    for first, pending, docs in _groups(writer, work, ex.cfg.batch_size):
        results: list[_DocResult] = []
        for start in range(0, len(docs), ex.cfg.batch_size):
            batch = docs[start : start + ex.cfg.batch_size]
            t0 = time.perf_counter()
            out = ex.run_batch(prompt, batch)
            results += out
            n_tok = sum(int(r.token_ids.size) for r in out)
            stats.n_docs += len(batch)
            stats.n_tokens += n_tok
            for r in out:
                for (lt, layer), (tok, _, _) in r.acts.items():
                    key = f"{lt}/{layer}"
                    stats.nnz[key] = stats.nnz.get(key, 0) + int(tok.size)
            while pending:
                r = layout.chunk_docs_range(work.author_idx, pending[0])
                if r.stop - first > len(results):
                    break
                sl = slice(r.start - first, r.stop - first)
                writer.write_chunk(work.author_idx, pending.pop(0), ex.chunk_data(docs[sl], results[sl]))
            if pbar is not None:
                pbar.update(len(batch))
                pbar.set_postfix_str(f"{work.author[:16]} {n_tok / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
        assert not pending, "every pending doc-chunk of the group must have been written"


def run_worker(path: str, cfg: ExtractConfig, specs: Sequence[SAESpec], work: Sequence[AuthorWork], device: str,
               rank: int = 0, n_threads: int | None = None) -> WorkerStats:
    """Extract ``work`` (this worker's authors) into the run at ``path``. One author's failure is
    recorded and the worker goes on with the next author."""
    if n_threads:
        torch.set_num_threads(n_threads)
    stats = WorkerStats()
    t0 = time.perf_counter()
    ex = Extractor(cfg, specs, device)
    writer = RunWriter(path)
    total = sum(len(docs) for w in work for _, _, docs in _groups(writer, w, cfg.batch_size))
    pbar = None
    if not cfg.quiet:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, desc=f"worker {rank} [{device}]", unit="doc", position=rank, leave=True,
                    dynamic_ncols=True)
    try:
        for i, w in enumerate(work):
            try:
                extract_author(ex, writer, w, stats, pbar)
            except StoreWriteError as e:  # the store cannot be written: the other authors would fail alike
                log.error("worker %d: stopping: %s", rank, e)
                for rest in work[i:]:
                    stats.failed[rest.author] = f"{type(e).__name__}: {e}"
                break
            except (SaestoreError, RuntimeError, ValueError, OSError) as e:
                log.error("worker %d: author %r failed: %s", rank, w.author, e)
                stats.failed[w.author] = f"{type(e).__name__}: {e}"
    finally:
        if pbar is not None:
            pbar.close()
    stats.seconds = time.perf_counter() - t0
    log.debug("worker %d (pid %d) done in %.1fs", rank, os.getpid(), stats.seconds)
    return stats
