"""Extraction under torchrun or SLURM: every rank is one worker of one shared store, rank 0 coordinates.

Ranks synchronise through a ``gloo`` process group (torchrun sets ``MASTER_ADDR``/``MASTER_PORT``;
under plain SLURM set them, e.g. to the first node of the allocation). Rank 0 runs the
:class:`~saestore.extract.coordinator.Coordinator` with a :class:`TorchrunLauncher`: it locks,
creates and registers the run, then broadcasts that the run started (or why it did not); every
rank extracts ``authors[rank::world_size]`` on ``cuda:LOCAL_RANK`` (or the CPU); rank 0 gathers the
statistics, finalizes, and broadcasts the exit code. The other ranks only :func:`follow`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from saestore.errors import SaestoreError, WorkerFailedError
from saestore.extract import interrupt
from saestore.extract.config import ExtractConfig
from saestore.extract.coordinator import ALREADY_COMPLETE
from saestore.extract.worker import AuthorWork, WorkerStats, run_worker

log = logging.getLogger(__name__)

_STARTED = "started"


def rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    return rank, world, local


class TorchrunLauncher:
    """This rank's worker plus the process-group messages around it (rank 0's side drives them)."""

    def __init__(self, cfg: ExtractConfig, specs: list[Any]) -> None:
        import torch
        import torch.distributed as dist

        self.cfg, self.specs = cfg, specs
        self.rank, self.world, local = rank_info()
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world)
        self.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.where = f"{self.world} ranks"
        self.numerics = {"device": f"cuda {torch.cuda.get_device_name(self.device)}" if self.device != "cpu" else "cpu",
                         "torch_threads": torch.get_num_threads() if self.device == "cpu" else None}
        self._aborted = False

    def _broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_share(self, path: str, work: Sequence[AuthorWork]) -> WorkerStats:
        """Extract this rank's authors; any failure becomes their recorded failure."""
        share = list(work[self.rank :: self.world])
        try:
            return run_worker(path, self.cfg, self.specs, share, self.device, self.rank)
        except Exception as e:  # reported to rank 0 as this rank's authors' failure
            return WorkerStats.failing((w.author for w in share), f"rank {self.rank}: {type(e).__name__}: {e}")

    def gather(self, stats: WorkerStats) -> list[WorkerStats] | None:
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(stats, out, dst=0)
        return out

    # --- the Launcher protocol (rank 0) ---

    def run(self, path: str, work: Sequence[AuthorWork]) -> WorkerStats:
        self._broadcast(_STARTED)
        stats = self.run_share(path, work)
        try:
            return WorkerStats.merge(self.gather(stats) or [])
        except RuntimeError as e:  # gloo: a rank died (torchrun then stops this one too)
            self._aborted = True
            raise WorkerFailedError(f"a rank stopped before reporting ({str(e).splitlines()[0][:120]}); "
                                    "rerun the same command to finish the run") from None

    def abort(self, reason: str) -> None:
        self._aborted = True
        self._broadcast(reason)

    def finished(self, code: int) -> None:
        import torch.distributed as dist

        if not self._aborted and code not in interrupt.SIGNALS.values():  # interrupted: the ranks are stopping too
            self._broadcast(code)
            dist.barrier()
        try:
            dist.destroy_process_group()
        except RuntimeError as e:  # a rank already gone
            log.debug("destroy_process_group: %s", e)


def follow(launcher: TorchrunLauncher, work: Sequence[AuthorWork]) -> int:
    """A rank other than 0: wait for the run to start, extract this rank's share, report, and exit
    with the run's outcome."""
    import torch.distributed as dist

    status = launcher._broadcast(None)
    if status == ALREADY_COMPLETE:
        dist.destroy_process_group()
        return 0
    if status != _STARTED:
        dist.destroy_process_group()
        raise SaestoreError(f"rank 0 could not start the run: {status}")
    stats = launcher.run_share(str(launcher.cfg.run_path()), work)
    launcher.gather(stats)
    code = launcher._broadcast(None)
    dist.barrier()
    dist.destroy_process_group()
    if code == 1:
        raise WorkerFailedError("some authors were not finished; rerun the same command to finish them")
    if code:
        raise SaestoreError(f"rank 0 stopped with exit code {code}; see its log")
    return 0
