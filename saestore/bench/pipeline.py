"""Section 6: does storage overlap the device? The real worker loop with a simulated device.

``Extractor.run_batch`` is replaced by a stand-in that waits a fixed latency per batch (``time.sleep``,
which, like waiting on a CUDA stream, releases the GIL) and returns SAE-shaped nonzeros made in
advance (:mod:`saestore.bench.synthetic`). Everything after the forward is the real worker:
``worker.extract_author`` slices each batch into doc-chunks and hands them to the background
writer (``batches.ChunkSink``), which assembles them (``Extractor.chunk_data``) and stores them
(``RunWriter.write_chunk``) in a real run. Three loops over the same data, in one process:

* **storage alone**: no latency, the writer inline: its wall time is the storage work *S*;
* **sequential**: the latency set so that the forward total *F* equals *S* (the hardest case for
  overlap), the writer inline: wall ≈ *F* + *S*;
* **pipelined**: the same latency, the background writer (``WRITE_AHEAD`` doc-chunks may wait):
  target wall ≤ 1.15 × max(*F*, storage work of that loop).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.workloads import SyntheticWorkload, synthetic_attrs
from saestore.extract.batches import WRITE_AHEAD, BatchResult, ChunkSink
from saestore.extract.data import Document
from saestore.extract.worker import AuthorWork, Extractor, WorkerStats, extract_author
from saestore.writer import RunWriter, create_run, finalize_run

__all__ = ["measure_overlap"]


@dataclass(frozen=True)
class _LoopConfig:
    """What the worker loop reads of the extraction configuration."""

    batch_size: int
    storage_format: str = "sparse"


class SimulatedExtractor(Extractor):
    """An :class:`Extractor` whose forward is a fixed wait returning precomputed batch results."""

    def __init__(self, cfg: _LoopConfig, results: dict[str, BatchResult], latency_s: float) -> None:
        self.cfg, self._results, self.latency_s = cfg, results, latency_s  # type: ignore[assignment]
        self._author = ""
        self.forward_s = 0.0

    def prompt_ids(self, author: str) -> list[int]:
        self._author = author
        return []

    def run_batch(self, prompt: list[int], docs: Any) -> BatchResult:
        t = time.perf_counter()
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        out = self._results[self._author].docs(docs[0].doc_id, docs[-1].doc_id + 1)
        self.forward_s += time.perf_counter() - t
        return out


def _author_results(wl: SyntheticWorkload) -> dict[str, BatchResult]:
    """Each author's whole synthetic data as one batch result (what its forwards would return)."""
    parts: dict[int, list[BatchResult]] = {}
    for a, _, data in wl.chunks():
        parts.setdefault(a, []).append(BatchResult(
            token_ids=data.token_id_DT, token=data.token_DT, valid=data.valid_DT, ce=data.ce_loss_DT,
            entropy=data.entropy_DT, n_truncated=data.n_truncated_D, acts=dict(data.acts)))
    return {wl.authors[a]: BatchResult.concat(p) for a, p in parts.items()}


def _loop(wl: SyntheticWorkload, results: dict[str, BatchResult], path: Path, *, batch_size: int,
          latency_s: float, write_ahead: int) -> dict[str, float]:
    layout = wl.layout()
    create_run(str(path), layout, synthetic_attrs(layout), mode="overwrite")
    writer = RunWriter(str(path))
    ex = SimulatedExtractor(_LoopConfig(batch_size=batch_size), results, latency_s)
    work = [AuthorWork(author_idx=i, author=a, docs=tuple(Document(doc_id=d, author=a, text=f"doc {d}")
                                                          for d in range(wl.n_docs)))
            for i, a in enumerate(wl.authors)]
    stats = WorkerStats()

    def write(job: tuple[int, int, Any, BatchResult]) -> None:
        author_idx, chunk_idx, docs, part = job
        writer.write_chunk(author_idx, chunk_idx, ex.chunk_data(docs, part, writer.layout))

    t0 = time.perf_counter()
    with ChunkSink(write, write_ahead) as sink:
        for w in work:
            extract_author(ex, writer, w, stats, None, sink)
    wall = time.perf_counter() - t0
    finalize_run(str(path))
    return {"wall_s": wall, "forward_s": ex.forward_s, "storage_s": sink.busy_s, "nnz": float(sum(stats.nnz.values())),
            "n_batches": float(-(-wl.n_docs // batch_size) * wl.n_authors)}


def measure_overlap(wl: SyntheticWorkload, work: Path, *, batch_size: int = 8) -> dict[str, Any]:
    """The three loops of this section on ``wl``; ratios as the module docstring says."""
    results = _author_results(wl)
    warm = dataclasses.replace(wl, n_authors=1, n_docs=min(wl.n_docs, batch_size))
    _loop(warm, {warm.authors[0]: results[wl.authors[0]]}, work / "warm.zarr", batch_size=batch_size,
          latency_s=0.0, write_ahead=0)  # first-use costs (codec registry, zarr, numcodecs) out of the timing
    alone = _loop(wl, results, work / "alone.zarr", batch_size=batch_size, latency_s=0.0, write_ahead=0)
    latency = alone["storage_s"] / alone["n_batches"]
    seq = _loop(wl, results, work / "sequential.zarr", batch_size=batch_size, latency_s=latency, write_ahead=0)
    pipe = _loop(wl, results, work / "pipelined.zarr", batch_size=batch_size, latency_s=latency,
                 write_ahead=WRITE_AHEAD)
    rows = [{"loop": name, "write_ahead": wa, **r} for name, wa, r in
            (("storage alone", 0, alone), ("sequential", 0, seq), ("pipelined", WRITE_AHEAD, pipe))]
    same = bool(np.array_equal(_marker_counts(work / "sequential.zarr"), _marker_counts(work / "pipelined.zarr")))
    desc = (f"{wl.n_authors} authors × {wl.n_docs} docs × {wl.n_tok} tok, {', '.join(wl.layer_types)} at layer(s) "
            f"{', '.join(map(str, wl.layers))}, {wl.n_features:,} features, L0 {wl.l0:g}, chunk_docs "
            f"{wl.chunk_docs}, batch {batch_size}: {int(alone['n_batches'])} batches, {int(alone['nnz']):,} "
            f"nonzeros; simulated forward latency {latency * 1e3:.1f} ms per batch. Sequential and pipelined "
            f"runs store the same values (progress markers compared: {'equal' if same else 'DIFFERENT'}).")
    return {"description": desc, "rows": rows, "latency_s": latency, "same_markers": same,
            "ratios": {"pipelined_wall_over_max_forward_storage": pipe["wall_s"] / max(pipe["forward_s"],
                                                                                        pipe["storage_s"]),
                       "sequential_wall_over_sum_forward_storage": seq["wall_s"] / (seq["forward_s"]
                                                                                    + seq["storage_s"]),
                       "sequential_over_pipelined_wall": seq["wall_s"] / pipe["wall_s"],
                       "pipelined_storage_over_alone": pipe["storage_s"] / alone["storage_s"]}}


def _marker_counts(path: Path) -> np.ndarray:
    """(done, valid tokens, nonzeros) of every progress marker."""
    from saestore.writer import read_progress

    return read_progress(path)[..., :3]
