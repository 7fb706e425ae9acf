"""A selection as an array (``ds.sae.to_csr``, ``ds.sae.dense``), ``cooccurrence(top_k=)`` and the
``k=`` name of every top-k statistic."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

import saestore
import saestore.stats as st
from saestore.errors import StatsError
from saestore.stats import relations

from tests.helpers.stats_run import AUTHORS, LAYERS, write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparse_access") / "run.zarr"
    write_run(path)
    return path


def _stored(path, var: str) -> np.ndarray:
    """The variable decoded by zarr itself, chunk by chunk (no dask, no sparse)."""
    return zarr.open_array(str(path), path=var, mode="r")[...]


SELECTIONS = [
    {},
    {"author": ["c", "a/b"], "layer": 5, "doc": [3, 0], "feature": [9, 4, 3]},
    {"author": "zoë", "doc": slice(1, 3), "feature": 3},
    {"layer": [5, 2], "doc": 4},
]


def _expected(stored: np.ndarray, sel: dict) -> np.ndarray:
    a = [AUTHORS.index(x) for x in np.atleast_1d(sel.get("author", AUTHORS))]
    layer = [LAYERS.index(x) for x in np.atleast_1d(sel.get("layer", LAYERS))]
    doc = sel.get("doc")
    d = (np.arange(stored.shape[2]) if doc is None else np.arange(stored.shape[2])[doc] if isinstance(doc, slice)
         else np.sort(np.atleast_1d(doc)))
    f = np.atleast_1d(sel.get("feature", np.arange(stored.shape[-1])))
    return stored[np.ix_(a, layer, np.atleast_1d(d), np.arange(stored.shape[3]), f)]


@pytest.mark.parametrize("opener", ["open_run", "open_zarr"])
@pytest.mark.parametrize("sel", SELECTIONS, ids=lambda s: ",".join(s) or "all")
def test_to_csr_and_dense_equal_the_stored_chunks(run, opener, sel):
    ds = saestore.open_run(run) if opener == "open_run" else xr.open_zarr(run)
    stored = _stored(run, "res")
    want = _expected(stored, sel)
    assert want.any()
    matrix, rows = ds.sae.to_csr("res", return_rows=True, **sel)
    assert matrix.format == "csr" and matrix.shape == (int(np.prod(want.shape[:4])), want.shape[4])
    np.testing.assert_array_equal(matrix.toarray().reshape(want.shape), want)
    assert len(rows) == matrix.shape[0] and list(rows.columns) == ["author", "layer", "doc", "tok"]
    r = int(np.flatnonzero(np.diff(matrix.indptr))[-1])  # a row with a value: its coordinates find it
    row = rows.iloc[r]
    a, li = AUTHORS.index(row["author"]), LAYERS.index(row["layer"])
    f = np.atleast_1d(sel.get("feature", np.arange(stored.shape[-1])))
    np.testing.assert_array_equal(matrix[r].toarray()[0], stored[a, li, row["doc"], row["tok"], f])

    x = ds.sae.dense("res", **sel)
    assert isinstance(x.data, np.ndarray)
    squeezed = want
    if isinstance(sel.get("feature"), int):
        squeezed = squeezed[..., 0]
    if isinstance(sel.get("layer"), int):
        squeezed = squeezed[:, 0]
    np.testing.assert_array_equal(x.values, squeezed)
    assert list(x["author"].values) == [str(a) for a in np.atleast_1d(sel.get("author", AUTHORS))]
    x.to_dataframe()  # what the sparse-backed variable refuses


def test_sparse_variable_refuses_values_and_dense_is_the_way(run):
    ds = saestore.open_run(run)
    with pytest.raises(RuntimeError, match="Cannot convert a sparse array to dense"):
        ds["res"].isel(author=0).values  # noqa: B018
    assert ds.sae.dense("res", author="c", layer=2).to_dataframe().shape[0] == ds.sizes["doc"] * ds.sizes["tok"] * 40


def test_dense_refuses_above_max_bytes_in_one_line(run):
    ds = saestore.open_run(run)
    n = 3 * 2 * ds.sizes["doc"] * ds.sizes["tok"] * 40 * 4
    with pytest.raises(StatsError) as e:
        ds.sae.dense("res", max_bytes=n - 1)
    message = str(e.value)
    assert "\n" not in message and f"{n:,} bytes" in message and "max_bytes" in message and "to_csr" in message
    assert ds.sae.dense("res", max_bytes=n).shape == (3, 2, ds.sizes["doc"], ds.sizes["tok"], 40)
    with pytest.raises(StatsError, match="not an SAE variable"):
        ds.sae.to_csr("valid_mask")


# --- cooccurrence(top_k=) against the top-k of the full dense result ----------------------------------

def _reference_top_k(full: xr.Dataset, k: int, rank_by: str) -> tuple[np.ndarray, np.ndarray]:
    """Per query the k best partners of the dense result: ranked by ``rank_by``, ties by feature id,
    the query itself and features never active with it left out. Returns (feature ids, scores)."""
    score = full[rank_by].transpose(..., "query", "feature").values.astype(np.float64)
    count = full["count"].transpose(..., "query", "feature").values
    ids = full["feature"].values
    score = np.where(np.isnan(score) | (count == 0), -np.inf, score)
    score = np.where(full["query"].values[:, None] == ids[None, :], -np.inf, score)
    order = np.lexsort((np.broadcast_to(ids, score.shape), -score), axis=-1)[..., :k]
    best = np.take_along_axis(score, order, axis=-1)
    return np.where(best > -np.inf, ids[order], -1), np.where(best > -np.inf, best, np.nan)


@pytest.fixture(scope="module")
def demo(tiny_cache, tmp_path_factory):
    """A demo-size run: the built-in demo corpus through the tiny model, 1,024 features."""
    pytest.importorskip("torch")
    from saestore.extract.launch import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3", "--layer_types", "res",
                 "--sae_features_width", "1k", "--max_seq_len", "64", "--n_docs_per_author", "8", "--devices", "cpu",
                 "--quiet", "--output_dir", str(out), "--run_name", "demo"]) == 0
    return saestore.open_run(out / "demo" / "tiny" / "demo.zarr")


@pytest.mark.extract
@pytest.mark.parametrize("by, rank_by, others", [
    (None, "jaccard", None), ("author", "count", None), (None, "lift", list(range(0, 1024, 3))),
    ("author", "p_given_query", None),
])
def test_cooccurrence_top_k_is_the_top_k_of_the_dense_result(demo, monkeypatch, by, rank_by, others):
    queries = list(range(0, 1024, 5))
    monkeypatch.setattr(relations, "QUERY_BATCH_BYTES", 8 * 1024 * 37)  # several query batches
    top = st.cooccurrence(demo, "res", feature=queries, others=others, by=by, top_k=8, rank_by=rank_by).compute()
    full = st.cooccurrence(demo, "res", feature=queries, others=others, by=by).compute()
    assert top["feature"].dims == (*(["author"] if by else []), "layer", "query", "rank")
    ids, scores = _reference_top_k(full, 8, rank_by)
    np.testing.assert_array_equal(top["feature"].values, ids)
    filled = ids >= 0
    assert filled.any()
    np.testing.assert_allclose(top[rank_by].values[filled], scores[filled], rtol=1e-12)
    assert (top["count"].values[~filled] == 0).all() and np.isnan(top["jaccard"].values[~filled]).all()
    np.testing.assert_array_equal(top["n_query"].values, full["n_query"].values)
    for name in ("count", "n_feature", "jaccard", "lift"):  # each partner's values are the dense result's
        dense = full[name].broadcast_like(full["count"]).transpose(..., "query", "feature").values
        pos = np.searchsorted(full["feature"].values, np.where(filled, ids, full["feature"].values[0]))
        want = np.take_along_axis(dense, pos, axis=-1)
        np.testing.assert_allclose(np.where(filled, top[name].values, 0), np.where(filled, want, 0), rtol=1e-12)


def test_cooccurrence_top_k_bad_arguments(run):
    ds = saestore.open_run(run)
    with pytest.raises(StatsError, match="top_k must be a positive integer"):
        st.cooccurrence(ds, "res", feature=4, top_k=0)
    with pytest.raises(StatsError, match="rank_by must be one of jaccard, count"):
        st.cooccurrence(ds, "res", feature=4, top_k=3, rank_by="z")


def test_cooccurrence_top_k_on_the_small_run_leaves_the_query_out(run):
    ds = saestore.open_run(run)
    top = st.cooccurrence(ds, "res", feature=[4, 3], top_k=50, layer=2).compute()
    assert top.sizes["rank"] == 40  # at most every feature
    for q in (4, 3):
        partners = top["feature"].sel(query=q).values
        assert q not in partners and (partners[partners >= 0].size == np.unique(partners[partners >= 0]).size)


# --- k= everywhere, n= deprecated ---------------------------------------------------------------------

@pytest.mark.parametrize("fn, kw", [(st.top_tokens, {"feature": [3, 4]}), (st.top_author_features, {})])
def test_k_is_the_name_and_n_still_works_with_a_deprecation_warning(run, fn, kw):
    ds = saestore.open_run(run)
    new = fn(ds, "res", k=3, **kw).compute()
    with pytest.warns(DeprecationWarning, match=r"\(n=\.\.\.\) is deprecated: use k="):
        old = fn(ds, "res", n=3, **kw).compute()
    xr.testing.assert_identical(new, old)
    with pytest.raises(StatsError, match="give k= only"):
        fn(ds, "res", k=4, n=3, **kw)
    assert getattr(ds.sae, fn.__name__)("res", k=2, **kw).sizes["rank"] == 2


def test_stats_cli_cooccurrence_top_k(run, tmp_path):
    from saestore.__main__ import main

    out = tmp_path / "partners.csv"
    assert main(["stats", str(run), "--stat", "cooccurrence", "--layer_type", "res", "--layer", "2", "--feature", "4",
                 "3", "--top_k", "5", "--rank_by", "count", "--out", str(out)]) == 0
    import pandas as pd

    table = pd.read_csv(out)
    ds = saestore.open_run(run)
    want = st.cooccurrence(ds, "res", layer=2, feature=[4, 3], top_k=5, rank_by="count").compute()
    assert len(table) == 2 * 5 and sorted(table["feature"]) == sorted(want["feature"].values.ravel())
