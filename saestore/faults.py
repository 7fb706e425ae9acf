"""Deterministic fault injection, for the reliability tests only (inactive unless the variable is set).

``SAESTORE_FAULT="POINT:N[:ACTION][@RANK][,...]"`` makes the process act the N-th time (1-based) it
passes the named fault point; with ``@RANK``, only the torchrun/SLURM rank RANK acts (``$RANK``,
else ``$SLURM_PROCID``, else 0). Actions:

``kill`` (default)
    ``SIGKILL`` to itself: no cleanup, no ``finally``, no atexit, no flush; what a crash, the OOM
    killer or a pre-empted node does to a process.
``sleepS``
    sleep S seconds (e.g. ``sleep30``), then go on; lets a test act while the process holds the run.
``enospc``
    raise ``OSError(ENOSPC)`` there, as a full disk would.

The variable is read once, when this module is imported (one dictionary lookup per fault point
when it is unset); :func:`configure` sets the plan in a process that is already running. The
points are listed in :data:`POINTS`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Final

from saestore.errors import FaultSpecError

log = logging.getLogger(__name__)

ENV: Final = "SAESTORE_FAULT"

#: fault point -> where it is (the N-th pass counts per process)
POINTS: Final = {
    "lock": "launch: the run lock is held, nothing created or opened yet",
    "create_array": "writer.create_run: after each coordinate or array is created (the store is half made)",
    "reopen": "writer.create_run (resume): root attributes reset to running, not yet consolidated",
    "created": "launch: the store exists and the registry says running, no worker started",
    "forward": "worker: a batch's forward pass has run, its results are not yet written",
    "payload": "writer.write_chunk: after each stored payload (SAE chunk, per-token or per-document variable)",
    "before_marker": "writer.write_chunk: every payload of a doc-chunk is stored, its marker is not",
    "after_marker": "writer.write_chunk: a doc-chunk's progress marker is stored",
    "workers_done": "launch: every worker returned, the run is not finalized",
    "finalize_attrs": "writer.finalize_run: final root attributes written, metadata not yet consolidated",
    "finalized": "launch: the store is finalized, the registry is not yet updated",
}

_plan: dict[str, tuple[int, str]] = {}
_RANK_KEYS: Final = ("RANK", "SLURM_PROCID")
_passes: dict[str, int] = {}


def parse(spec: str | None) -> dict[str, tuple[int, str]]:
    """``"payload:3,forward:1:sleep5"`` -> ``{"payload": (3, "kill"), "forward": (1, "sleep5")}``.

    Items for another rank (``POINT:N@RANK``) are left out of this process's plan."""
    plan: dict[str, tuple[int, str]] = {}
    rank = next((os.environ[k] for k in _RANK_KEYS if k in os.environ), "0")
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        item, _, only = item.partition("@")
        if only and not only.isdigit():
            raise FaultSpecError(f"{ENV}: {item}@{only}: the rank after '@' must be a number")
        if only and int(only) != int(rank):
            continue
        name, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if name not in POINTS:
            raise FaultSpecError(f"{ENV}: unknown fault point {name!r}; points: {', '.join(POINTS)}")
        if not count.isdigit() or int(count) < 1:
            raise FaultSpecError(f"{ENV}: {item!r} needs a pass count N >= 1 (POINT:N[:ACTION])")
        if action not in ("kill", "enospc") and not (action.startswith("sleep")
                                                    and action[5:].replace(".", "", 1).isdigit()):
            raise FaultSpecError(f"{ENV}: unknown action {action!r} in {item!r}; use kill, enospc or sleepSECONDS")
        plan[name] = (int(count), action)
    return plan


def configure(spec: str | None) -> None:
    """Replace the fault plan of this process (and reset the pass counts)."""
    _plan.clear()
    _plan.update(parse(spec))
    _passes.clear()


def point(name: str) -> None:
    """Mark a fault point; acts when the plan says so. Free when no fault is planned."""
    if not _plan:
        return
    planned = _plan.get(name)
    if planned is None:
        return
    _passes[name] = n = _passes.get(name, 0) + 1
    if n != planned[0]:
        return
    action = planned[1]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered asynchronously; never go on past the point
    log.warning("fault point %s pass %d: %s", name, n, action)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"fault point {name}")
    time.sleep(float(action[5:]))


configure(os.environ.get(ENV))
