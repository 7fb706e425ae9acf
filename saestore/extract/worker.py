"""One extraction worker: a model with SAEs on one device, streaming its authors into the run.

Batches may span doc-chunks of one author; only nonzeros leave the device. A batch's results stay
batch-level arrays (:class:`BatchResult`, one ``SparseActs`` per SAE over the whole batch), and each
doc-chunk is a slice of them, written (payloads, then marker) as soon as its last document is done,
so host memory holds at most one batch plus one doc-chunk of sparse results whatever the corpus size.
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


@dataclass(frozen=True, kw_only=True)
class BatchResult:
    """What a batch leaves on the host, documents along the first axis of every array; a doc-chunk
    is a slice of it (:meth:`docs`), or of several batches joined (:meth:`concat`) when
    ``batch_size < chunk_docs``. Per-token arrays are ``(B, n_tok)`` with PROTOCOL.md §2.5's padding."""

    token_ids: np.ndarray  # (B, T) int32, -1 at padding
    valid: np.ndarray  # (B, T) bool
    ce: np.ndarray  # (B, T) float32, NaN at padding
    entropy: np.ndarray  # (B, T) float32, NaN at padding
    n_truncated: np.ndarray  # (B,) int32
    acts: dict[tuple[str, int], SparseActs]  # (layer type, layer) → (B, T, d_sae) nonzeros
    per_sae: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # §2.6, (B, T) or (B,)
    per_doc: dict[str, np.ndarray] = field(default_factory=dict)  # §2.6 without a layer, (B,)

    @property
    def n_docs(self) -> int:
        return int(self.valid.shape[0])

    def docs(self, start: int, stop: int) -> BatchResult:
        """Documents ``start … stop-1``."""
        return BatchResult(token_ids=self.token_ids[start:stop], valid=self.valid[start:stop], ce=self.ce[start:stop],
                           entropy=self.entropy[start:stop], n_truncated=self.n_truncated[start:stop],
                           acts={k: a.docs(start, stop) for k, a in self.acts.items()},
                           per_sae={k: v[start:stop] for k, v in self.per_sae.items()},
                           per_doc={k: v[start:stop] for k, v in self.per_doc.items()})

    @classmethod
    def concat(cls, parts: Sequence[BatchResult]) -> BatchResult:
        """Batches one after the other."""
        if len(parts) == 1:
            return parts[0]

        def cat(get: Any) -> np.ndarray:
            return np.concatenate([get(p) for p in parts])

        first = parts[0]
        return cls(token_ids=cat(lambda p: p.token_ids), valid=cat(lambda p: p.valid), ce=cat(lambda p: p.ce),
                   entropy=cat(lambda p: p.entropy), n_truncated=cat(lambda p: p.n_truncated),
                   acts={k: SparseActs.concat([p.acts[k] for p in parts]) for k in first.acts},
                   per_sae={k: cat(lambda p, k=k: p.per_sae[k]) for k in first.per_sae},
                   per_doc={k: cat(lambda p, k=k: p.per_doc[k]) for k in first.per_doc})


def _padded(x_BW: torch.Tensor, valid_BW: torch.Tensor, n_tok: int) -> np.ndarray:
    """A ``(B, width)`` per-token tensor as a ``(B, n_tok)`` float32 host array, NaN at padding."""
    x = torch.where(valid_BW, x_BW.float(), float("nan")).cpu().numpy()
    out = np.full((x.shape[0], n_tok), np.nan, np.float32)
    out[:, : x.shape[1]] = x
    return out


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
    def run_batch(self, prompt: list[int], docs: Sequence[Document]) -> BatchResult:
        """Forward one batch of one author's documents; return its sparse results on the host."""
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
        B = len(docs)
        token_ids = np.full((B, n_tok), -1, np.int32)
        for b, ids in enumerate(doc_ids):
            token_ids[b, : len(ids)] = ids
        valid_np = token_ids >= 0
        width = max(1, int(valid_np.sum(axis=1).max()))
        input_ids = torch.full((B, p_len + width), self.pad_id, dtype=torch.long)
        input_ids[:, :p_len] = torch.tensor(prompt, dtype=torch.long)
        input_ids[:, p_len:] = torch.from_numpy(np.where(valid_np, token_ids, self.pad_id)[:, :width])
        mask = torch.zeros((B, p_len + width), dtype=torch.long)
        mask[:, :p_len] = 1
        mask[:, p_len:] = torch.from_numpy(valid_np[:, :width])
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
        valid = mask[:, p_len:].bool()
        window = slice(p_len, p_len + width)
        acts_out: dict[tuple[str, int], SparseActs] = {}
        per_sae: dict[tuple[str, int], np.ndarray] = {}
        for spec, sae in zip(self.specs, self.saes, strict=True):
            acts = cache[f"{spec.hook_name}.hook_sae_acts_post"][:, window]
            acts = acts * valid[..., None]
            if not torch.isfinite(acts).all():
                raise SaestoreError(f"{spec.layer_type} SAE at layer {spec.layer} produced NaN/inf activations")
            arch = _architecture(sae)
            if arch in NON_NEGATIVE and bool((acts < 0).any()):
                raise SaestoreError(f"{spec.layer_type} SAE at layer {spec.layer} ({arch}) produced negative activations")
            nz = acts.nonzero()  # row-major (doc, tok, feature) order
            vals = acts[nz[:, 0], nz[:, 1], nz[:, 2]].float().cpu().numpy()
            nz = nz.cpu().numpy()
            acts_out[(spec.layer_type, spec.layer)] = SparseActs.from_coords(nz[:, 0], nz[:, 1], nz[:, 2], vals,
                                                                             (B, n_tok, spec.d_sae))
            metrics = recon_metrics(cache[f"{spec.hook_name}.hook_sae_input"][:, window],
                                    cache[f"{spec.hook_name}.hook_sae_recons"][:, window], valid)
            for field_name, values in metrics.items():
                per_sae[(f"{spec.layer_type}_{field_name}", spec.layer)] = _padded(values, valid, n_tok)
        per_doc: dict[str, np.ndarray] = {}
        if self.cfg.loss_recovered:
            clean, per_spec = loss_recovered_ce(self.model, self.saes, [s.hook_name for s in self.specs], input_ids,
                                                mask, p_len, width, valid)
            per_doc["ce_clean"] = clean.float().cpu().numpy()
            for spec, (spliced, zeroed) in zip(self.specs, per_spec, strict=True):
                per_sae[(f"{spec.layer_type}_ce_spliced", spec.layer)] = spliced.float().cpu().numpy()
                per_sae[(f"{spec.layer_type}_ce_zero", spec.layer)] = zeroed.float().cpu().numpy()
        return BatchResult(token_ids=token_ids, valid=valid_np, ce=_padded(ce, valid, n_tok),
                           entropy=_padded(ent, valid, n_tok), n_truncated=np.asarray(truncated, np.int32),
                           acts=acts_out, per_sae=per_sae, per_doc=per_doc)

    def chunk_data(self, docs: Sequence[Document], result: BatchResult) -> ChunkData:
        """One doc-chunk's ChunkData from its documents and their slice of the batch results."""
        token = np.full(result.valid.shape, "", dtype=object)
        token[result.valid] = self.token_text(result.token_ids[result.valid])
        dense = self.cfg.storage_format == "dense"
        return ChunkData(
            token_id_DT=result.token_ids, token_DT=token, valid_DT=result.valid, ce_loss_DT=result.ce,
            entropy_DT=result.entropy, text_D=[d.text for d in docs],
            doc_id_D=np.array([d.doc_id for d in docs], np.int64),
            doc_length_D=result.valid.sum(axis=1).astype(np.int32), n_truncated_D=result.n_truncated,
            acts={k: a.to_dense() if dense else a for k, a in result.acts.items()},
            per_sae=result.per_sae, per_doc=result.per_doc)


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
        held: BatchResult | None = None  # results of documents held_from … done-1 of the group
        held_from = 0
        for start in range(0, len(docs), ex.cfg.batch_size):
            batch = docs[start : start + ex.cfg.batch_size]
            t0 = time.perf_counter()
            out = ex.run_batch(prompt, batch)
            held = out if held is None else BatchResult.concat([held, out])
            done = start + len(batch)
            n_tok = int(out.valid.sum())
            stats.n_docs += len(batch)
            stats.n_tokens += n_tok
            for (lt, layer), acts in out.acts.items():
                stats.nnz[f"{lt}/{layer}"] = stats.nnz.get(f"{lt}/{layer}", 0) + acts.nnz
            while pending:
                r = layout.chunk_docs_range(work.author_idx, pending[0])
                if r.stop - first > done:
                    break
                part = held.docs(r.start - first - held_from, r.stop - first - held_from)
                writer.write_chunk(work.author_idx, pending.pop(0), ex.chunk_data(docs[r.start - first:r.stop - first],
                                                                                  part))
            keep_from = layout.chunk_docs_range(work.author_idx, pending[0]).start - first if pending else done
            drop = min(keep_from, done) - held_from
            held, held_from = held.docs(drop, held.n_docs), held_from + drop
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
