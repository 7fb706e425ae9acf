"""The main statistics on a dask.distributed LocalCluster (2 worker processes) give the same
numbers as the local threaded scheduler; the CLI's --scheduler path works against it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import saestore
import saestore.stats as st
from saestore.stats import cli

from tests.helpers.stats_run import write_run

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def run_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stats-dist") / "run.zarr"
    write_run(path)
    return str(path)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


def _lazy(ds: xr.Dataset) -> dict[str, object]:
    return {
        "stats_author": st.feature_stats(ds, "res", by="author")[["count", "frequency", "mean", "max"]],
        "stats_pooled": st.feature_stats(ds, ["res", "mlp"], layer=[5])[["count", "frequency", "mean", "max"]],
        "top": st.top_examples(ds, "mlp", feature=[3, 4, 7], k=3, window=2, by="author"),
        "l0_hist": st.l0_histogram(ds, "res", by="author"),
        "l0": st.l0(ds, "mlp", doc=slice(1, 4)),
    }


def test_distributed_equals_threaded(run_path, client):
    ds = saestore.open_run(run_path)
    local = {k: v.compute(scheduler="threads") for k, v in _lazy(ds).items()}
    futures = client.compute(list(_lazy(ds).values()))
    remote = dict(zip(local, client.gather(futures), strict=True))
    for name in local:
        xr.testing.assert_identical(remote[name], local[name])
    assert local["stats_author"]["count"].values.sum() > 0
    assert np.isfinite(local["top"]["value"].values).any()


def test_cli_with_scheduler_address(run_path, client, tmp_path, capsys):
    out = tmp_path / "freq.csv"
    rc = cli.main([f"file://{run_path}", "--stat", "frequency", "--by", "author", "--layer_type", "res",
                   "--out", str(out), "--scheduler", client.scheduler.address])
    assert rc == 0
    assert "wrote frequency" in capsys.readouterr().out
    import pandas as pd

    df = pd.read_csv(out)
    want = st.frequency(saestore.open_run(run_path), "res", by="author").compute()
    got = df.set_index(["author", "layer", "feature"])["frequency"]
    for a in want["author"].values:
        np.testing.assert_allclose(got.loc[a].to_numpy(), want.sel(author=a).values.ravel())
