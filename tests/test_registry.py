"""The run registry: one row per run whatever the cwd or the spelling of its path, the run's own id
in its attributes, moved and copied runs re-registered with ``runs add``, ``validate --repair``
updating the row, older registries and stores without a run id."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
import sqlite3
from pathlib import Path

import pytest
import zarr

from saestore import protocol
from saestore.lock import RunLock
from saestore.registry import REGISTRY_FILENAME, Registry, find_registry, shown_status
from saestore.writer import create_run

from tests.helpers.stats_run import make_attrs, make_layout, write_run

FIXTURES = Path(__file__).parent / "fixtures" / "runs"


def _cli(*argv: str) -> tuple[int, str, str]:
    """``python -m saestore ARGV`` in this process: (exit code, stdout, stderr)."""
    from saestore.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _run_id(path: Path) -> str | None:
    return zarr.open_group(str(path), mode="r").attrs["saestore"].get("run_id")


def _rows(registry: Path) -> list[tuple[str, str | None, str]]:
    with contextlib.closing(sqlite3.connect(registry)) as db:
        return db.execute("SELECT path, run_id, status FROM runs ORDER BY path").fetchall()


@pytest.fixture
def synthetic(tmp_path) -> dict[str, Path]:
    """A complete synthetic run at out/demo/x.zarr (the real writer), registered with ``runs add``."""
    out = tmp_path / "out"
    path = out / "demo" / "x.zarr"
    write_run(path)
    code, stdout, err = _cli("runs", "add", str(path), "--output_dir", str(out))
    assert code == 0, err
    assert stdout.startswith(f"registered {path.resolve()} (run id {_run_id(path)}, status complete)")
    return {"out": out, "path": path, "registry": out / REGISTRY_FILENAME}


def test_created_run_has_an_id_in_its_root_attributes(tmp_path):
    layout = make_layout()
    attrs = create_run(tmp_path / "r.zarr", layout, make_attrs(layout))
    assert re.fullmatch(r"[0-9a-f]{32}", attrs.run_id)
    assert _run_id(tmp_path / "r.zarr") == attrs.run_id
    protocol.validate_json(zarr.open_group(str(tmp_path / "r.zarr")).attrs["saestore"], "run_attributes")
    # resume keeps it; another run gets another
    assert create_run(tmp_path / "r.zarr", layout, make_attrs(layout)).run_id == attrs.run_id
    assert create_run(tmp_path / "s.zarr", layout, make_attrs(layout)).run_id != attrs.run_id


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_fixture_runs_without_a_run_id_register_by_location(tmp_path, version):
    """Stores written before run ids (protocol 1.0-1.2 fixtures) read, validate and register; a
    second ``runs add`` updates the same row."""
    src = FIXTURES / version / "zarr-3.1.zarr"
    path = tmp_path / "old.zarr"
    shutil.copytree(src, path)
    assert _run_id(path) is None
    assert protocol.read_attrs(dict(zarr.open_group(str(path), mode="r").attrs)).run_id is None
    registry = tmp_path / REGISTRY_FILENAME
    for _ in range(2):
        assert _cli("runs", "add", str(path), "--registry", str(registry))[0] == 0
    assert _rows(registry) == [(str(path.resolve()), None, "complete")]


@pytest.mark.extract
def test_same_run_from_two_folders_is_one_row_and_any_spelling_finds_it(tmp_path, tiny_cache, monkeypatch):
    """The extraction from ``a/`` with ``--output_dir out``, then again from the parent with
    ``--output_dir a/out``: one registry row, keyed by the absolute location; ``runs show`` finds it
    by a relative, absolute, trailing-slash or symlinked path, by its run id and by its name."""
    from saestore.extract.launch import main as extract

    args = ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "--layer_types", "res",
            "--sae_features_width", "1k", "--max_seq_len", "24", "--n_docs_per_author", "2", "--chunk_docs", "2",
            "--devices", "cpu", "--quiet", "--run_name", "r"]
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert extract([*args, "--output_dir", "out"]) == 0
    monkeypatch.chdir(tmp_path)
    assert extract([*args, "--output_dir", "a/out"]) == 0
    path = tmp_path / "a" / "out" / "demo" / "tiny" / "r.zarr"
    registry = tmp_path / "a" / "out" / REGISTRY_FILENAME
    run_id = _run_id(path)
    assert _rows(registry) == [(str(path.resolve()), run_id, "complete")]

    (tmp_path / "link").symlink_to(path.parent)
    spellings = ["a/out/demo/tiny/r.zarr", "./a/out/demo/tiny/r.zarr/", str(path), f"{path}/",
                 "a/out/demo/../demo/tiny/r.zarr", str(tmp_path / "link" / "r.zarr"), "link/r.zarr/", run_id, "r"]
    for key in spellings:
        code, out, err = _cli("runs", "show", key, "--registry", str(registry))
        assert code == 0, (key, err)
        shown = json.loads(out)
        assert (shown["path"], shown["run_id"], shown["status"]) == (str(path.resolve()), run_id, "complete"), key


def test_copied_output_folder_and_runs_add_moves_the_row(synthetic, tmp_path):
    """An output folder copied with its registry: ``runs add`` of the copy (registry found above
    it) moves the copied registry's row to the copy, keeping its start time."""
    out2 = tmp_path / "copy"
    shutil.copytree(synthetic["out"], out2)
    before = Registry(out2 / REGISTRY_FILENAME).get(synthetic["path"])
    code, stdout, err = _cli("runs", "add", str(out2 / "demo" / "x.zarr"))
    assert code == 0, err
    copy = (out2 / "demo" / "x.zarr").resolve()
    assert stdout.startswith(f"moved {copy} ") and f"it was at {synthetic['path'].resolve()}" in stdout
    run_id = _run_id(synthetic["path"])
    assert _rows(out2 / REGISTRY_FILENAME) == [(str(copy), run_id, "complete")]
    after = Registry(out2 / REGISTRY_FILENAME).get(copy)
    assert (after.started_at, after.n_tokens, after.n_nonzero) == (before.started_at, before.n_tokens, before.n_nonzero)
    # the original registry still describes the original
    assert _rows(synthetic["registry"]) == [(str(synthetic["path"].resolve()), run_id, "complete")]


def test_moved_run_is_re_registered_and_a_copy_beside_it_gets_its_own_row(synthetic):
    registry, path = synthetic["registry"], synthetic["path"]
    run_id = _run_id(path)
    moved = path.with_name("moved.zarr")
    path.rename(moved)
    assert _cli("runs", "add", str(moved))[0] == 0  # the registry above the run
    assert _rows(registry) == [(str(moved.resolve()), run_id, "complete")]
    beside = path.with_name("beside.zarr")  # both are there, under the registry's folder: two runs
    shutil.copytree(moved, beside)
    code, stdout, _ = _cli("runs", "add", str(beside), "--output_dir", str(synthetic["out"]))
    assert code == 0 and stdout.startswith("registered")
    assert {r[0] for r in _rows(registry)} == {str(moved.resolve()), str(beside.resolve())}
    code, _, err = _cli("runs", "show", run_id, "--registry", str(registry))
    assert code == 2 and "names 2 runs" in err and "give the path" in err


def test_extraction_started_where_a_run_was_moved_replaces_its_row(synthetic):
    """``Registry.start`` of a run id whose row points where the run no longer is: one row."""
    registry, path = Registry(synthetic["registry"]), synthetic["path"]
    rec = registry.get(path)
    moved = path.with_name("moved.zarr")
    path.rename(moved)
    registry.start(path=moved, run_name="moved", model=rec.model, dataset=rec.dataset, category=None,
                   config_hash=rec.config_hash, config=rec.config, authors=rec.authors, n_docs=rec.n_docs,
                   run_id=rec.run_id)
    assert _rows(synthetic["registry"]) == [(str(moved.resolve()), rec.run_id, "running")]


def test_validate_repair_updates_the_registry_row(synthetic):
    path, registry = synthetic["path"], synthetic["registry"]
    chunk = path / "res" / "c" / "0" / "0" / "0" / "0" / "0"  # author 0's first shard of layer 2
    data = bytearray(chunk.read_bytes())
    data[8] ^= 0x10
    chunk.write_bytes(bytes(data))
    asides = [synthetic["out"].parent / f"aside{i}.zarr" for i in range(2)]  # damaged copies, no registry above
    for aside in asides:
        shutil.copytree(path, aside)
    code, _, err = _cli("validate", str(path), "--repair")  # the registry above the run
    assert code == 1
    assert f"registry {registry}: status failed" in err
    rec = Registry(registry).get(path)
    assert (rec.status, rec.failed_authors) == ("failed", ["a/b"])
    # no registry above the run: says so; with --registry, one that does not list it is left as it is
    code, _, err = _cli("validate", str(asides[0]), "--repair")
    assert code == 1 and "registry: none found above the run" in err
    other = synthetic["out"].parent / "other.sqlite"
    Registry(other)
    code, _, err = _cli("validate", str(asides[1]), "--repair", "--registry", str(other))
    assert code == 1 and "not registered" in err and "runs add" in err
    assert _rows(other) == []


def test_shown_status_is_interrupted_when_the_writer_is_gone(tmp_path):
    """A ``running`` row: ``running`` while a live process holds the run's lock, ``interrupted`` once
    the run is there without it (lock.writer_state)."""
    layout = make_layout()
    path = tmp_path / "r.zarr"
    attrs = create_run(path, layout, make_attrs(layout))
    registry = Registry(tmp_path / REGISTRY_FILENAME)
    registry.start(path=path, run_name="r", model="m", dataset="d", category=None, config_hash=attrs.config_hash,
                   config=attrs.config, authors=list(layout.authors), n_docs=sum(layout.n_docs), run_id=attrs.run_id)
    with RunLock(path):
        assert shown_status(registry.get(path)) == "running"
    assert shown_status(registry.get(path)) == "interrupted"
    Path(f"{path}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7}))
    assert shown_status(registry.get(path)) == "interrupted"  # a dead pid


def test_registry_of_an_older_saestore_gains_the_run_id_column(tmp_path):
    path = tmp_path / REGISTRY_FILENAME
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE runs (path TEXT PRIMARY KEY, run_name TEXT NOT NULL, model TEXT NOT NULL,"
                   " dataset TEXT NOT NULL, category TEXT, status TEXT NOT NULL CHECK (status IN ('running',"
                   " 'complete', 'failed')), config_hash TEXT NOT NULL, config TEXT NOT NULL, authors TEXT NOT NULL"
                   " DEFAULT '[]', failed_authors TEXT NOT NULL DEFAULT '[]', n_docs INTEGER, n_tokens INTEGER,"
                   " n_nonzero INTEGER, bytes INTEGER, started_at TEXT NOT NULL, finished_at TEXT, wall_s REAL,"
                   " error TEXT)")
        db.execute("INSERT INTO runs (path, run_name, model, dataset, status, config_hash, config, started_at)"
                   " VALUES ('runs/demo/tiny/old.zarr', 'old', 'tiny', 'demo', 'complete', 'sha256:0', '{}', 'then')")
    (rec,) = Registry(path).list()
    assert (rec.path, rec.run_id, rec.status) == ("runs/demo/tiny/old.zarr", None, "complete")
    assert Registry(path).get("old").path == "runs/demo/tiny/old.zarr"


def test_find_registry_is_the_nearest_above_the_run(synthetic, tmp_path):
    assert find_registry(synthetic["path"]) == synthetic["registry"].resolve()
    assert find_registry(tmp_path / "elsewhere" / "r.zarr") is None
    from saestore.registry import default_registry

    cached = default_registry("s3://bucket")  # a URL run's registry is the local cache's, when there is one
    assert find_registry("s3://bucket/run.zarr") == (cached if cached.is_file() else None)
