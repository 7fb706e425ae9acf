"""Runs on object storage, for real: a local S3-compatible server (moto's server mode on
127.0.0.1, started here), s3fs, zarr's FsspecStore. An extraction writes ``s3://…``; ``xr.open_zarr``,
``open_run``, statistics, ``info``, ``validate`` and the torch readers read it; a kill and a rerun
give the same bytes as a local run; the writer lease refuses a second writer and has one winner
when several take over a stale one; a creation killed half-way is redone by the rerun."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.needs import module_needs

module_needs("s3")

import s3fs
import xarray as xr
from moto.server import ThreadedMotoServer

from saestore import protocol
from saestore.errors import RunLockedError
from saestore.lease import S3Lease
from saestore.lock import RunLock, writer_state

ARGS = ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "--layer_types", "res", "att",
        "--sae_features_width", "1k", "--n_docs_per_author", "4", "--exclude_authors", "lawyer", "gardener",
        "--chunk_docs", "2", "--shard_docs", "2", "--batch_size", "4", "--max_seq_len", "32", "--devices", "cpu",
        "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment that points botocore at it (the standard
    way: AWS_* variables and AWS_ENDPOINT_URL; nothing about it is stored in a run)."""
    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    patch = pytest.MonkeyPatch()
    for k, v in env.items():
        patch.setenv(k, v)
    patch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("runs")
    yield {"fs": fs, "env": env}
    patch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _extract(out: str, name: str, cwd: Path, cache: Path, fault: str | None = None,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAESTORE_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("SAESTORE_FAULT", None)
    if fault:
        env["SAESTORE_FAULT"] = fault
    argv = [sys.executable, "-m", "saestore.extract", *ARGS, "--output_dir", out, "--run_name", name]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _objects(fs, root: str) -> dict[str, bytes]:
    """Every chunk object under ``root`` (metadata and markers aside: they hold times)."""
    out = {}
    root = root.removeprefix("s3://").rstrip("/")
    for key in fs.find(root):
        rel = key[len(root) + 1:]
        if not rel.endswith("zarr.json") and not rel.startswith(protocol.PROGRESS_PATH):
            out[rel] = fs.cat_file(key)
    return out


def _local_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and p.name != "zarr.json" and not p.relative_to(path).as_posix().startswith(
                protocol.PROGRESS_PATH)}


@pytest.fixture(scope="module")
def local_ref(tiny_cache, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("s3ref")
    done = _extract(str(cwd / "out"), "ref", cwd, tiny_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "out" / "demo" / "tiny" / "ref.zarr"


@pytest.mark.extract
def test_extract_to_s3_then_every_reader_reads_it(s3, local_ref, tiny_cache, tmp_path):
    """The run goes to the bucket (no local folder named ``s3:``), byte-identical to a local run,
    and every reader reads it from the URL."""
    from saestore import open_run, stats
    from saestore.registry import Registry
    from saestore.validate import validate_run

    fs = s3["fs"]
    url = "s3://runs/a/demo/tiny/r.zarr"
    done = _extract("s3://runs/a", "r", tmp_path, tiny_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run: {url}" in done.stdout and "status: complete" in done.stdout
    assert not any(tmp_path.iterdir()), f"something local was written: {list(tmp_path.iterdir())}"
    assert not fs.exists(url + ".lock"), "the lease is released after a clean finish"
    got, want = _objects(fs, url), _local_files(local_ref)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)

    ds, ref = xr.open_zarr(url), xr.open_zarr(str(local_ref))
    np.testing.assert_array_equal(ds["token_id"].values, ref["token_id"].values)
    np.testing.assert_array_equal(ds["res"].values, ref["res"].values)
    run = open_run(url)
    assert run.attrs["saestore"]["status"] == "complete" and bool(run["done"].all())
    freq = stats.frequency(run, "att", by="author").compute()
    np.testing.assert_array_equal(freq.values, stats.frequency(open_run(str(local_ref)), "att", by="author").values)
    assert freq.sum() > 0
    report = validate_run(url)
    assert report.ok and not report.incomplete, report.format()
    info = subprocess.run([sys.executable, "-m", "saestore", "info", url], capture_output=True, text=True,
                          env={**os.environ})
    assert info.returncode == 0 and "status         complete" in info.stdout, info.stderr[-2000:]
    # the registry of a URL run lives in the local cache folder, keyed by the URL
    rows = Registry(tiny_cache / "saestore_runs.sqlite").list()
    assert any(r.path == url and r.status == "complete" for r in rows)
    if module_available("torch"):
        from saestore.torch import TokenDataset

        tokens = TokenDataset(url, layer_type="res", batch_size=16)
        assert tokens.n_rows == int(ref["valid_mask"].values.sum()) == sum(len(b) for b in tokens)


def module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.extract
@pytest.mark.parametrize("fault", ["create_array:3", "after_marker:2"], ids=["while-creating", "mid-run"])
def test_killed_on_s3_then_rerun_equals_a_local_run(s3, local_ref, tiny_cache, tmp_path, fault):
    """SIGKILL while creating the store (a URL has no atomic rename: the rerun removes the half-made
    store) or between doc-chunks; the lease is left behind, goes stale, and the rerun takes it over
    and finishes the run to the local run's bytes."""
    fs = s3["fs"]
    name = fault.split(":")[0]
    url = f"s3://runs/k/demo/tiny/{name}.zarr"
    ttl = {"SAESTORE_LEASE_TTL": "1"}
    killed = _extract("s3://runs/k", name, tmp_path, tiny_cache, fault, ttl)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert fs.exists(url + ".lock"), "a killed writer cannot release its lease"
    assert writer_state(url)[0] in ("live", "gone")
    time.sleep(1.2)
    assert writer_state(url)[0] == "gone"
    again = _extract("s3://runs/k", name, tmp_path, tiny_cache, None, ttl)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taking over the lease" in again.stderr
    got, want = _objects(fs, url), _local_files(local_ref)
    assert sorted(got) == sorted(want), (set(got) ^ set(want))
    assert [k for k in want if got[k] != want[k]] == []


def test_second_writer_is_refused_naming_the_holder(s3):
    url = "s3://runs/lease/one.zarr"
    with RunLock(url) as held:
        assert held.lease is not None and held.held
        with pytest.raises(RunLockedError, match=rf"being written by pid {os.getpid()} on host .*renewed"):
            RunLock(url).acquire()
        assert writer_state(url)[0] == "live"
    assert not s3["fs"].exists(url + ".lock")
    RunLock(url).acquire().release()  # free again


def test_lease_is_renewed_while_held_and_lost_when_taken_over(s3):
    fs = s3["fs"]
    url = "s3://runs/lease/renew.zarr"
    lease = S3Lease(fs, url.removeprefix("s3://") + ".lock", url, ttl_s=0.6)
    lease.acquire()
    first = lease.read()[0]["renewed_at"]
    time.sleep(0.5)
    assert lease.read()[0]["renewed_at"] > first, "the holder renews its lease every ttl/3"
    assert not lease.stale(lease.read()[0])
    # another process overwrites the lease behind its back (what a take-over after a partition does)
    fs.pipe_file(url.removeprefix("s3://") + ".lock", json.dumps({"pid": 1, "host": "elsewhere"}).encode())
    time.sleep(0.5)
    assert lease.lost
    lease.release()
    assert fs.exists(url + ".lock"), "a holder that lost the lease leaves the new holder's object alone"


def _contend(url: str, start: float, result: str, env: dict) -> None:
    os.environ.update(env)
    os.environ["SAESTORE_LEASE_TTL"] = "30"
    while time.time() < start:
        pass
    try:
        lock = RunLock(url).acquire()
    except RunLockedError:
        return
    t0 = time.time()
    time.sleep(3.0)  # longer than the contenders take to try: each of them meets the winner's fresh lease
    t1 = time.time()
    lock.release()
    Path(result).write_text(json.dumps([t0, t1]))


def test_stale_lease_race_has_one_winner(s3, tmp_path):
    """Six processes at once take over a lease its holder stopped renewing: one wins each round,
    never two at a time (If-Match on the stale ETag decides)."""
    import multiprocessing as mp

    fs = s3["fs"]
    ctx = mp.get_context("spawn")
    for r in range(2):
        url = f"s3://runs/race/run{r}.zarr"
        fs.pipe_file(url.removeprefix("s3://") + ".lock", json.dumps(
            {"host": "gone-host", "pid": 7, "started_at": "2026-01-01T00:00:00+00:00",
             "renewed_at": "2026-01-01T00:00:00+00:00", "ttl_s": 60}).encode())
        start = time.time() + 2.0
        ps = [ctx.Process(target=_contend, args=(url, start, str(tmp_path / f"r{r}.{i}.json"), s3["env"]))
              for i in range(6)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(120)
            assert p.exitcode == 0
        spans = sorted(json.loads(f.read_text()) for f in tmp_path.glob(f"r{r}.*.json"))
        assert len(spans) == 1, f"round {r}: {len(spans)} winners of one stale lease: {spans}"


def test_statistics_on_a_dask_cluster_read_the_run_from_s3(s3, tmp_path, capsys):
    """dask.distributed workers (2 processes) open the run from the S3 server, not from a local
    path, and give the threaded scheduler's numbers on the local copy; the stats CLI does the same
    with --scheduler."""
    distributed = pytest.importorskip("distributed")
    import pandas as pd

    import saestore
    import saestore.stats as st
    from saestore.stats import cli

    from tests.helpers.stats_run import write_run

    local = tmp_path / "run.zarr"
    write_run(local)
    url = "s3://runs/dist/run.zarr"
    s3["fs"].put(str(local), url.removeprefix("s3://"), recursive=True)

    def lazy(ds):
        return {"stats": st.feature_stats(ds, "res", by="author")[["count", "frequency", "mean", "max"]],
                "top": st.top_examples(ds, "mlp", feature=[3, 4, 7], k=3, window=2, by="author")}

    want = {k: v.compute(scheduler="threads") for k, v in lazy(saestore.open_run(str(local))).items()}
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        remote = saestore.open_run(url)
        got = dict(zip(want, client.gather(client.compute(list(lazy(remote).values()))), strict=True))
        for name in want:
            xr.testing.assert_identical(got[name], want[name])
        assert want["stats"]["count"].values.sum() > 0
        out = tmp_path / "freq.csv"
        assert cli.main([url, "--stat", "frequency", "--by", "author", "--layer_type", "res", "--out", str(out),
                         "--scheduler", client.scheduler.address]) == 0
    table = pd.read_csv(out)
    assert np.allclose(np.sort(table["frequency"].to_numpy()),
                       np.sort(want["stats"]["frequency"].values.ravel()), equal_nan=True)
