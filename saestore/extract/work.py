"""What a worker is given (:class:`AuthorWork`) and what it reports (:class:`WorkerStats`).

Kept apart from :mod:`saestore.extract.worker` so that the coordinator and the worker pool pass them
without importing torch or the model stack.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from saestore.extract.data import Document


@dataclass(frozen=True, kw_only=True)
class AuthorWork:
    author_idx: int
    author: str
    docs: tuple[Document, ...]


@dataclass
class WorkerStats:
    """What one worker did; summed by the coordinator."""

    n_docs: int = 0
    n_tokens: int = 0
    nnz: dict[str, int] = field(default_factory=dict)  # "res/3" -> nonzeros
    seconds: float = 0.0
    extract_s: float = 0.0
    """seconds from the first forward to the last doc-chunk written (model loading excluded)."""
    first_batch: float | None = None
    """when the first forward began (``time.time()``; the earliest of the workers'), None: none ran"""
    failed: dict[str, str] = field(default_factory=dict)  # author -> error

    @classmethod
    def failing(cls, authors: Iterable[str], reason: str) -> WorkerStats:
        """The stats of a worker that did none of ``authors``, for ``reason``."""
        return cls(failed={a: reason for a in authors})

    @classmethod
    def merge(cls, parts: Iterable[WorkerStats]) -> WorkerStats:
        """The run's stats from its workers': sums, the longest wall time, every failure."""
        total = cls()
        for s in parts:
            total.n_docs += s.n_docs
            total.n_tokens += s.n_tokens
            total.seconds = max(total.seconds, s.seconds)
            total.extract_s = max(total.extract_s, s.extract_s)
            if s.first_batch is not None:
                total.first_batch = min(total.first_batch or s.first_batch, s.first_batch)
            total.failed.update(s.failed)
            for k, v in s.nnz.items():
                total.nnz[k] = total.nnz.get(k, 0) + v
        return total

    def first_failure(self) -> str | None:
        """The first recorded failure (authors in order) for one-line messages, naming its author."""
        return next((m if repr(a) in m else f"{a!r}: {m}" for a, m in sorted(self.failed.items())), None)
