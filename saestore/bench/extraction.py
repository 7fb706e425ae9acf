"""Section 5: how much of an extraction is spent storing, and its peak memory as the corpus grows.

Each run is a real ``python -m saestore.extract`` of the demo corpus with the tiny model and its
16k SAEs on one CPU worker (in the measured process), with these methods timed in place:

* ``worker.extract_author`` — the extraction loop of one author, in the forward thread;
* ``Extractor.run_batch`` — the model and SAE forward, the nonzero extraction and the copy to host;
* ``Extractor.chunk_data`` — assembling a doc-chunk's arrays for the writer (in the writer thread);
* ``RunWriter.write_chunk`` — encoding and writing every payload of the doc-chunk and its marker
  (in the writer thread).

The worker writes doc-chunks in a background thread (``batches.ChunkSink``), so storage costs the
forward only where the forward thread waits for it or hands work over: the storage share of the
loop is ``(loop - run_batch) / loop``, and of the whole wall time (imports, model and SAE
loading, ``create_run`` and ``finalize_run`` included) ``(loop - run_batch) / wall``. The largest
corpus also runs with torch pinned to one thread (on a shared 2-core CPU the writer thread and
torch's threads contend, which slows the forward), and with the writer inline (write-ahead 0, the
sequential loop this replaced), for the side-by-side ratio ``inline loop / pipelined loop``.

Start-up is measured on the README's demo command (two CPU workers, res/mlp/att SAEs of width
1k at layers 1 and 3), each run in a fresh process, alternating: as the extraction does it, with
the worker processes started before the run is planned (``extract/pool.py``: their imports
overlap the coordinator's) and ended as soon as their stats are sent (``pool._leave``), and as it
was before, with the workers spawned once the store exists and ended through the interpreter's
teardown (about a second with torch and a model loaded, which the coordinator waits for).
*First batch* is the time from the command's start (``saestore.extract.STARTED``) to the first
forward of any worker; the median of the repetitions is reported.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from saestore.bench.child import rss_mb

__all__ = ["child_extract", "child_prepare_tiny", "child_startup", "demo_argv", "extract_argv"]


def extract_argv(*, n_docs_per_author: int, output_dir: str, run_name: str, layers: tuple[int, ...],
                 layer_types: tuple[str, ...], max_seq_len: int, width: str = "16k") -> list[str]:
    """The command line of one measured extraction (tiny model, demo corpus, one CPU worker)."""
    return ["--model", "tiny", "--dataset_name", "demo", "--layers", *map(str, layers), "--layer_types",
            *layer_types, "--sae_features_width", width, "--devices", "cpu", "--max_seq_len", str(max_seq_len),
            "--n_docs_per_author", str(n_docs_per_author), "--output_dir", output_dir, "--run_name", run_name,
            "--quiet", "--overwrite"]


def child_extract(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one extraction in this process with the writer and the forward timed."""
    from saestore.extract import worker
    from saestore.extract.config import parse_args
    from saestore.extract.launch import extract
    from saestore.writer import RunWriter

    timers = {"write_chunk": 0.0, "run_batch": 0.0, "chunk_data": 0.0, "extract_author": 0.0}
    calls = {k: 0 for k in timers}

    def timed(cls: type, name: str) -> None:
        orig = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t
                calls[name] += 1

        setattr(cls, name, wrapper)

    threads = spec.get("torch_threads")
    if threads:  # pin torch's intra-op threads (the worker would set cpu_count // n_workers)
        import torch

        torch.set_num_threads(int(threads))
        torch.set_num_threads = lambda n: None  # type: ignore[assignment]
    if "write_ahead" in spec:  # the worker's default depth, for an inline (0) side-by-side run
        worker.WRITE_AHEAD = int(spec["write_ahead"])
    timed(RunWriter, "write_chunk")
    timed(worker, "extract_author")
    timed(worker.Extractor, "run_batch")
    timed(worker.Extractor, "chunk_data")
    cfg = parse_args(spec["argv"])
    t0 = time.perf_counter()
    code = extract(cfg)
    wall = time.perf_counter() - t0
    path = cfg.run_path()
    from saestore.writer import read_progress

    progress = read_progress(path)
    loop = timers["extract_author"]
    storing = loop - timers["run_batch"]
    return {"exit_code": code, "path": str(path), "wall_s": wall, **{f"{k}_s": v for k, v in timers.items()},
            "loop_s": loop, "write_ahead": worker.WRITE_AHEAD,
            "calls": calls, "storing_s": storing, "storing_frac_of_loop": storing / loop,
            "storing_frac_of_wall": storing / wall, "n_tokens": int(progress[..., 1].sum()),
            "nnz": int(progress[..., 2].sum()), "end_rss_mb": rss_mb(), "torch_threads": threads or "default"}


def child_prepare_tiny(spec: dict[str, Any]) -> dict[str, Any]:
    """Build (or find) the tiny model bundle before anything is measured."""
    from saestore.extract.tiny import build_tiny_bundle

    t0 = time.perf_counter()
    path = build_tiny_bundle()
    return {"bundle": str(path), "seconds": time.perf_counter() - t0}


def demo_argv(*, output_dir: str, run_name: str, n_docs_per_author: int | None = None) -> list[str]:
    """The README's demo command (two CPU workers), quiet and overwriting."""
    return ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3", "--layer_types", "res", "mlp", "att",
            "--sae_features_width", "1k", "--devices", "cpu:2", "--setting", "baseline", "--max_seq_len", "128",
            "--use_error_term", "--output_dir", output_dir, "--run_name", run_name, "--quiet", "--overwrite",
            *(["--n_docs_per_author", str(n_docs_per_author)] if n_docs_per_author else [])]


class _LatePool:
    """The launcher's workers as they were before the pool: spawned only when the run starts (the
    store exists) and ended through the interpreter's teardown, for the side-by-side start-up ratio."""

    def __init__(self, devices: list[str]) -> None:
        self.devices, self.pool = devices, None

    def __enter__(self) -> _LatePool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.close()

    def close_idle(self) -> None:
        pass  # nothing was started

    def run(self, jobs: dict[int, Any]) -> Any:
        from saestore.extract.pool import WorkerPool

        self.pool = WorkerPool(self.devices)
        return self.pool.run({rank: dataclasses.replace(job, teardown=True) for rank, job in jobs.items()})


def child_startup(spec: dict[str, Any]) -> dict[str, Any]:
    """``python -m saestore.extract`` of ``spec["argv"]`` in this fresh process (``spec["late"]``:
    with the workers spawned once the store exists): its exit code, wall time and first batch, both
    counted from the command's start."""
    from saestore.extract import STARTED, launch
    from saestore.extract.coordinator import Coordinator

    seen: dict[str, Any] = {}
    summary = Coordinator.summary

    def record(self: Coordinator, attrs: Any, stats: Any, wall: float) -> str:
        seen.update(first_batch_s=self.first_batch_s(stats), extract_s=stats.extract_s)
        return summary(self, attrs, stats, wall)

    Coordinator.summary = record  # type: ignore[method-assign]
    if spec.get("late"):
        launch.WorkerPool = _LatePool  # type: ignore[assignment,misc]
    code = launch.main(spec["argv"])
    return {"exit_code": code, "late": bool(spec.get("late")), "wall_s": time.perf_counter() - STARTED, **seen}
