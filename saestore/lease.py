"""One writer per run on S3 (and S3-compatible stores): a lease object ``<run URL>.lock``.

Object stores have no ``flock``. What they do have, on AWS S3 since 2024 and on the S3-compatible
servers that followed, are conditional writes: ``PutObject`` with ``If-None-Match: *`` creates an
object only if there is none, and with ``If-Match: ETAG`` replaces it only if it is still the
version read. The lease is built from those two and nothing else:

* **Acquire**: create ``<run URL>.lock`` with ``If-None-Match: *``. The body is the holder's JSON
  (host, pid, started_at, renewed_at, ttl_s, token).
* **Held by a live writer**: the holder rewrites it (``If-Match`` its own last ETag) every
  ``ttl_s / 3`` seconds. A second writer that finds it renewed within ``ttl_s`` is refused with
  :class:`RunLockedError` naming the holder.
* **Take-over**: a lease not renewed for ``ttl_s`` is stale (its holder died or was cut off). A new
  writer replaces it with ``If-Match`` the stale ETag. Of several racing writers exactly one
  succeeds; the others get a precondition failure and are refused.
* **Release**: the holder deletes the lease if it still holds it (ETag unchanged).

What it guarantees: two writers never both *acquire* the lease (the store decides, atomically).
What it does not: a holder cut off from the store for longer than ``ttl_s`` can be taken over while
it still runs. It notices at its next renewal, logs an error and stops renewing, but payloads it
writes in between still land. They are the same bytes the new holder writes, because a run's
chunks are a deterministic function of its configuration, so no data is mixed. Staleness is judged
by the clocks of the writers (``renewed_at`` in UTC): keep them within ``ttl_s / 2`` of each other
(NTP does far better). ``SAESTORE_LEASE_TTL`` sets ``ttl_s`` (default 60 seconds).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import uuid
from typing import Any

from saestore.errors import RunLockedError

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0


def lease_ttl() -> float:
    """``SAESTORE_LEASE_TTL`` (seconds), else 60."""
    raw = os.environ.get("SAESTORE_LEASE_TTL")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise RunLockedError(f"SAESTORE_LEASE_TTL={raw!r} is not a number of seconds; unset it or give e.g. 60") \
            from None
    if ttl <= 0:
        raise RunLockedError(f"SAESTORE_LEASE_TTL={raw!r} must be positive; unset it or give e.g. 60")
    return ttl


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def supports_lease(fs: Any) -> bool:
    """True for filesystems with conditional writes saestore uses (s3fs)."""
    return type(fs).__module__.split(".")[0] == "s3fs"


class S3Lease:
    """The lease of one run on S3 (see the module docstring)."""

    def __init__(self, fs: Any, lock_path: str, run_url: str, ttl_s: float | None = None) -> None:
        self.fs, self.path, self.run_url = fs, lock_path, run_url
        self.bucket, self.key, _ = fs.split_path(lock_path)
        self.ttl_s = lease_ttl() if ttl_s is None else float(ttl_s)
        self.token = uuid.uuid4().hex
        self.started_at = _now().isoformat(timespec="seconds")
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -----------------------------------------------------------------------------

    def read(self) -> tuple[dict | None, str | None]:
        """(holder JSON, ETag) of the lease object, (None, None) when there is none. Head, body and
        head again, so the body is the version the ETag names."""
        for _ in range(10):
            try:
                before = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
                body = self.fs.cat_file(self.path)
                after = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            except FileNotFoundError:
                return None, None
            if before == after:
                try:
                    data = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    data = None
                return (data if isinstance(data, dict) else None), after
        return None, None

    def stale(self, holder: dict | None) -> bool:
        """True when ``holder`` was not renewed within its ttl (or is unreadable)."""
        if not holder:
            return True
        try:
            renewed = _dt.datetime.fromisoformat(str(holder["renewed_at"]))
            ttl = float(holder.get("ttl_s", self.ttl_s))
        except (KeyError, ValueError, TypeError):
            return True
        return (_now() - renewed).total_seconds() > ttl

    # -- writing -----------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": self.started_at,
                           "renewed_at": _now().isoformat(timespec="milliseconds"), "ttl_s": self.ttl_s,
                           "token": self.token}).encode("utf-8")

    def _put(self, **condition: str) -> bool:
        """A conditional put of a fresh body; True if the store took it."""
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileNotFoundError):  # If-Match on an object deleted meanwhile
                return False
            code = getattr(getattr(e, "__cause__", None), "response", {}).get("Error", {}).get("Code")
            if isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        self.etag = out["ETag"]
        self.fs.invalidate_cache(self.path)
        return True

    def acquire(self) -> None:
        if self._put(IfNoneMatch="*"):
            self._start_renewing()
            return
        holder, etag = self.read()
        if etag is None:  # released between our put and our read: try once more
            if self._put(IfNoneMatch="*"):
                self._start_renewing()
                return
            holder, etag = self.read()
        if etag is not None and self.stale(holder) and self._put(IfMatch=etag):
            log.warning("taking over the lease %s of a writer that stopped renewing it (%s)", self.path,
                        describe(holder) if holder else "unreadable")
            self._start_renewing()
            return
        holder, _ = self.read()
        who = describe(holder) if holder else "another process"
        raise RunLockedError(
            f"run {self.run_url} is being written by {who}; wait for it to finish, or stop that process. "
            f"(The lease {self.path} is renewed every {self.ttl_s / 3:g} s and can be taken over "
            f"{self.ttl_s:g} s after its holder stops renewing it.)")

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="saestore-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                renewed = self._put(IfMatch=self.etag or "")
            except OSError as e:  # the store is unreachable: try again until the ttl is out
                log.warning("could not renew the lease %s: %s", self.path, e)
                continue
            if not renewed:
                self.lost = True
                log.error("lost the writer lease %s: another process took over %s; stop this extraction",
                          self.path, self.run_url)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost or self.etag is None:
            return
        _, etag = self.read()
        if etag == self.etag:
            self.fs.rm_file(self.path)
        self.etag = None


def describe(holder: dict) -> str:
    """``pid P on host H since T`` (the local lock's wording), plus when a lease was last renewed."""
    text = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started_at')}"
    return text + (f", renewed {holder['renewed_at']}" if "renewed_at" in holder else "")
