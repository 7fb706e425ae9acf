"""The run registry: an SQLite catalog of every extraction (config, path, status, sizes, timings).

A row is keyed by the run's resolved location (:func:`saestore.location.resolved`: absolute, symlinks
and trailing slashes resolved), so any spelling of a path finds the same row, and carries the run's
own id (``run_id`` in its root attributes, PROTOCOL.md §4): a moved or copied run is re-registered
with :meth:`Registry.add` (``python -m saestore runs add PATH``), which moves the row of that id.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saestore.errors import RunNotFoundError, SaestoreError
from saestore.location import default_cache_dir, is_url, resolved
from saestore.protocol import STATUSES

REGISTRY_FILENAME = "saestore_runs.sqlite"


def default_registry(output_dir: str | Path) -> Path:
    """``{output_dir}/saestore_runs.sqlite``; for an output URL (``s3://…``), where SQLite cannot
    live, the same file in the local cache folder (``$SAESTORE_CACHE``, else ``~/.cache/saestore``)."""
    if is_url(output_dir):
        return default_cache_dir() / REGISTRY_FILENAME
    return Path(output_dir) / REGISTRY_FILENAME


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
    error       TEXT,
    run_id      TEXT
);
"""
_COLUMNS = ("path", "run_name", "model", "dataset", "category", "status", "config_hash", "config", "authors",
            "failed_authors", "n_docs", "n_tokens", "n_nonzero", "bytes", "started_at", "finished_at", "wall_s",
            "error", "run_id")
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
    run_id: str | None = None


def find_registry(run_path: str | Path) -> Path | None:
    """The registry a run would be registered in by default: the nearest ``saestore_runs.sqlite``
    in a folder above the run (runs live at ``{output_dir}/…/{run_name}.zarr``, the registry at
    ``{output_dir}/saestore_runs.sqlite``); for a URL the local cache's (:func:`default_registry`);
    None when there is none."""
    if is_url(str(run_path)):
        cached = default_registry(str(run_path))
        return cached if cached.is_file() else None
    for folder in Path(resolved(run_path)).parents:
        if (folder / REGISTRY_FILENAME).is_file():
            return folder / REGISTRY_FILENAME
    return None


def _stored_run_id(path: str) -> str | None:
    """The run id in the root attributes of the store at ``path``, or None (no run there, or none set)."""
    import zarr

    try:
        attrs = zarr.open_group(path, mode="r").attrs.get("saestore")
    except (FileNotFoundError, ValueError, OSError, zarr.errors.GroupNotFoundError):
        return None
    run_id = attrs.get("run_id") if isinstance(attrs, dict) else None
    return run_id if isinstance(run_id, str) else None


def shown_status(record: RunRecord) -> str:
    """The status to show for a run: ``interrupted`` for a ``running`` row whose writer is gone
    (:func:`saestore.lock.writer_state` says ``gone``: the process named by the run's lock file no
    longer exists, or the run is there and its lock file is not), else the stored status. A writer
    on another host cannot be checked, so it stays ``running``."""
    if record.status != "running":
        return record.status
    from saestore.lock import writer_state

    state, _ = writer_state(record.path)
    return "interrupted" if state == "gone" else record.status


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
            if "run_id" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:  # an older registry
                db.execute("ALTER TABLE runs ADD COLUMN run_id TEXT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def start(self, *, path: str | Path, run_name: str, model: str, dataset: str, category: str | None,
              config_hash: str, config: dict[str, Any], authors: list[str], n_docs: int,
              run_id: str | None = None) -> None:
        """Record a run as running. A rerun at the same location replaces the previous record, and so
        does a run started where it was moved to (the row of its run id, :meth:`_moved_rows`)."""
        where = resolved(path)
        with self._connect() as db:
            for old in self._moved_rows(db, run_id, where):
                db.execute("DELETE FROM runs WHERE path = ?", (old["path"],))
            db.execute(
                "INSERT OR REPLACE INTO runs (path, run_name, model, dataset, category, status, config_hash, config,"
                " authors, n_docs, started_at, run_id) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (where, run_name, model, dataset, category, config_hash, json.dumps(config, sort_keys=True),
                 json.dumps(authors), n_docs, _now(), run_id),
            )

    def _moved_rows(self, db: sqlite3.Connection, run_id: str | None, where: str) -> list[sqlite3.Row]:
        """The rows of ``run_id`` at other locations that are this run's own entry, moved: the run is
        no longer there (it was moved), or the location lies outside this registry's folder (the
        registry was copied with its output folder). A copy beside its original, both under the
        registry's folder, is another run with its own row."""
        if not run_id:
            return []
        rows = db.execute("SELECT * FROM runs WHERE run_id = ? AND path != ?", (run_id, where)).fetchall()
        home = self.path.resolve().parent
        return [r for r in rows if not is_url(r["path"])  # a remote row is not checked (nor moved)
                and (_stored_run_id(r["path"]) != run_id or not Path(r["path"]).is_relative_to(home))]

    def finish(self, path: str | Path, *, status: str, failed_authors: list[str], n_tokens: int, n_nonzero: int,
               bytes: int, wall_s: float, error: str | None = None) -> None:
        with self._connect() as db:
            cur = db.execute(
                "UPDATE runs SET status = ?, failed_authors = ?, n_tokens = ?, n_nonzero = ?, bytes = ?,"
                " finished_at = ?, wall_s = ?, error = ? WHERE path = ?",
                (status, json.dumps(failed_authors), n_tokens, n_nonzero, bytes, _now(), wall_s, error,
                 resolved(path)),
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

    def get(self, key: str | Path) -> RunRecord:
        """A run by any spelling of its location (relative, absolute, through a symlink, with a
        trailing slash), by its run id, or by its run name when that is unique."""
        key = str(key)
        where = resolved(key)
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs WHERE path IN (?, ?)", (where, key)).fetchall()
            if not rows and _looks_like_run_id(key):
                rows = db.execute("SELECT * FROM runs WHERE run_id = ?", (key,)).fetchall()
            if not rows:
                rows = db.execute("SELECT * FROM runs WHERE run_name = ?", (key,)).fetchall()
        if not rows:
            hint = ""
            if not is_url(key) and Path(key).exists() and (run_id := _stored_run_id(where)):
                hint = f" (the run there has run id {run_id}; `python -m saestore runs add {key}` registers it)"
            raise SaestoreError(f"no run {key!r} in registry {self.path}{hint}; `python -m saestore runs list` "
                                "shows them, `runs add PATH` registers a run found at PATH")
        if len(rows) > 1:
            paths = ", ".join(r["path"] for r in rows)
            raise SaestoreError(f"{key!r} names {len(rows)} runs ({paths}); give the path")
        return self._record(rows[0])

    def add(self, path: str | Path, *, only_if_registered: bool = False) -> tuple[RunRecord | None, str | None]:
        """(Re)register the run found at ``path`` from what its store says (status, failed authors,
        tokens, nonzeros, bytes). Its row at the same location, or else the row of its run id moved
        (:meth:`_moved_rows`: the run was moved or copied here with its registry), is updated, keeping
        its start time and wall time; otherwise a row is added (with ``only_if_registered`` nothing
        is: returns ``(None, None)``). Returns the row now stored and, when the row moved, where it was."""
        where = resolved(path)
        state = read_run(where)
        with self._connect() as db:
            old = db.execute("SELECT * FROM runs WHERE path = ?", (where,)).fetchone()
            if old is not None and old["run_id"] not in (None, state["run_id"]):
                old = None  # another run was at this location before (overwritten): replace its row
            moved = self._moved_rows(db, state["run_id"], where) if old is None else []
            old = old if old is not None else (moved[0] if moved else None)
            if old is None and only_if_registered:
                return None, None
            keep = dict(old) if old is not None else {}
            row = {**state, "path": where,
                   "dataset": state["dataset"] or keep.get("dataset") or "?",
                   "category": state["category"] if state["dataset"] else keep.get("category"),
                   "started_at": keep.get("started_at") or state["started_at"],
                   "wall_s": keep.get("wall_s"),
                   "error": keep.get("error") if state["status"] == "failed" else None}
            db.execute("DELETE FROM runs WHERE path = ?", (where,))
            for r in moved:
                db.execute("DELETE FROM runs WHERE path = ?", (r["path"],))
            db.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                       [row[c] for c in _COLUMNS])
            stored = db.execute("SELECT * FROM runs WHERE path = ?", (where,)).fetchone()
        return self._record(stored), (old["path"] if old is not None and old["path"] != where else None)

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        for key in ("config", "authors", "failed_authors"):
            data[key] = json.loads(data[key])
        return RunRecord(**data)


def _looks_like_run_id(key: str) -> bool:
    return len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def read_run(path: str | Path) -> dict[str, Any]:
    """A registry row's fields from the run store at ``path`` (its attributes, layout and markers);
    :class:`RunNotFoundError` when there is no run."""
    import zarr

    from saestore import protocol
    from saestore.writer import read_layout, read_progress

    where = resolved(path)
    try:
        group = zarr.open_group(where, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise RunNotFoundError(f"no saestore run at {where}; give the folder of a run (…/RUN_NAME.zarr)") from e
    attrs = protocol.read_attrs(dict(group.attrs), where=where)
    layout = read_layout(group)
    progress = read_progress(where)
    local = not is_url(where)
    return {
        "run_id": attrs.run_id, "run_name": where.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr"),
        "model": attrs.model, "dataset": attrs.config.get("dataset_name"),
        "category": attrs.config.get("category_name"), "status": attrs.status, "config_hash": attrs.config_hash,
        "config": json.dumps(attrs.config, sort_keys=True), "authors": json.dumps(list(layout.authors)),
        "failed_authors": json.dumps(attrs.failed_authors), "n_docs": sum(layout.n_docs),
        "n_tokens": int(progress[..., 1].sum()), "n_nonzero": int(progress[..., 2].sum()),
        "bytes": sum(p.stat().st_size for p in Path(where).rglob("*") if p.is_file()) if local else None,
        "started_at": attrs.created_at, "finished_at": attrs.finalized_at,
    }
