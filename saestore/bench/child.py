"""Measured subprocesses: each benchmark that reports a peak RSS runs alone in a fresh process.

``python -m saestore.bench.child TASK`` reads a JSON spec on stdin, runs the task, and prints one
line ``SAESTORE_BENCH_RESULT {json}`` with the task's result plus ``peak_rss_mb`` (the process's
``VmHWM``, its high-water resident set) and ``child_wall_s``. :func:`run_child` is the driver's side.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from saestore.errors import BenchError

__all__ = ["TASKS", "reset_peak_rss", "rss_mb", "run_child"]

log = logging.getLogger(__name__)

RESULT_PREFIX = "SAESTORE_BENCH_RESULT "
TASKS: dict[str, str] = {
    "write_saestore": "saestore.bench.write:child_write_saestore",
    "write_seed": "saestore.bench.write:child_write_seed",
    "stats": "saestore.bench.stats_speed:child_stats",
    "scale": "saestore.bench.scale:child_scale",
    "extract": "saestore.bench.extraction:child_extract",
    "prepare_tiny": "saestore.bench.extraction:child_prepare_tiny",
    "startup": "saestore.bench.extraction:child_startup",
}


def rss_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from /proc/self/status."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5); False if not possible.

    Lets a child measure the peak of one computation after a warm-up (imports, JIT compilation)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def run_child(task: str, spec: dict[str, Any], *, timeout: float = 900,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one task in a fresh interpreter and return its result (raises BenchError on failure)."""
    if task not in TASKS:
        raise BenchError(f"unknown benchmark task {task!r}; known: {sorted(TASKS)}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "saestore.bench.child", task], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"benchmark task {task} ran past {timeout:.0f} s") from e
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"benchmark task {task} failed (exit code {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out["driver_wall_s"] = time.perf_counter() - t0
    log.debug("%s: %s", task, out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in TASKS:
        print(f"usage: python -m saestore.bench.child {{{','.join(TASKS)}}} < spec.json", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(sys.stdin.read())
    module, name = TASKS[argv[0]].split(":")
    fn = getattr(importlib.import_module(module), name)
    t0 = time.perf_counter()
    out = fn(spec)
    out["child_wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = rss_mb("VmHWM")
    out["pid"] = os.getpid()
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
