"""One writer per run: an exclusive lock file next to the store (``<run path>.lock``)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from saestore.errors import RunLockedError

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive, stale-aware lock of a run path (local filesystems).

    A lock held by a live process raises :class:`RunLockedError` naming the holder; a lock whose
    process is gone (same host, pid not alive) is taken over. Remote URLs are not locked (object
    stores have no exclusive create); a warning says so.
    """

    def __init__(self, run_path: str | Path) -> None:
        self.run_path = str(run_path)
        self.local = "://" not in self.run_path
        self.path = Path(self.run_path.rstrip("/") + ".lock") if self.local else None
        self.held = False

    def holder(self) -> dict | None:
        """The current holder's JSON, or None if unlocked or unreadable."""
        if self.path is None:
            return None
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def acquire(self) -> RunLock:
        if self.path is None:
            log.warning("no writer lock on remote store %s: make sure only one extraction writes it", self.run_path)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.holder()
                if held is None or (held.get("host") == me["host"] and not _pid_alive(int(held.get("pid", -1)))):
                    log.warning("taking over stale lock %s (holder %s)", self.path, held)
                    stale = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                    try:
                        os.replace(self.path, stale)
                        stale.unlink()
                    except FileNotFoundError:
                        pass  # another process took it over first; retry
                    continue
                raise RunLockedError(
                    f"run {self.run_path} is being written by pid {held.get('pid')} on host {held.get('host')} "
                    f"since {held.get('started_at')}; wait for it to finish, or if that process is gone for good, "
                    f"delete {self.path}"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"could not acquire {self.path}: it keeps changing hands")

    def release(self) -> None:
        if self.held and self.path is not None:
            held = self.holder()
            if held and held.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
