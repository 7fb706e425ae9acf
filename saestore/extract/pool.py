"""The worker processes of a run on one machine, started before the run is planned.

A spawned worker spends seconds importing torch, sae_lens and transformers before it can load its
model. :class:`WorkerPool` starts one process per device as soon as the devices are known
(:func:`saestore.extract.launch.extract`, right after the command is parsed), so those imports run
while the coordinator checks the request, reads the corpus and creates the store. Each process then
waits for its :class:`Job` (:meth:`WorkerPool.run`) or is stopped unused (:meth:`WorkerPool.close`:
a refused start, a run that is already complete, a device without authors); a stopped process has
written nothing. This module imports neither torch nor the model stack, so a process starts
importing them at once.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from saestore.errors import SaestoreError
from saestore.extract import interrupt
from saestore.extract.config import ExtractConfig
from saestore.extract.work import AuthorWork, WorkerStats

log = logging.getLogger("saestore.extract")

#: what a waiting worker imports before its job comes (each one that is missing is left to the job to report)
PRELOAD = ("saestore.extract.worker", "sae_lens", "transformers")


@dataclass(frozen=True)
class Job:
    """One worker's share of a run."""

    path: str
    cfg: ExtractConfig
    specs: list[Any]
    work: list[AuthorWork]
    n_threads: int
    """torch threads (0: the device's default)"""
    teardown: bool = False
    """end the process through the interpreter's teardown instead of :func:`_leave` (the start-up
    benchmark's baseline: how workers ended before)"""


def _exit_with(coordinator: int) -> None:
    """Stop this worker as soon as its coordinator is gone (even killed by SIGKILL, which no cleanup
    sees): the rerun that takes the run's lock over must be the run's only writer."""

    def watch() -> None:
        while os.getppid() == coordinator:
            time.sleep(0.5)
        log.error("the coordinator (pid %d) is gone: this worker stops", coordinator)
        os._exit(3)

    threading.Thread(target=watch, name="saestore-coordinator-watch", daemon=True).start()


def _leave(results: Any) -> None:
    """End this worker without the interpreter's teardown, which takes about a second with torch
    and a model loaded and which the coordinator would wait for: the job has returned (every write
    of the run is complete), its stats are flushed to the coordinator, and logs and stdio are
    flushed; the same end as a process of multiprocessing's fork start method."""
    results.close()
    results.join_thread()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(rank: int, device: str, inbox: Any, results: Any, coordinator: int) -> None:
    """A worker process: import the model stack, wait for the job, run it, report its stats."""
    interrupt.quiet_worker()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{rank} %(levelname)s %(message)s")
    _exit_with(coordinator)
    job: Job | None = None
    try:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # a missing or broken install: the job's own import reports it
                break
        try:
            job = inbox.recv()
        except EOFError:  # the pool was closed without a job for this rank
            os._exit(0)
        inbox.close()
        from saestore.extract.worker import run_worker

        try:
            stats = run_worker(job.path, job.cfg, job.specs, job.work, device, rank, job.n_threads)
        except SaestoreError as e:  # e.g. an SAE that does not fit the model: tell the coordinator why
            log.error("worker %d failed: %s", rank, e)
            stats = WorkerStats.failing((w.author for w in job.work), f"{type(e).__name__}: {e}")
        results.put((rank, stats))
        if not job.teardown:
            _leave(results)
    except interrupt.Interrupted as e:  # the coordinator stops this worker: its finished doc-chunks are written
        if job is None:  # stopped before its job: nothing to save, no teardown to wait for
            os._exit(e.exit_code)
        sys.exit(e.exit_code)


class WorkerPool:
    """One spawned process per device, importing while the run is planned; a context manager that
    stops the processes no job went to.

    Each job goes over its own one-way pipe, pickled in the coordinator (a job that cannot be sent
    raises there) and written while the worker may still be importing (the send waits for it to
    read); the coordinator keeps only the pipe's write end, so a job for a worker that died first
    fails at once (``BrokenPipeError``) instead of blocking."""

    def __init__(self, devices: Sequence[str]) -> None:
        ctx = mp.get_context("spawn")
        self.devices = list(devices)
        self.results = ctx.Queue()
        self._inboxes: list[Any] = []
        self._procs: list[Any] = []
        self._busy: set[int] = set()
        try:
            for rank, device in enumerate(self.devices):
                reader, writer = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_serve, args=(rank, device, reader, self.results, os.getpid()),
                                name=f"saestore-worker-{rank}")
                with interrupt.sigint_ignored():  # a Ctrl-C is for the coordinator, which stops the workers
                    p.start()
                reader.close()
                self._inboxes.append(writer)
                self._procs.append(p)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process no job went to (they have written nothing) and wait for all of them."""
        self.close_idle()
        for p in self._procs:
            p.join()
        for w in self._inboxes:
            w.close()

    def run(self, jobs: dict[int, Job]) -> WorkerStats:
        """Hand each rank its job, stop the ranks without one, and return the merged stats once every
        job has ended. Interrupted (or failing), it stops the workers: each writes its finished
        doc-chunks."""
        results: dict[int, WorkerStats] = {}
        busy = [(rank, self._procs[rank]) for rank in jobs]
        try:
            for rank, job in jobs.items():
                self._busy.add(rank)
                try:
                    self._inboxes[rank].send(job)
                except (BrokenPipeError, ConnectionResetError):  # it died before reading: reported below
                    log.error("worker %d exited before its job was sent (exit code %s)", rank,
                              self._procs[rank].exitcode)
            self.close_idle()
            while len(results) < len(busy) and any(p.is_alive() for _, p in busy):
                try:
                    rank, stats = self.results.get(timeout=1.0)
                    results[rank] = stats
                except queue_mod.Empty:
                    continue
        except BaseException:
            for p in self._procs:
                if p.is_alive():
                    p.terminate()
            for p in self._procs:
                p.join()
            raise
        while not self.results.empty():
            rank, stats = self.results.get()
            results[rank] = stats
        for rank, p in busy:
            p.join()
            if rank not in results:
                results[rank] = WorkerStats.failing((w.author for w in jobs[rank].work),
                                                    f"worker {rank} exited with code {p.exitcode}")
        return WorkerStats.merge(results.values())

    def close_idle(self) -> None:
        """Stop the processes that got no job, without waiting for the others."""
        for rank, p in enumerate(self._procs):
            if rank not in self._busy and p.is_alive():
                p.terminate()
