"""The one lifecycle of an extraction run, whoever runs its workers.

:class:`Coordinator` owns every step around the workers: take the run's lock, create (or reopen) the
store, record the run as running in the registry, hand the authors to a :class:`Launcher`, finalize
the store, record the outcome in the registry (also when finalizing fails), check the measured L0
and print the summary. Two launchers run the workers: :class:`saestore.extract.launch.LocalLauncher`
(one process per device) and :class:`saestore.extract.distributed.TorchrunLauncher` (one torchrun or
SLURM rank each, this process being rank 0). A launcher only runs workers and returns their
:class:`~saestore.extract.work.WorkerStats`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from saestore import faults, location, protocol
from saestore.errors import SaestoreError, StoreWriteError, WorkerFailedError
from saestore.extract import interrupt
from saestore.extract.config import ExtractConfig
from saestore.extract.work import AuthorWork, WorkerStats
from saestore.location import is_url
from saestore.lock import RunLock, writer_state
from saestore.registry import Registry
from saestore.writer import RunLayout, create_run, existing_run, finalize_run, is_finalized, read_progress, run_exists

log = logging.getLogger("saestore.extract")


class Launcher(Protocol):
    """Runs a run's workers. The coordinator calls ``run`` once the store exists, or ``abort`` when
    the run could not be started; then ``finished`` with the exit code, exactly once."""

    where: str
    """the devices or ranks, for the log"""
    numerics: dict[str, Any] | None
    """what decides the computed values besides the configuration (root attribute ``numerics``)"""

    def run(self, path: str, work: Sequence[AuthorWork]) -> WorkerStats: ...

    def abort(self, reason: str) -> None: ...

    def finished(self, code: int) -> None: ...


#: what rank 0 tells the other ranks when the run is already complete (nothing to do, exit 0)
ALREADY_COMPLETE = "already complete"


@contextlib.contextmanager
def _run_lock(path: str) -> Iterator[RunLock]:
    """The run's lock, held within the block; a lock that cannot be written is one line."""
    lock = RunLock(path)
    try:
        lock.acquire()
    except OSError as e:
        raise StoreWriteError(f"cannot lock {path}: {type(e).__name__}: {e}; choose a writable --output_dir") from e
    try:
        yield lock
    finally:
        lock.release()


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders a start would create for ``folder``, deepest first."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _check_writable(what: str, path: str | Path, flag: str) -> None:
    """``path`` can be created: its nearest existing folder is writable (a read-only mount is not)."""
    if is_url(str(path)):
        return
    path = Path(path)
    base = path if path.exists() else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not os.access(base, os.W_OK):
        raise StoreWriteError(f"cannot write {what} at {path}: {base} is not writable (read-only file system or "
                              f"permissions); choose another {flag}")


def _du(path: str) -> int:
    return location.size_of(path)


@dataclass
class Coordinator:
    """Lock, create, register, launch, finalize, register, report: one run, one object."""

    cfg: ExtractConfig
    layout: RunLayout
    attrs: protocol.RunAttrs
    path: str
    t0: float

    def work(self, by_author: dict[str, list[Any]]) -> list[AuthorWork]:
        return [AuthorWork(author_idx=i, author=a, docs=tuple(by_author[a])) for i, a in enumerate(self.layout.authors)]

    def run(self, launcher: Launcher, work: Sequence[AuthorWork]) -> int:
        """Extract ``work`` through ``launcher``; returns 0 (complete) or raises (failed authors, errors)."""
        code = 2
        started = False
        made: list[Path] = []
        new_registry = False
        try:
            if self._check_before_start():
                code = 0
                launcher.abort(ALREADY_COMPLETE)
                return 0
            self._check_numerics(launcher.numerics)
            made = [] if is_url(self.path) else _missing_dirs(Path(self.path).parent)
            new_registry = not self.cfg.registry_path().exists()
            with _run_lock(self.path):
                faults.point("lock")
                try:
                    registry = Registry(self.cfg.registry_path())
                    mode = "overwrite" if self.cfg.overwrite else "resume" if self.cfg.resume else "auto"
                    attrs = create_run(self.path, self.layout, replace(self.attrs, numerics=launcher.numerics),
                                       mode=mode)
                    self._start_registry(registry, attrs)
                except (OSError, sqlite3.Error) as e:
                    raise StoreWriteError(f"cannot write the registry {self.cfg.registry_path()}: "
                                          f"{type(e).__name__}: {e}; choose a writable --registry") from e
                faults.point("created")
                started = True
                log.info("extracting %d authors, %d documents into %s on %s", len(self.layout.authors),
                         sum(self.layout.n_docs), self.path, launcher.where)
                stats, final, wall = self._launch_and_finalize(launcher, registry, work)
            self._check_l0(stats, final)
            print(self.summary(final, stats, wall), flush=True)
            if final.failed_authors:
                code = 1
                cause = stats.first_failure()
                raise WorkerFailedError(
                    f"{len(final.failed_authors)} author(s) not finished: {', '.join(final.failed_authors)}."
                    + (f" First error: {cause}." if cause else "") + " Rerun the same command to finish them once "
                    "the cause is fixed")
            code = 0
            return 0
        except BaseException as e:
            stop = interrupt.of(e)
            if stop is not None:
                code = stop.exit_code
            if not started:
                self._undo_start(made, new_registry)
                launcher.abort(f"{type(e).__name__}: {e}")
            raise
        finally:
            launcher.finished(code)

    def _launch_and_finalize(self, launcher: Launcher, registry: Registry,
                             work: Sequence[AuthorWork]) -> tuple[WorkerStats, protocol.RunAttrs, float]:
        error = None
        try:
            stats = launcher.run(str(self.path), work)
        except BaseException as e:  # recorded as every author's failure (a signal: interrupted), re-raised below
            stats, error = WorkerStats.failing(self.layout.authors, f"{type(e).__name__}: {e}"), e
        interrupt.hold()  # the run is saved (finalized, recorded) whatever signal comes now
        stop = interrupt.of(error) if error is not None else None
        faults.point("workers_done")
        try:
            final = finalize_run(self.path, failed_authors=[] if stop else sorted(stats.failed),
                                 interrupted=stop is not None)
        except (OSError, SaestoreError) as e:  # cannot write (disk full?) or read (corrupt markers): say so
            self._finish_registry(registry, "failed", list(self.layout.authors), f"{type(e).__name__}: {e}")
            if not isinstance(e, OSError):
                raise
            cause = stats.first_failure()
            raise StoreWriteError(
                (f"{cause}; then " if cause else "") + f"finalizing {self.path} failed: {type(e).__name__}: {e}. Fix "
                "the cause (free space?) and rerun the same command: doc-chunks with a progress marker are kept"
            ) from (error or e)
        faults.point("finalized")
        wall = time.perf_counter() - self.t0
        reason = f"interrupted by {stop.name}" if stop else repr(error) if error else None
        self._finish_registry(registry, final.status, final.failed_authors, reason or
                              "; ".join(f"{a}: {m}" for a, m in sorted(stats.failed.items())) or None)
        if stop is not None:
            stop.run, stop.status = str(self.path), final.status
            n_done, total = self._doc_chunk_counts()
            stop.progress = f"{n_done} of {total} doc-chunks done"
            raise stop from None
        if error is not None:
            raise error
        return stats, final, wall

    def _check_before_start(self) -> bool:
        """Refuse ``--resume`` without a run, check the output is writable, and say so (True) when the
        run is already complete and no live writer holds it: all before the lock, the registry or any
        model exists (reads only)."""
        self._existing = old = existing_run(self.path, self.layout, self.attrs) if not self.cfg.overwrite else None
        if old is None and self.cfg.resume:
            raise SaestoreError(f"--resume: no run at {self.path}; drop --resume to start it")
        state, holder = writer_state(self.path)
        if (old is not None and old.status == "complete" and is_finalized(self.path) and state != "live"
                and not (state == "unknown" and holder)):
            self._record_complete()
            print(f"run: {self.path} is already complete ({sum(self.layout.n_docs)} documents of "
                  f"{len(self.layout.authors)} authors); nothing to do", flush=True)
            return True
        for what, path, flag in (("the run", self.path, "--output_dir"),
                                 ("the registry", self.cfg.registry_path(), "--registry")):
            _check_writable(what, path, flag)
        return False

    def _check_numerics(self, numerics: dict[str, Any] | None) -> None:
        """Resuming on another device kind or torch thread count mixes numerics (values differ in the
        last bits between doc-chunks computed before and now): say so in one line."""
        old = getattr(self, "_existing", None)
        if old is None or not old.numerics or not numerics or old.numerics == numerics:
            return
        was = ", ".join(f"{k} {v}" for k, v in old.numerics.items())
        now = ", ".join(f"{k} {v}" for k, v in numerics.items())
        log.warning("%s was started with %s and is resumed with %s: the doc-chunks computed now may differ in the "
                    "last bits from the finished ones; resume with the same --devices and OMP_NUM_THREADS to "
                    "match", self.path, was, now)

    def _record_complete(self) -> None:
        """A complete run whose registry row says otherwise (its writer was killed after finalizing):
        record it as complete. No registry, no row, or a read-only one: nothing to do."""
        path = self.cfg.registry_path()
        if not path.exists() or not os.access(path, os.W_OK):
            return
        try:
            registry = Registry(path)
            if registry.get(str(self.path)).status == "complete":
                return
        except (OSError, sqlite3.Error, SaestoreError):
            return
        self._finish_registry(registry, "complete", [], None)

    def _undo_start(self, made: list[Path], new_registry: bool) -> None:
        """A start that failed before the run existed leaves nothing: the registry file it created
        (no row in it) and the folders it made."""
        if run_exists(self.path):
            return
        registry = self.cfg.registry_path()
        if new_registry and registry.exists():
            try:
                if not Registry(registry).list():
                    registry.unlink()
            except (OSError, sqlite3.Error) as e:
                log.debug("could not remove %s: %s", registry, e)
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break

    def _doc_chunk_counts(self) -> tuple[int, int]:
        done = read_progress(self.path)[..., 0] == 1
        per_author = [self.layout.n_chunks(a) for a in range(len(self.layout.authors))]
        return sum(int(done[a, :n].sum()) for a, n in enumerate(per_author)), sum(per_author)

    def _start_registry(self, registry: Registry, attrs: protocol.RunAttrs) -> None:
        """Record the run as running (after the store exists, before any worker starts)."""
        registry.start(path=str(self.path), run_name=location.name(self.path).removesuffix(".zarr"), model=self.cfg.model,
                       dataset=self.cfg.dataset_name, category=self.cfg.category_name,
                       config_hash=attrs.config_hash, config=attrs.config, authors=list(self.layout.authors),
                       n_docs=sum(self.layout.n_docs), run_id=attrs.run_id)

    def _finish_registry(self, registry: Registry, status: str, failed_authors: list[str], error: str | None) -> None:
        """Record the outcome in the registry; a registry that cannot be written is logged, not fatal."""
        try:
            progress = read_progress(self.path)
            registry.finish(str(self.path), status=status, failed_authors=failed_authors,
                            n_tokens=int(progress[..., 1].sum()), n_nonzero=int(progress[..., 2].sum()),
                            bytes=_du(self.path), wall_s=time.perf_counter() - self.t0, error=error)
        except (OSError, sqlite3.Error, SaestoreError) as e:
            log.error("could not record the outcome of %s in the registry %s: %s", self.path, registry.path, e)

    @staticmethod
    def _check_l0(stats: WorkerStats, attrs: protocol.RunAttrs) -> None:
        for key, nnz in stats.nnz.items():
            lt, layer = key.split("/")
            expected = attrs.saes[lt][layer].expected_l0
            l0 = nnz / max(stats.n_tokens, 1)
            if expected and stats.n_tokens and not expected / 3 <= l0 <= expected * 3:
                cause = ("prompt/BOS handling, dtype or the wrong SAE?" if attrs.use_error_term else
                         "likely cause: every SAE is spliced without the error term, so the SAEs before this "
                         "one change its input; --use_error_term measures each SAE on clean activations")
                log.warning("%s layer %s: measured mean L0 %.1f is far from the SAE's expected %.1f (%s)",
                            lt, layer, l0, expected, cause)

    def first_batch_s(self, stats: WorkerStats) -> float | None:
        """Seconds from ``t0`` to the first forward of any worker (``stats.first_batch`` is wall-clock);
        None when no worker ran one."""
        if stats.first_batch is None:
            return None
        return stats.first_batch - (time.time() - (time.perf_counter() - self.t0))

    def summary(self, attrs: protocol.RunAttrs, stats: WorkerStats, wall: float) -> str:
        progress = read_progress(self.path)
        n_tokens = int(progress[..., 1].sum())
        n_nonzero = int(progress[..., 2].sum())
        layout = self.layout
        lines = [f"run: {self.path}", f"status: {attrs.status}",
                 f"authors: {len(layout.authors)}  documents: {sum(layout.n_docs)}  tokens: {n_tokens:,}  "
                 f"nonzeros: {n_nonzero:,}",
                 f"bytes on disk: {_du(self.path):,}  wall time: {wall:.1f}s = extraction {stats.extract_s:.1f}s "
                 f"({stats.n_tokens / max(stats.extract_s, 1e-9):,.0f} tokens/s this session) + start-up and "
                 f"finish {max(wall - stats.extract_s, 0.0):.1f}s (imports, model and SAE loading, store creation)"
                 + (f"; first batch after {first:.1f}s" if (first := self.first_batch_s(stats)) is not None else "")]
        for key, nnz in sorted(stats.nnz.items()):
            lt, layer = key.split("/")
            expected = attrs.saes[lt][layer].expected_l0
            l0 = nnz / max(stats.n_tokens, 1)
            lines.append(f"  {lt:>3} layer {layer:>3}: mean L0 {l0:7.1f}"
                         + (f" (SAE expects {expected:.1f})" if expected else ""))
        if attrs.failed_authors:
            lines.append(f"FAILED authors (rerun the same command to finish them): {', '.join(attrs.failed_authors)}")
        return "\n".join(lines)
