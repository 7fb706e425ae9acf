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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from saestore import faults, protocol
from saestore.errors import SaestoreError
from saestore.extract.batches import WRITE_AHEAD, BatchResult, ChunkSink
from saestore.extract.config import ExtractConfig
from saestore.extract.data import Document
from saestore.extract.metrics import token_metrics
from saestore.extract.models import SAESpec, encode_with_spans
from saestore.extract.quality import loss_recovered_ce, recon_metrics
from saestore.extract.work import AuthorWork, WorkerStats
from saestore.nonzeros import SparseActs
from saestore.writer import ChunkData, RunLayout, RunWriter

log = logging.getLogger(__name__)

#: SAE architectures whose activations are >= 0 (checked on every batch)
NON_NEGATIVE = ("jumprelu", "standard", "relu", "topk", "gated", "batchtopk", "matryoshka_batchtopk")


def _architecture(sae: Any) -> str:
    arch = getattr(sae.cfg, "architecture", "")
    return str(arch() if callable(arch) else arch).lower()


def _host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as ``dtype`` on the host: on a GPU through pinned memory with a non-blocking copy (the
    caller synchronizes once per batch before reading it), on the CPU as it is."""
    t = t.to(dtype)
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class Extractor:
    """A loaded model + SAEs on one device, turning documents into stored doc-chunks."""

    def __init__(self, cfg: ExtractConfig, specs: Sequence[SAESpec], device: str) -> None:
        from saestore.extract.models import load_model, load_sae

        model = load_model(cfg.model, device, cfg.dtype)
        self._attach(cfg, specs, device, model, [load_sae(spec, device, cfg.dtype) for spec in specs])

    @classmethod
    def from_loaded(cls, cfg: ExtractConfig, specs: Sequence[SAESpec], device: str, model: Any,
                    saes: Sequence[Any]) -> Extractor:
        """An extractor around a model and SAEs already in memory (the GPU benchmark's random ones);
        the model needs a tokenizer."""
        ex = cls.__new__(cls)
        ex._attach(cfg, specs, device, model, list(saes))
        return ex

    def _attach(self, cfg: ExtractConfig, specs: Sequence[SAESpec], device: str, model: Any, saes: list[Any]) -> None:
        from saestore.extract.models import check_sae_matches_model

        self.cfg, self.specs, self.device, self.model, self.saes = cfg, list(specs), device, model, saes
        for spec, sae in zip(self.specs, self.saes, strict=True):
            check_sae_matches_model(sae, self.model, spec)
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
        """Forward one batch of one author's documents; return its sparse results on the host.

        Each SAE's nonzeros and §2.6 metrics are taken by hooks as the forward reaches it, so no
        SAE's activations, input or reconstruction outlive its layer; on a GPU the nonzeros go to
        the host as int32 rows/columns through pinned memory, and the batch synchronizes once.
        NaN/inf and negative values are checked on the nonzeros, NaN/inf logits on the stored CE
        and entropy (both are NaN wherever a logit they depend on is).
        """
        n_tok, p_len = self.cfg.n_tok, len(prompt)
        if p_len >= self.n_ctx:
            raise SaestoreError(
                f"the prompt alone ({p_len} tokens with BOS) fills the model context {self.n_ctx}: shorten "
                "--prompt_template, or the author's name")
        if p_len + n_tok > self.n_ctx:
            raise SaestoreError(
                f"prompt ({p_len} tokens) + max_seq_len - 1 ({n_tok}) exceeds the model context {self.n_ctx}; "
                f"lower --max_seq_len to {self.n_ctx - p_len + 1}")
        doc_ids, truncated, spans = encode_with_spans(self.tokenizer, [d.text for d in docs], n_tok)
        B = len(docs)
        token_ids = np.full((B, n_tok), -1, np.int32)
        char_span = np.full((2, B, n_tok), -1, np.int32)  # char_start, char_end (PROTOCOL.md §2.7)
        for b, ids in enumerate(doc_ids):
            token_ids[b, : len(ids)] = ids
            char_span[:, b, : len(ids)] = spans[b].T
        valid_np = token_ids >= 0
        width = max(1, int(valid_np.sum(axis=1).max()))
        input_ids = torch.full((B, p_len + width), self.pad_id, dtype=torch.long)
        input_ids[:, :p_len] = torch.tensor(prompt, dtype=torch.long)
        input_ids[:, p_len:] = torch.from_numpy(np.where(valid_np, token_ids, self.pad_id)[:, :width])
        mask = torch.zeros((B, p_len + width), dtype=torch.long)
        mask[:, :p_len] = 1
        mask[:, p_len:] = torch.from_numpy(valid_np[:, :width])
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        valid = mask[:, p_len:].bool()
        taken = _SAEHooks(self.specs, slice(p_len, p_len + width), valid, n_tok)
        with self.model.saes(saes=self.saes, use_error_term=self.cfg.use_error_term):
            logits = self.model.run_with_hooks(input_ids, attention_mask=mask, fwd_hooks=taken.hooks())
        faults.point("forward")
        ce, ent = token_metrics(logits, input_ids, p_len, width)
        del logits
        per_doc: dict[str, np.ndarray] = {"char_start": char_span[0], "char_end": char_span[1]}
        per_sae_doc: dict[tuple[str, int], torch.Tensor] = {}
        if self.cfg.loss_recovered:
            clean, per_spec = loss_recovered_ce(self.model, self.saes, [s.hook_name for s in self.specs], input_ids,
                                                mask, p_len, width, valid)
            per_doc["ce_clean"] = clean.float().cpu().numpy()
            for spec, (spliced, zeroed) in zip(self.specs, per_spec, strict=True):
                per_sae_doc[(f"{spec.layer_type}_ce_spliced", spec.layer)] = spliced
                per_sae_doc[(f"{spec.layer_type}_ce_zero", spec.layer)] = zeroed
        # one blocking copy of every per-token value; the nonzeros' non-blocking copies precede it
        stacked = torch.stack([torch.where(valid, ce, float("nan")), torch.where(valid, ent, float("nan")),
                               *taken.metric_values()]).float().cpu().numpy()
        per_token = np.full((len(stacked), B, n_tok), np.nan, np.float32)
        per_token[:, :, :width] = stacked
        if not (np.isfinite(per_token[0][valid_np]).all() and np.isfinite(per_token[1][valid_np]).all()):
            raise SaestoreError(
                f"the model produced NaN/inf logits on documents {[d.doc_id for d in docs]}; "
                f"try --dtype float32 (now {self.cfg.dtype})")
        acts = {}
        for spec, sae in zip(self.specs, self.saes, strict=True):
            nz = taken.nonzeros(spec, (B, n_tok, spec.d_sae))
            if not np.isfinite(nz.values).all():
                raise SaestoreError(f"{spec.layer_type} SAE at layer {spec.layer} produced NaN/inf activations")
            arch = _architecture(sae)
            if arch in NON_NEGATIVE and (nz.values < 0).any():
                raise SaestoreError(f"{spec.layer_type} SAE at layer {spec.layer} ({arch}) produced negative activations")
            acts[(spec.layer_type, spec.layer)] = nz
        n_m = len(protocol.QUALITY_METRICS)  # per SAE: its §2.6 metrics, packed along the last axis
        per_sae = {(protocol.quality_name(spec.layer_type), spec.layer):
                   np.stack(per_token[2 + j * n_m : 2 + (j + 1) * n_m], axis=-1) for j, spec in enumerate(self.specs)}
        per_sae.update({key: v.float().cpu().numpy() for key, v in per_sae_doc.items()})
        token = np.full((B, n_tok), "", dtype=object)
        token[valid_np] = self.token_text(token_ids[valid_np])
        return BatchResult(token_ids=token_ids, token=token, valid=valid_np, ce=per_token[0], entropy=per_token[1],
                           n_truncated=np.asarray(truncated, np.int32), acts=acts, per_sae=per_sae, per_doc=per_doc)

    def chunk_data(self, docs: Sequence[Document], result: BatchResult, layout: RunLayout | None = None) -> ChunkData:
        """One doc-chunk's ChunkData from its documents and their slice of the batch results, holding
        the optional variables (PROTOCOL.md §2.7) that the run's ``layout`` has (default: all)."""
        dense = self.cfg.storage_format == "dense"
        per_doc = dict(result.per_doc)
        if layout is not None and not layout.char_offsets:  # a run created before offsets were stored
            per_doc = {k: v for k, v in per_doc.items() if k not in ("char_start", "char_end")}
        if docs and docs[0].meta:
            meta = np.empty((len(docs), len(docs[0].meta)), dtype=object)
            meta[:] = [list(d.meta) for d in docs]
            per_doc["doc_meta"] = meta
        return ChunkData(
            token_id_DT=result.token_ids, token_DT=result.token, valid_DT=result.valid, ce_loss_DT=result.ce,
            entropy_DT=result.entropy, text_D=[d.text for d in docs],
            doc_id_D=np.array([d.doc_id for d in docs], np.int64),
            doc_length_D=result.valid.sum(axis=1).astype(np.int32), n_truncated_D=result.n_truncated,
            acts={k: a.to_dense() if dense else a for k, a in result.acts.items()},
            per_sae=result.per_sae, per_doc=per_doc)


class _SAEHooks:
    """Forward hooks that take, per SAE, its nonzeros at valid tokens (on ``hook_sae_acts_post``)
    and its §2.6 metrics (``hook_sae_input`` is held until ``hook_sae_recons``, then dropped)."""

    def __init__(self, specs: Sequence[SAESpec], window: slice, valid_BW: torch.Tensor, n_tok: int) -> None:
        self.specs, self.window, self.valid, self.n_tok = list(specs), window, valid_BW, n_tok
        self._inputs: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, dict[str, torch.Tensor]] = {}
        self._nonzeros: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def hooks(self) -> list[tuple[str, Any]]:
        out = []
        for spec in self.specs:
            h = spec.hook_name
            out += [(f"{h}.hook_sae_input", lambda x, hook, h=h: self._input(h, x)),
                    (f"{h}.hook_sae_acts_post", lambda x, hook, h=h: self._acts(h, x)),
                    (f"{h}.hook_sae_recons", lambda x, hook, h=h: self._recons(h, x))]
        return out

    def _input(self, h: str, x: torch.Tensor) -> None:
        self._inputs[h] = x[:, self.window]

    def _recons(self, h: str, xhat: torch.Tensor) -> None:
        self._metrics[h] = recon_metrics(self._inputs.pop(h), xhat[:, self.window], self.valid)

    def _acts(self, h: str, acts: torch.Tensor) -> None:
        a = acts[:, self.window]
        nz = ((a != 0) & self.valid[..., None]).nonzero()  # row-major (doc, tok, feature); NaN kept, checked later
        values = a[nz[:, 0], nz[:, 1], nz[:, 2]]
        rows = nz[:, 0] * self.n_tok + nz[:, 1]
        narrow = torch.int32 if acts.device.type == "cuda" else torch.int64
        self._nonzeros[h] = (_host(rows, narrow), _host(nz[:, 2], narrow), _host(values, torch.float32))

    def metric_values(self) -> list[torch.Tensor]:
        """Every SAE's (B, W) §2.6 metrics, SAE by SAE, each in the ``metric`` coordinate's order."""
        return [self._metrics[s.hook_name][m] for s in self.specs for m in protocol.QUALITY_METRICS]

    def nonzeros(self, spec: SAESpec, shape: tuple[int, int, int]) -> SparseActs:
        """The nonzeros of ``spec``'s SAE (after the batch's synchronizing copy)."""
        rows, cols, values = (t.numpy() for t in self._nonzeros.pop(spec.hook_name))
        return SparseActs(rows=rows.astype(np.int64, copy=False), cols=cols.astype(np.int64, copy=False),
                          values=values, shape=shape)


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


def extract_author(ex: Extractor, writer: RunWriter, work: AuthorWork, stats: WorkerStats, pbar: Any,
                   sink: ChunkSink) -> None:
    """Extract every pending doc-chunk of one author, handing each to ``sink`` as soon as its
    documents are done. The sink may still be writing the author's last doc-chunks on return (the
    next author's forward overlaps them); a failed write raises here or at a later author."""
    prompt = ex.prompt_ids(work.author)
    layout = writer.layout
    try:
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
                    sink.submit((work.author_idx, pending.pop(0), docs[r.start - first:r.stop - first], part))
                keep_from = layout.chunk_docs_range(work.author_idx, pending[0]).start - first if pending else done
                drop = min(keep_from, done) - held_from
                held, held_from = held.docs(drop, held.n_docs), held_from + drop
                if pbar is not None:
                    pbar.update(len(batch))
                    pbar.set_postfix_str(f"{work.author[:16]} {n_tok / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
            assert not pending, "every pending doc-chunk of the group must have been submitted"
    except BaseException as e:
        failed_write = sink.drain(raise_errors=False)  # the finished doc-chunks are still written
        if failed_write is not None and failed_write is not e:
            raise failed_write from e
        raise


def write_logit_effects(ex: Extractor, writer: RunWriter) -> None:
    """Store each SAE's logit effects (``--logit_k``, PROTOCOL.md §2.7) unless already stored; before
    any doc-chunk, so a run with a finished doc-chunk has them."""
    from saestore.extract.quality import logit_effects

    layout = writer.layout
    for lt in layout.layer_types:
        if not writer.needs_logit_effects(lt):
            continue
        by_layer = {spec.layer: sae for spec, sae in zip(ex.specs, ex.saes, strict=True) if spec.layer_type == lt}
        parts = [logit_effects(ex.model, by_layer[layer], lt, layer, layout.logit_k) for layer in layout.layers]
        ids, values = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
        writer.write_logit_effects(lt, ids, ex.token_text(ids), values)


def run_worker(path: str, cfg: ExtractConfig, specs: Sequence[SAESpec], work: Sequence[AuthorWork], device: str,
               rank: int = 0, n_threads: int | None = None, write_ahead: int | None = None) -> WorkerStats:
    """Extract ``work`` (this worker's authors) into the run at ``path``, doc-chunks written by a
    background writer up to ``write_ahead`` (default ``WRITE_AHEAD``) doc-chunks behind the forward
    (0: inline). One
    author's failure is recorded and the worker goes on with the next author. With nothing pending
    (a rerun of a complete run) it returns without loading the model."""
    if n_threads:
        torch.set_num_threads(n_threads)
    stats = WorkerStats()
    t0 = time.perf_counter()
    writer = RunWriter(path)
    total = sum(len(docs) for w in work for _, _, docs in _groups(writer, w, cfg.batch_size))
    if total == 0:
        stats.seconds = time.perf_counter() - t0
        return stats
    ex = Extractor(cfg, specs, device)
    write_logit_effects(ex, writer)
    pbar = None
    if not cfg.quiet:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, desc=f"worker {rank} [{device}]", unit="doc", position=rank, leave=True,
                    dynamic_ncols=True)

    def write(job: tuple[int, int, Sequence[Document], BatchResult]) -> None:
        author_idx, chunk_idx, docs, part = job
        writer.write_chunk(author_idx, chunk_idx, ex.chunk_data(docs, part, writer.layout))

    t_loop = time.perf_counter()
    stats.first_batch = time.time()
    try:
        with ChunkSink(write, WRITE_AHEAD if write_ahead is None else write_ahead) as sink:
            try:
                for w in work:
                    try:
                        extract_author(ex, writer, w, stats, pbar, sink)
                    except (SaestoreError, RuntimeError, ValueError, OSError) as e:
                        if sink.failed_job is not None:
                            raise
                        log.error("worker %d: author %r failed: %s", rank, w.author, e)
                        stats.failed[w.author] = f"{type(e).__name__}: {e}"
                sink.drain()
            except (SaestoreError, RuntimeError, ValueError, OSError) as e:
                if sink.failed_job is None:
                    raise
                # a failed write (the store cannot be written?): the writes after it would fail alike.
                # Doc-chunks are written in order, so the authors before the failed one are complete.
                log.error("worker %d: stopping: %s", rank, e)
                first = next(i for i, w in enumerate(work) if w.author_idx == sink.failed_job[0])
                for rest in work[first:]:
                    stats.failed.setdefault(rest.author, f"{type(e).__name__}: {e}")
    finally:
        stats.extract_s = time.perf_counter() - t_loop
        if pbar is not None:
            pbar.close()
    stats.seconds = time.perf_counter() - t0
    log.debug("worker %d (pid %d) done in %.1fs", rank, os.getpid(), stats.seconds)
    return stats
