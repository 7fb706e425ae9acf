"""Host-side results of forward passes and the background writer that stores them.

:class:`BatchResult` is what one batch leaves on the host: batch-level arrays, documents along the
first axis, one :class:`~saestore.nonzeros.SparseActs` per SAE. A doc-chunk is a slice of it
(:meth:`BatchResult.docs`), or of several batches joined when ``batch_size < chunk_docs``.

:class:`ChunkSink` stores doc-chunks in a background thread so that the next forward pass runs
while the previous batch's doc-chunks are assembled, encoded and written. At most ``depth``
doc-chunks wait in its queue (a full queue blocks the forward thread: backpressure), so host memory
holds at most the batch being computed, the held results of one unfinished doc-chunk, ``depth``
waiting doc-chunks, the one being written, and the writer's unfinished shard (its SAE chunks
encoded, its per-token values: about one shard object per variable). Each shard is written whole,
payloads then markers, by the one writer thread, so the store goes through the same states as with
inline writes and a kill anywhere leaves what a kill of the inline writer would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saestore.nonzeros import SparseActs

__all__ = ["BatchResult", "ChunkSink", "WRITE_AHEAD"]

WRITE_AHEAD = 2
"""Doc-chunks that may wait for the background writer before the forward thread blocks."""


@dataclass(frozen=True, kw_only=True)
class BatchResult:
    """One batch's results on the host; per-token arrays are ``(B, n_tok)`` with PROTOCOL.md §2.5's
    padding (``token_ids`` -1, ``token`` "", ``ce``/``entropy`` NaN)."""

    token_ids: np.ndarray  # (B, T) int32
    token: np.ndarray  # (B, T) object: each token's text
    valid: np.ndarray  # (B, T) bool
    ce: np.ndarray  # (B, T) float32
    entropy: np.ndarray  # (B, T) float32
    n_truncated: np.ndarray  # (B,) int32
    acts: dict[tuple[str, int], SparseActs]  # (layer type, layer) → (B, T, d_sae) nonzeros
    per_sae: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # §2.6, (B, T) or (B,)
    per_doc: dict[str, np.ndarray] = field(default_factory=dict)  # §2.6 without a layer, (B,)

    _PER_DOC_ARRAYS = ("token_ids", "token", "valid", "ce", "entropy", "n_truncated")

    @property
    def n_docs(self) -> int:
        return int(self.valid.shape[0])

    def _with(self, arrays: Callable[[str, np.ndarray], np.ndarray], acts: Callable[[tuple[str, int]], SparseActs],
              per_key: Callable[[str, Any], np.ndarray]) -> BatchResult:
        return BatchResult(**{name: arrays(name, getattr(self, name)) for name in self._PER_DOC_ARRAYS},
                           acts={k: acts(k) for k in self.acts},
                           per_sae={k: per_key("per_sae", k) for k in self.per_sae},
                           per_doc={k: per_key("per_doc", k) for k in self.per_doc})

    def docs(self, start: int, stop: int) -> BatchResult:
        """Documents ``start … stop-1``."""
        return self._with(lambda _, a: a[start:stop], lambda k: self.acts[k].docs(start, stop),
                          lambda group, k: getattr(self, group)[k][start:stop])

    @classmethod
    def concat(cls, parts: Sequence[BatchResult]) -> BatchResult:
        """Batches one after the other."""
        first = parts[0]
        if len(parts) == 1:
            return first
        return first._with(lambda name, _: np.concatenate([getattr(p, name) for p in parts]),
                           lambda k: SparseActs.concat([p.acts[k] for p in parts]),
                           lambda group, k: np.concatenate([getattr(p, group)[k] for p in parts]))


class ChunkSink:
    """Runs ``write(job)`` for every submitted doc-chunk, in order, in one background thread
    (``depth`` > 0) or inline (``depth`` 0).

    A write that fails is re-raised in the submitting thread at the next :meth:`submit` or
    :meth:`drain`, and ``failed_job`` says which job failed; the doc-chunks queued after it are
    skipped (they are written by a rerun, like any doc-chunk without a marker).
    """

    def __init__(self, write: Callable[[Any], None], depth: int = WRITE_AHEAD) -> None:
        self._write, self.depth = write, int(depth)
        self._error: BaseException | None = None
        self.failed_job: Any = None
        """the job whose write failed (None while every write succeeded)."""
        self.busy_s = 0.0
        """seconds the writer spent writing (for the benchmarks)."""
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if self.depth > 0:
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._loop, name="saestore-writer", daemon=True)
            self._thread.start()

    def _timed_write(self, job: Any) -> None:
        t = time.perf_counter()
        try:
            self._write(job)
        except BaseException:
            self.failed_job = job
            raise
        finally:
            self.busy_s += time.perf_counter() - t

    def _loop(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._timed_write(job)
            except BaseException as e:  # re-raised in the forward thread
                self._error = e
            finally:
                self._queue.task_done()

    def submit(self, job: Any) -> None:
        """Write ``job`` (blocks while ``depth`` doc-chunks wait)."""
        if self._queue is None:
            self._timed_write(job)
            return
        if self._error is not None:
            self.drain()
        self._queue.put(job)

    def drain(self, *, raise_errors: bool = True) -> BaseException | None:
        """Wait until every submitted doc-chunk is written; re-raise the first failed write (or,
        with ``raise_errors=False``, return it)."""
        if self._queue is not None:
            self._queue.join()
        error, self._error = self._error, None
        if error is not None and raise_errors:
            raise error
        return error

    def close(self) -> None:
        """Stop the background thread (after the queued doc-chunks)."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> ChunkSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
