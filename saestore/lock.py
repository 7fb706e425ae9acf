"""One writer per run: an exclusive lock file next to the store (``<run path>.lock``).

Why not the ``filelock`` package: it flocks the same way, but leaves the lock file in place on
release (filelock 4.x: "the file stays in place on release so waiters share the same inode"). A run
here must leave no lock file after a clean finish, and the file must name its holder for the
"being written by pid … on host …" message; removing the file safely needs the unlink-while-locked,
then re-check-the-inode step below, which filelock does not do (tests/test_store.py and the stale-lock
race in tests/test_reliability.py prove both).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from saestore.errors import MissingExtraError, RunLockedError
from saestore.lease import S3Lease, describe, supports_lease
from saestore.location import is_url

log = logging.getLogger(__name__)


class RunLock:
    """Exclusive lock of a run path (local filesystems), released by the kernel when its holder dies.

    The lock file ``<run path>.lock`` holds the holder's JSON ``{host, pid, started_at}`` and is held
    with an exclusive ``flock(2)`` for as long as the holder runs. A second writer gets
    :class:`RunLockedError` naming the holder. A process that dies, even by SIGKILL, releases its
    ``flock``; the next writer takes the lock over (its file names the dead holder until then).
    Taking over needs no liveness guess, so two processes can never both win a stale lock. On S3
    (``s3://``, or an S3-compatible store) the lock is a lease object taken and renewed with
    conditional writes (:mod:`saestore.lease`). Other URLs are not locked; a warning says so.
    """

    def __init__(self, run_path: str | Path) -> None:
        self.run_path = str(run_path)
        self.local = not is_url(self.run_path)
        self.path = Path(self.run_path.rstrip("/") + ".lock") if self.local else None
        self.held = False
        self._fd: int | None = None
        self.lease: S3Lease | None = None
        if not self.local:
            from fsspec.core import url_to_fs

            try:
                fs, lock_path = url_to_fs(self.run_path.rstrip("/") + ".lock")
            except ImportError as e:  # fsspec names the package: s3fs for s3://, gcsfs for gs://
                raise MissingExtraError(f"cannot open {self.run_path}: {e} (for s3://: pip install "
                                        "'saestore[s3]')") from None
            if supports_lease(fs):
                self.lease = S3Lease(fs, lock_path, self.run_path)

    def holder(self) -> dict | None:
        """The current (or last) holder's JSON, or None if unlocked or unreadable."""
        if self.lease is not None:
            return self.lease.read()[0]
        if self.path is None:
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> RunLock:
        if self.lease is not None:
            self.lease.acquire()
            self.held = True
            return self
        if self.path is None:
            log.warning("no writer lock on remote store %s: make sure only one extraction writes it", self.run_path)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockedError(f"cannot lock {self.path}: {e}") from e
                raise RunLockedError(self._held_message()) from None
            try:  # a holder that released unlinked the file we opened: lock the new one instead
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self.holder()
            if previous:
                log.warning("taking over the lock %s of a process that is gone (%s)", self.path, format_holder(previous))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
            self._fd, self.held = fd, True
            return self
        raise RunLockedError(f"could not acquire {self.path}: it keeps changing hands")

    def _held_message(self) -> str:
        held = None
        for _ in range(50):  # the new holder writes its name right after locking
            held = self.holder()
            if held:
                break
            time.sleep(0.01)
        who = format_holder(held) if held else "another process (it has not written its name yet)"
        return (f"run {self.run_path} is being written by {who}; wait for it to finish, or stop that process. "
                f"(The lock {self.path} is released when its holder exits, even if it is killed.)")

    def release(self) -> None:
        if self.lease is not None:
            if self.held:
                self.lease.release()
            self.held = False
            return
        if self.held and self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still locked: waiters re-check the file they locked
            finally:
                os.close(self._fd)
                self._fd, self.held = None, False
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def writer_state(run_path: str | Path) -> tuple[str, dict | None]:
    """Whether a run is being written now, from its lock file, without touching the lock:
    ``("live", holder)`` (a process of this host holds it), ``("gone", holder|None)`` (the named
    process no longer exists, or the run is there and its lock file is not: a writer removes it only
    on a clean exit), ``("unknown", holder)`` (another host's or another user's process, or a remote
    run), ``("none", None)`` (no run and no lock file)."""
    lock = RunLock(run_path)
    if lock.lease is not None:
        holder, etag = lock.lease.read()
        if etag is None:
            from saestore.writer import run_exists

            return ("gone", None) if run_exists(lock.run_path) else ("none", None)
        return ("gone" if lock.lease.stale(holder) else "live"), holder
    if lock.path is None:
        return "unknown", None
    holder = lock.holder()
    if holder is None:
        if lock.path.exists():  # a new holder has not written its name yet
            return "unknown", None
        return ("gone", None) if Path(lock.run_path).exists() else ("none", None)
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return "unknown", holder
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return "gone", holder
    except PermissionError:  # alive, another user's
        return "live", holder
    return "live", holder


def format_holder(holder: dict) -> str:
    return describe(holder)
