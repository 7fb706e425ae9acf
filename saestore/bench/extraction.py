"""Section 5: how much of an extraction is spent storing, and its peak memory as the corpus grows.

Each run is a real ``python -m saestore.extract`` of the demo corpus with the tiny model and its
16k SAEs on one CPU worker (in the measured process), with three methods timed in place:

* ``Extractor.run_batch`` — the model and SAE forward, the nonzero extraction and the copy to host;
* ``Extractor.chunk_data`` — assembling a doc-chunk's arrays on the host for the writer;
* ``RunWriter.write_chunk`` — encoding and writing every payload of the doc-chunk and its marker.

"Storing" is ``chunk_data + write_chunk``; its share is reported of the extraction loop
(forward + storing) and of the whole wall time (which also holds imports, model and SAE loading,
``create_run`` and ``finalize_run``). The largest corpus also runs with torch pinned to one thread:
on a shared CPU two threads contend and the forward slows down, which would flatter the share.
"""

from __future__ import annotations

import time
from typing import Any

from saestore.bench.child import rss_mb

__all__ = ["child_extract", "child_prepare_tiny", "extract_argv"]


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

    timers = {"write_chunk": 0.0, "run_batch": 0.0, "chunk_data": 0.0}
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
    timed(RunWriter, "write_chunk")
    timed(worker.Extractor, "run_batch")
    timed(worker.Extractor, "chunk_data")
    cfg = parse_args(spec["argv"])
    t0 = time.perf_counter()
    code = extract(cfg)
    wall = time.perf_counter() - t0
    path = cfg.run_path()
    from saestore.writer import read_progress

    progress = read_progress(path)
    storing = timers["write_chunk"] + timers["chunk_data"]
    loop = storing + timers["run_batch"]
    return {"exit_code": code, "path": str(path), "wall_s": wall, **{f"{k}_s": v for k, v in timers.items()},
            "calls": calls, "storing_s": storing, "storing_frac_of_loop": storing / loop,
            "storing_frac_of_wall": storing / wall, "n_tokens": int(progress[..., 1].sum()),
            "nnz": int(progress[..., 2].sum()), "end_rss_mb": rss_mb(), "torch_threads": threads or "default"}


def child_prepare_tiny(spec: dict[str, Any]) -> dict[str, Any]:
    """Build (or find) the tiny model bundle before anything is measured."""
    from saestore.extract.tiny import build_tiny_bundle

    t0 = time.perf_counter()
    path = build_tiny_bundle()
    return {"bundle": str(path), "seconds": time.perf_counter() - t0}
