"""The run registry: an SQLite catalog of every extraction (config, path, status, sizes, timings)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saestore.errors import SaestoreError
from saestore.protocol import STATUSES

REGISTRY_FILENAME = "saestore_runs.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    path        TEXT PRIMARY KEY,
    run_name    TEXT NOT NULL,
    model       TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    category    TEXT,
    status      TEXT NOT NULL {status_check},
    config_hash TEXT NOT NULL,
    config      TEXT NOT NULL,
    authors     TEXT NOT NULL DEFAULT '[]',
    failed_authors TEXT NOT NULL DEFAULT '[]',
    n_docs      INTEGER,
    n_tokens    INTEGER,
    n_nonzero   INTEGER,
    bytes       INTEGER,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    wall_s      REAL,
    error       TEXT
);
"""
#: the statuses a row may have: those of a run (PROTOCOL.md §4)
_STATUS_CHECK = f"CHECK (status IN ({', '.join(repr(s) for s in STATUSES)}))"
_SCHEMA = _SCHEMA.replace("{status_check}", _STATUS_CHECK)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    path: str
    run_name: str
    model: str
    dataset: str
    category: str | None
    status: str
    config_hash: str
    config: dict[str, Any]
    authors: list[str]
    failed_authors: list[str]
    n_docs: int | None
    n_tokens: int | None
    n_nonzero: int | None
    bytes: int | None
    started_at: str
    finished_at: str | None
    wall_s: float | None
    error: str | None


def shown_status(record: RunRecord) -> str:
    """The status to show for a run: ``interrupted`` for a ``running`` row whose writer is gone (the
    run's lock file names a process of this host that no longer exists, or the run is there and its
    lock file is not: a writer removes it only on a clean exit, which also updates the row),
    else the stored status. A writer on another host cannot be checked, so it stays ``running``."""
    if record.status != "running":
        return record.status
    from saestore.lock import RunLock

    lock = RunLock(record.path)
    if lock.path is None:
        return record.status
    holder = lock.holder()
    if holder is None:
        return "interrupted" if Path(record.path).exists() and not lock.path.exists() else record.status
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return record.status
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return "interrupted"
    except PermissionError:  # alive, another user's
        return record.status
    return record.status


def _migrate(db: sqlite3.Connection) -> None:
    """Rebuild a ``runs`` table created by an older saestore whose schema differs (its status CHECK
    lacked ``interrupted``): SQLite cannot alter a CHECK, so the rows are copied into a new table."""
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone()
    if _STATUS_CHECK in " ".join(sql.split()):
        return
    old = [r[1] for r in db.execute("PRAGMA table_info(runs)")]
    db.execute("ALTER TABLE runs RENAME TO runs_before_migration")
    db.executescript(_SCHEMA)
    new = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    cols = ", ".join(c for c in old if c in new)
    db.execute(f"INSERT INTO runs ({cols}) SELECT {cols} FROM runs_before_migration")
    db.execute("DROP TABLE runs_before_migration")


class Registry:
    """``Registry(path)``; ``path`` defaults to ``{output_dir}/saestore_runs.sqlite``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            _migrate(db)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def start(self, *, path: str, run_name: str, model: str, dataset: str, category: str | None,
              config_hash: str, config: dict[str, Any], authors: list[str], n_docs: int) -> None:
        """Record a run as running (a rerun of the same path replaces the previous record)."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (path, run_name, model, dataset, category, status, config_hash, config,"
                " authors, n_docs, started_at) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (path, run_name, model, dataset, category, config_hash, json.dumps(config, sort_keys=True),
                 json.dumps(authors), n_docs, _now()),
            )

    def finish(self, path: str, *, status: str, failed_authors: list[str], n_tokens: int, n_nonzero: int,
               bytes: int, wall_s: float, error: str | None = None) -> None:
        with self._connect() as db:
            cur = db.execute(
                "UPDATE runs SET status = ?, failed_authors = ?, n_tokens = ?, n_nonzero = ?, bytes = ?,"
                " finished_at = ?, wall_s = ?, error = ? WHERE path = ?",
                (status, json.dumps(failed_authors), n_tokens, n_nonzero, bytes, _now(), wall_s, error, path),
            )
            if cur.rowcount != 1:
                raise SaestoreError(f"run {path} is not in registry {self.path}")

    def list(self, *, model: str | None = None, dataset: str | None = None) -> list[RunRecord]:
        query, args = "SELECT * FROM runs WHERE 1 = 1", []
        if model:
            query += " AND model = ?"
            args.append(model)
        if dataset:
            query += " AND dataset = ?"
            args.append(dataset)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY started_at, path", args).fetchall()
        return [self._record(r) for r in rows]

    def get(self, key: str) -> RunRecord:
        """A run by its path, or by its run name when that is unique."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs WHERE path = ? OR run_name = ?", (key, key)).fetchall()
        if not rows:
            raise SaestoreError(f"no run {key!r} in registry {self.path}; `python -m saestore runs list` shows them")
        if len(rows) > 1:
            paths = ", ".join(r["path"] for r in rows)
            raise SaestoreError(f"run name {key!r} is ambiguous ({paths}); give the path")
        return self._record(rows[0])

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        for key in ("config", "authors", "failed_authors"):
            data[key] = json.loads(data[key])
        return RunRecord(**data)
