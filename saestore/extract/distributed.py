"""Extraction under torchrun or SLURM: every rank is one worker of one shared store, rank 0 coordinates.

Ranks synchronise through a ``gloo`` process group (torchrun sets ``MASTER_ADDR``/``MASTER_PORT``;
under plain SLURM set them, e.g. to the first node of the allocation): rank 0 validates, locks and
creates the store and registers the run, then broadcasts success; every rank extracts
``authors[rank::world_size]`` on ``cuda:LOCAL_RANK`` (or the CPU); rank 0 gathers the statistics and
finalizes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from saestore import protocol
from saestore.errors import SaestoreError, WorkerFailedError
from saestore.extract.config import ExtractConfig
from saestore.extract.worker import AuthorWork, run_worker
from saestore.lock import RunLock
from saestore.registry import Registry
from saestore.writer import RunLayout, create_run, finalize_run

log = logging.getLogger(__name__)


def rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    return rank, world, local


def extract_distributed(cfg: ExtractConfig, specs: list[Any], layout: RunLayout, attrs: protocol.RunAttrs,
                        work: list[AuthorWork], path: Path, t0: float) -> int:
    import torch
    import torch.distributed as dist

    from saestore.extract.launch import _finish_registry, _merge, _start_registry, _summary

    rank, world, local = rank_info()
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    lock = RunLock(path)
    registry = Registry(cfg.registry_path()) if rank == 0 else None
    status: list[Any] = [None]
    if rank == 0:
        try:
            lock.acquire()
            mode = "overwrite" if cfg.overwrite else "resume" if cfg.resume else "auto"
            attrs = create_run(path, layout, attrs, mode=mode)
            _start_registry(registry, cfg, path, attrs, layout)
            status[0] = "ok"
        except SaestoreError as e:
            status[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(status, src=0)
    if status[0] != "ok":
        lock.release()
        dist.destroy_process_group()
        raise SaestoreError(f"rank 0 could not create the run: {status[0]}")
    try:
        stats = run_worker(str(path), cfg, specs, work[rank::world], device, rank).to_json()
    except Exception as e:
        stats = {"n_docs": 0, "n_tokens": 0, "nnz": {}, "seconds": 0.0,
                 "failed": {w.author: f"rank {rank}: {type(e).__name__}: {e}" for w in work[rank::world]}}
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(stats, gathered, dst=0)
    code = 0
    if rank == 0:
        total = _merge(gathered)  # type: ignore[arg-type]
        final = finalize_run(path, failed_authors=sorted(total.failed))
        wall = time.perf_counter() - t0
        _finish_registry(registry, path, final.status, final.failed_authors, t0,  # type: ignore[arg-type]
                         "; ".join(f"{a}: {m}" for a, m in sorted(total.failed.items())) or None)
        lock.release()
        print(_summary(path, layout, final, total, wall), flush=True)
        code = 1 if final.failed_authors else 0
    codes = [code]
    dist.broadcast_object_list(codes, src=0)
    dist.barrier()
    dist.destroy_process_group()
    if codes[0]:
        raise WorkerFailedError("some authors were not finished; rerun the same command to finish them")
    return 0
