"""SIGINT and SIGTERM during an extraction: stop cleanly, record ``interrupted``, say how to resume.

:func:`handle_signals` (the CLI's coordinator, torchrun ranks) turns the first SIGINT or SIGTERM
into :class:`Interrupted`, a ``KeyboardInterrupt`` (so no ``except Exception`` swallows it) that
names the signal; once the workers have stopped, signals are only logged (:func:`hold`) while the
coordinator saves the run as ``interrupted`` (PROTOCOL.md §4). Worker processes leave SIGINT to their coordinator
(:func:`quiet_worker`), which stops them with SIGTERM, and exit without a traceback.
:func:`resume_command` is the exact command line that finishes the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger("saestore.extract")

#: the signals an extraction handles, and the exit code of each (128 + the signal number, what a
#: shell reports for a process the signal killed)
SIGNALS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class Interrupted(KeyboardInterrupt):
    """The extraction was stopped by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run: str | None = None
        """the run's path, once the coordinator recorded it as interrupted"""
        self.status: str | None = None
        self.progress = ""
        """e.g. '3 of 12 doc-chunks done'"""

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return SIGNALS.get(signal.Signals(self.signum), 128 + self.signum)


def of(e: BaseException) -> Interrupted | None:
    """``e`` as an :class:`Interrupted` (a plain KeyboardInterrupt is a SIGINT), else None."""
    if isinstance(e, Interrupted):
        return e
    return Interrupted(signal.SIGINT) if isinstance(e, KeyboardInterrupt) else None


def _raise(signum: int, frame: Any) -> None:
    for s in SIGNALS:  # the first signal stops the run; the finalization it triggers is not interrupted
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (in the main thread; elsewhere
    the block changes nothing: Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _saving(signum: int, frame: Any) -> None:
    log.warning("%s received while the run is being saved: it is saved first", signal.Signals(signum).name)


def hold() -> None:
    """From now on SIGINT and SIGTERM do not stop this process (the coordinator is saving the run:
    finalizing must not be cut short); each is logged. :func:`handle_signals` restores the handlers."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _saving)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored within the block: processes spawned in it inherit that, so a Ctrl-C (sent to
    the whole process group) reaches only the coordinator, which then stops them."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def quiet_worker() -> None:
    """In a worker process: SIGINT is the coordinator's; SIGTERM (the coordinator stopping this
    worker) raises :class:`Interrupted`, which the worker turns into a quiet exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise)


def _python() -> str:
    """How to name this interpreter: its bare name when that is what ``PATH`` finds, else its path."""
    name = os.path.basename(sys.executable)
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(sys.executable):
        return name
    return sys.executable


def _launcher() -> list[str]:
    """How this process was started: ``python`` alone, or torchrun on one node (its rendezvous
    options on several nodes cannot be known here and are left to the user, in angle brackets)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return [_python()]
    local = env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])
    nodes = [] if local == env["WORLD_SIZE"] else ["<your --nnodes and --rdzv options>"]
    return ["torchrun", *(nodes or ["--standalone"]), "--nproc_per_node", local]


def resume_command(argv: Sequence[str], *, resume: bool = True) -> str:
    """The command line (shell-quoted) that finishes the run started by ``argv``: ``argv`` without
    ``--overwrite`` (the run to finish must not be deleted), plus ``--resume`` when ``resume``, under
    the same launcher (``python`` or ``torchrun``)."""
    args = [a for a in argv if a != "--overwrite"]
    if resume and "--resume" not in args:
        args.append("--resume")
    launcher = _launcher()
    return " ".join([*(a if a.startswith("<") else shlex.quote(a) for a in launcher),
                     shlex.join(["-m", "saestore.extract", *args])])
