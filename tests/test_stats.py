"""Every statistic of saestore.stats against a dense numpy reference, on a small synthetic run read
three ways: open_run (sparse.COO blocks), plain xr.open_zarr (dense numpy blocks of the same
store) and open_run on a dense-storage run."""

from __future__ import annotations

import numpy as np
import pytest
import sparse
import xarray as xr

import saestore
import saestore.stats as st

from tests.helpers.stats_run import AUTHORS, LAYER_TYPES, LAYERS, N_FEAT, N_TOK, Reference, write_run


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    return write_run(tmp_path_factory.mktemp("stats") / "run.zarr")


@pytest.fixture(scope="module")
def dense_store_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stats-dense") / "run.zarr"
    write_run(path, storage_format="dense")
    return str(path)


@pytest.fixture(scope="module", params=["open_run", "open_zarr", "dense_store"])
def ds(request, ref, dense_store_path) -> xr.Dataset:
    if request.param == "open_run":
        return saestore.open_run(ref.path)
    if request.param == "open_zarr":
        return xr.open_zarr(ref.path, chunks={})
    return saestore.open_run(dense_store_path)


@pytest.fixture(scope="module")
def sp(ref) -> xr.Dataset:
    """The sparse-block dataset only (for tests that need not run three times)."""
    return saestore.open_run(ref.path)


# --- reference helpers ----------------------------------------------------------------------------------


def sub(ref: Reference, lt: str, authors=None, layers=None, docs=None, features=None):
    """(acts_ALDTF, valid_ADT, author idx, doc idx) of a selection, dense."""
    a = np.arange(len(AUTHORS)) if authors is None else np.array([AUTHORS.index(x) for x in authors])
    li = np.arange(len(LAYERS)) if layers is None else np.array([LAYERS.index(x) for x in layers])
    d = np.arange(ref.valid_ADT.shape[1]) if docs is None else np.asarray(docs)
    f = np.arange(N_FEAT) if features is None else np.asarray(features)
    x = ref.acts[lt][a][:, li][:, :, d][..., f]
    v = ref.valid_ADT[a][:, d]
    return x, v, a, d


def ref_stats(x, v, pooled: bool) -> dict[str, np.ndarray]:
    vv = v[:, None, :, :, None]
    xv = np.where(vv, x, 0).astype(np.float64)
    count = (xv != 0).sum((2, 3))
    total = xv.sum((2, 3))
    vmax = np.where(vv, x, -np.inf).max((2, 3)).astype(np.float64)
    n_valid = v.sum((1, 2))
    if pooled:
        count, total, vmax, n_valid = count.sum(0), total.sum(0), vmax.max(0), n_valid.sum()
        nv = n_valid
    else:
        nv = n_valid[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "n_valid": n_valid, "sum": total, "max": vmax, "frequency": count / nv,
                "mean": total / nv, "mean_active": np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)}


def close(got: xr.DataArray, want: np.ndarray, **kw) -> None:
    np.testing.assert_allclose(np.asarray(got.values, dtype=np.float64), want, rtol=1e-9, atol=1e-12, **kw)


# --- feature statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["author", None])
def test_feature_stats_match_numpy(ds, ref, by):
    out = st.feature_stats(ds, "res", by=by)
    assert out["count"].chunks is not None  # lazy until computed
    out = out.compute()
    want = ref_stats(*sub(ref, "res")[:2], pooled=by is None)
    dims = ("author", "layer", "feature") if by else ("layer", "feature")
    assert out["count"].dims == dims
    assert out["count"].dtype == np.int64
    np.testing.assert_array_equal(out["count"].values, want["count"])
    np.testing.assert_array_equal(out["n_valid"].values, want["n_valid"])
    for name in ("sum", "frequency", "mean", "mean_active", "max"):
        close(out[name], want[name], err_msg=name)
    assert list(out["feature"].values) == list(range(N_FEAT))
    assert str(out["layer_type"].values) == "res"
    if by:
        assert list(out["author"].values) == list(AUTHORS)


def test_selection_authors_layer_docs_features(ds, ref):
    authors, docs, feats = ["c", "a/b"], [0, 2, 3], [4, 9, 3, 10]
    out = st.feature_stats(ds, "mlp", by="author", author=authors, layer=5, doc=docs, feature=feats).compute()
    x, v, _, _ = sub(ref, "mlp", authors, [5], docs, feats)
    want = ref_stats(x, v, pooled=False)
    assert out["count"].dims == ("author", "feature")  # the scalar layer is dropped
    assert int(out["layer"]) == 5
    assert list(out["author"].values) == authors and list(out["feature"].values) == feats
    np.testing.assert_array_equal(out["count"].values, want["count"][:, 0])
    close(out["max"], want["max"][:, 0])
    close(out["mean"], want["mean"][:, 0])
    sl = st.frequency(ds, "res", doc=slice(1, 4), feature=7).compute()
    x, v, _, _ = sub(ref, "res", docs=np.arange(1, 4), features=[7])
    close(sl, ref_stats(x, v, pooled=True)["frequency"][:, 0])
    assert sl.dims == ("layer",)


def test_all_layer_types_stack_along_layer_type(sp, ref):
    out = st.activation_count(sp, by="author").compute()
    assert out.dims == ("layer_type", "author", "layer", "feature")
    assert list(out["layer_type"].values) == list(LAYER_TYPES)
    for i, lt in enumerate(LAYER_TYPES):
        np.testing.assert_array_equal(out.values[i], ref_stats(*sub(ref, lt)[:2], pooled=False)["count"])


def test_wrappers_dead_dense(ds, ref):
    want = ref_stats(*sub(ref, "res")[:2], pooled=True)
    np.testing.assert_array_equal(st.dead_features(ds, "res").values, want["count"] == 0)
    np.testing.assert_array_equal(st.dense_features(ds, "res", threshold=0.3).values, want["frequency"] > 0.3)
    assert st.dead_features(ds, "res").values[:, :3].all()  # features 0-2 never fire
    assert st.dense_features(ds, "res", threshold=0.3).values[:, 3].all()
    close(st.activation_mean(ds, "res", over="active"), want["mean_active"])
    close(st.activation_sum(ds, "res"), want["sum"])
    close(st.activation_max(ds, "res"), want["max"])
    close(st.n_valid_tokens(ds, by="author"), ref.valid_ADT.sum((1, 2)))


def test_accessor_is_the_functions(ds):
    a = ds.sae.frequency(layer_type="res", by="author").compute()
    b = st.frequency(ds, "res", by="author").compute()
    xr.testing.assert_identical(a, b)
    assert "top_examples" in dir(ds.sae)
    assert "log-odds" in ds.sae.author_specificity.__doc__


def test_bad_selections_raise_typed_errors(sp):
    with pytest.raises(st.StatsError, match="author 'nobody' is not in this run"):
        st.frequency(sp, "res", author="nobody")
    with pytest.raises(st.StatsError, match="layer 7 is not in this run"):
        st.frequency(sp, "res", layer=7)
    with pytest.raises(st.StatsError, match="layer type 'att' is not in this run"):
        st.frequency(sp, "att")
    with pytest.raises(st.StatsError, match="feature 999"):
        st.frequency(sp, "res", feature=[1, 999])
    with pytest.raises(st.StatsError, match="by must be"):
        st.frequency(sp, "res", by="doc")
    with pytest.raises(st.StatsError, match="at least two authors"):
        st.author_specificity(sp, "res", author="c")


def test_sparse_blocks_are_never_densified(sp, monkeypatch):
    import dask

    def boom(*a, **k):
        raise AssertionError("a sparse block was densified")

    monkeypatch.setattr(sparse.COO, "todense", boom)
    monkeypatch.setattr(sparse.COO, "__array__", boom)
    with dask.config.set(scheduler="sync"):
        st.feature_stats(sp, "res", by="author").compute()
        st.histogram(sp, "res").compute()
        st.l0_histogram(sp, "res").compute()
        st.top_examples(sp, "res", feature=[3, 4], k=3).compute()
        st.doc_vectors(sp, "res").compute()
        st.cooccurrence(sp, "res", feature=4).compute()
        st.metric_by_activity(sp, "res").compute()
        st.top_tokens(sp, "res", feature=[4]).compute()


# --- histograms and quantiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["author", None])
def test_histogram_matches_numpy(ds, ref, by):
    edges = st.log_bins(1e-3, 1e4, per_decade=4)
    h = st.histogram(ds, "res", edges=edges, by=by).compute()
    x, v, _, _ = sub(ref, "res")
    xv = np.where(v[:, None, :, :, None], x, 0)
    nb = edges.size + 1
    want = np.zeros((*xv.shape[:2], N_FEAT, nb), np.int64)
    for a in range(xv.shape[0]):
        for li in range(xv.shape[1]):
            for f in range(N_FEAT):
                vals = xv[a, li, ..., f]
                vals = vals[vals != 0]
                want[a, li, f] = np.bincount(np.searchsorted(edges, vals, side="right"), minlength=nb)
    if by is None:
        want = want.sum(0)
    np.testing.assert_array_equal(h.values, want)
    assert h["bin_lower"].values[0] == -np.inf and h["bin_upper"].values[-1] == np.inf
    assert h.values[..., 0].sum() >= 1 and h.values[..., -1].sum() >= 1  # the planted 2e-4 and 3e4


@pytest.mark.parametrize("over", ["active", "valid"])
def test_quantiles_within_one_bin_of_exact(sp, ref, over):
    edges = st.log_bins(1e-3, 1e4, per_decade=8)
    qs = (0.1, 0.5, 0.9)
    got = st.quantiles(sp, "res", qs, over=over, edges=edges, by="author").compute()
    assert got.dims == ("author", "layer", "feature", "quantile")
    x, v, _, _ = sub(ref, "res")
    ratio = edges[1] / edges[0]
    checked = 0
    for a in range(x.shape[0]):
        for li in range(x.shape[1]):
            for f in range(N_FEAT):
                vals = x[a, li, ..., f][v[a]]
                if over == "active":
                    vals = vals[vals != 0]
                if vals.size == 0:
                    assert np.isnan(got.values[a, li, f]).all()
                    continue
                for qi, q in enumerate(qs):
                    exact = np.quantile(vals, q, method="inverted_cdf")
                    approx = got.values[a, li, f, qi]
                    if exact == 0:
                        assert approx == 0
                    elif edges[0] <= exact < edges[-1] and vals.size >= 5:
                        assert abs(np.log(approx / exact)) <= np.log(ratio) * 1.0001, (a, li, f, q, approx, exact)
                        checked += 1
    assert checked > 100


def test_quantiles_from_histogram_edge_cases():
    edges = np.array([1.0, 10.0, 100.0])
    counts = np.array([[0, 0, 4, 0], [0, 0, 0, 0], [2, 0, 0, 0]])
    q = st.quantiles_from_histogram(counts, edges, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(q[0], [10.0, np.sqrt(10 * 100), 100.0])
    assert np.isnan(q[1]).all()
    np.testing.assert_allclose(q[2], [0.0, 0.5, 1.0], atol=1e-8)  # below edges[0]: linear from 0
    qz = st.quantiles_from_histogram(counts[:1], edges, [0.25, 0.75], n_zero_N=np.array([4]))
    np.testing.assert_allclose(qz[0], [0.0, np.sqrt(10 * 100)])


# --- L0 -----------------------------------------------------------------------------------------------------


def test_l0_per_token_histogram_and_summary(ds, ref):
    x, v, _, _ = sub(ref, "mlp")
    want_tok = np.where(v[:, None], (np.where(v[:, None, :, :, None], x, 0) != 0).sum(-1), -1)
    tok = st.l0(ds, "mlp").compute()
    assert tok.dims == ("author", "layer", "doc", "tok") and tok.dtype == np.int32
    np.testing.assert_array_equal(tok.values, want_tok)
    h = st.l0_histogram(ds, "mlp", by="author").compute()
    assert h.sizes["l0"] == N_FEAT + 1
    for a in range(len(AUTHORS)):
        for li in range(len(LAYERS)):
            vals = want_tok[a, li][v[a]]
            np.testing.assert_array_equal(h.values[a, li], np.bincount(vals, minlength=N_FEAT + 1))
    s = st.l0_summary(ds, "mlp", q=(0.05, 0.5, 0.95)).compute()
    for li in range(len(LAYERS)):
        vals = want_tok[:, li][v].astype(np.float64)
        assert int(s["n_tokens"].values[li]) == vals.size
        np.testing.assert_allclose(s["mean"].values[li], vals.mean())
        np.testing.assert_allclose(s["std"].values[li], vals.std())
        assert s["min"].values[li] == vals.min() and s["max"].values[li] == vals.max()
        for q in (0.05, 0.5, 0.95):
            assert s[f"p{100 * q:g}"].values[li] == np.quantile(vals, q, method="inverted_cdf")


# --- examples and tokens ------------------------------------------------------------------------------------


def ref_top_examples(ref: Reference, lt: str, features, k: int, window: int, by: str | None):
    x, v, _, _ = sub(ref, lt)
    A, L, D, T, _ = x.shape
    groups = [[a] for a in range(A)] if by == "author" else [list(range(A))]
    out = []
    for g in groups:
        per_layer = []
        for li in range(L):
            per_f = []
            for f in features:
                cand = [(-float(x[a, li, d, t, f]), (a * D + d) * T + t, a, d, t)
                        for a in g for d in range(D) for t in range(T) if v[a, d, t] and x[a, li, d, t, f] != 0]
                per_f.append(sorted(cand)[:k])
            per_layer.append(per_f)
        out.append(per_layer)
    return out if by == "author" else out[0]


@pytest.mark.parametrize("by", ["author", None])
def test_top_examples_match_numpy(ds, ref, by):
    feats, k, w = [3, 4, 7, 0], 4, 2
    te = st.top_examples(ds, "res", feature=feats, k=k, window=w, by=by).compute()
    want = ref_top_examples(ref, "res", feats, k, w, by)
    x, v, _, _ = sub(ref, "res")
    cases = [((a, li), want[a][li]) for a in range(len(AUTHORS)) for li in range(len(LAYERS))] if by else \
        [((li,), want[li]) for li in range(len(LAYERS))]
    for lead, per_f in cases:
        for fi, cands in enumerate(per_f):
            f = feats[fi]
            row = te.isel(dict(zip(te["value"].dims[:-1], (*lead, fi), strict=True)))
            for r in range(k):
                if r >= len(cands):
                    assert np.isnan(row["value"].values[r]) and row["example_tok"].values[r] == -1
                    assert row["text"].values[r] == "" and (row["tokens"].values[r] == "").all()
                    continue
                negv, _, a, d, t = cands[r]
                assert row["value"].values[r] == pytest.approx(-negv, rel=1e-7)
                assert row["example_author"].values[r] == AUTHORS[a]
                assert (row["example_doc"].values[r], row["example_tok"].values[r]) == (d, t)
                assert row["example_doc_id"].values[r] == ref.doc_id_AD[a, d]
                assert row["text"].values[r] == ref.text_AD[a, d]
                li = lead[-1]
                for j, o in enumerate(range(-w, w + 1)):
                    tt = t + o
                    inside = 0 <= tt < N_TOK
                    assert row["tokens"].values[r, j] == (ref.token_ADT[a, d, tt] if inside else "")
                    wa = row["window_acts"].values[r, j]
                    if inside and v[a, d, tt]:
                        assert wa == pytest.approx(float(x[a, li, d, tt, f]), rel=1e-7)
                    else:
                        assert np.isnan(wa)
    assert te["tokens"].dims[-1] == "offset"


def test_top_examples_scalar_feature_and_doc_selection(sp, ref):
    te = st.top_examples(sp, "mlp", feature=5, k=2, window=1, author=["c"], doc=slice(1, 4), layer=2).compute()
    assert te["value"].dims == ("rank",)
    x = ref.acts["mlp"][2, 0, 1:4, :, 5] * ref.valid_ADT[2, 1:4]
    best = np.sort(x.ravel())[::-1][:2]
    np.testing.assert_allclose(te["value"].values, best, rtol=1e-7)
    d, t = np.unravel_index(np.argmax(x), x.shape)
    assert (te["example_doc"].values[0], te["example_tok"].values[0]) == (d + 1, t)


@pytest.mark.parametrize("by", ["author", None])
def test_top_tokens_match_numpy(ds, ref, by):
    feats, n, min_count = [3, 4, 9], 3, 2
    tt = st.top_tokens(ds, "res", feature=feats, k=n, min_count=min_count, by=by).compute()
    x, v, _, _ = sub(ref, "res")
    groups = [[a] for a in range(len(AUTHORS))] if by else [list(range(len(AUTHORS)))]
    for gi, g in enumerate(groups):
        ids = ref.token_id_ADT[g][v[g]]
        for li in range(len(LAYERS)):
            for fi, f in enumerate(feats):
                acts = x[g][:, li, ..., f][v[g]]
                rows = []
                for tid in np.unique(ids):
                    m = ids == tid
                    n_tok, n_act, tot = int(m.sum()), int((acts[m] != 0).sum()), float(acts[m].astype(np.float64).sum())
                    if n_act and n_tok >= min_count:
                        rows.append((-tot / n_tok, int(tid), tot, n_act, n_tok))
                rows.sort()
                got = tt.isel(author=gi, layer=li, feature=fi) if by else tt.isel(layer=li, feature=fi)
                for r in range(n):
                    if r >= len(rows):
                        assert got["token_id"].values[r] == -1
                        continue
                    negmean, tid, tot, n_act, n_tok = rows[r]
                    assert got["token_id"].values[r] == tid and got["token"].values[r] == f"w{tid}"
                    assert got["mean"].values[r] == pytest.approx(-negmean, rel=1e-9)
                    assert got["sum"].values[r] == pytest.approx(tot, rel=1e-9)
                    assert (got["n_active"].values[r], got["n_token"].values[r]) == (n_act, n_tok)
                    assert got["mean_active"].values[r] == pytest.approx(tot / n_act, rel=1e-9)


# --- documents, authors, co-occurrence, metrics -------------------------------------------------------------


def test_doc_vectors_sparse_and_match_numpy(ds, ref):
    out = st.doc_vectors(ds, "res", feature=[3, 4, 5, 20]).compute()
    x, v, _, _ = sub(ref, "res", features=[3, 4, 5, 20])
    vv = v[:, None, :, :, None]
    xv = np.where(vv, x, 0).astype(np.float64)
    length = v.sum(-1)[:, None, :, None]
    want = {"sum": xv.sum(3), "mean": np.where(length > 0, xv.sum(3) / np.maximum(length, 1), 0),
            "max": np.where(length > 0, np.where(vv, x, -np.inf).max(3), 0)}
    for name, w in want.items():
        assert isinstance(out[name].data, sparse.COO), name
        assert out[name].dims == ("author", "layer", "doc", "feature")
        np.testing.assert_allclose(out[name].data.todense(), w, rtol=1e-9, err_msg=name)


def test_author_specificity_formula_and_ranking(ds, ref):
    alpha = 0.5
    spec = st.author_specificity(ds, "res", alpha=alpha).compute()
    want = ref_stats(*sub(ref, "res")[:2], pooled=False)
    c, n = want["count"].astype(float), want["n_valid"].astype(float)[:, None, None]
    cr, nr = c.sum(0) - c, n.sum(0) - n
    lo = np.log((c + alpha) / (n - c + alpha)) - np.log((cr + alpha) / (nr - cr + alpha))
    var = 1 / (c + alpha) + 1 / (n - c + alpha) + 1 / (cr + alpha) + 1 / (nr - cr + alpha)
    close(spec["log_odds"], lo)
    close(spec["z"], lo / np.sqrt(var))
    top = st.top_author_features(ds, "res", k=3).compute()
    assert top["feature"].dims == ("author", "layer", "rank")
    ranked = np.argsort(-(lo / np.sqrt(var)), axis=-1, kind="stable")[..., :3]
    np.testing.assert_array_equal(top["feature"].values, ranked)
    assert top["feature"].values[0, 0, 0] == 4  # feature 4 is planted for author 0
    assert top["feature"].values[2, 0, 0] == 5  # feature 5 for author 2
    close(top["z"], np.take_along_axis(lo / np.sqrt(var), top["feature"].values, -1))


@pytest.mark.parametrize("by", ["author", None])
def test_cooccurrence_matches_numpy(ds, ref, by):
    out = st.cooccurrence(ds, "res", feature=[4, 3], by=by).compute()
    x, v, _, _ = sub(ref, "res")
    on = (np.where(v[:, None, :, :, None], x, 0) != 0)
    both = np.stack([(on & on[..., [q]]).sum((2, 3)) for q in (4, 3)], axis=-2)  # (A, L, Q, F)
    n_f = on.sum((2, 3))
    n_v = v.sum((1, 2))
    if by is None:
        both, n_f, n_v = both.sum(0), n_f.sum(0), n_v.sum()
    assert out["count"].dims[-2:] == ("query", "feature")
    np.testing.assert_array_equal(out["count"].values, both)
    np.testing.assert_array_equal(out["n_feature"].values, n_f)
    nq = n_f[..., [4, 3]]
    np.testing.assert_array_equal(out["n_query"].values, nq)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = both / nq[..., None]
        close(out["p_given_query"], p)
        close(out["jaccard"], both / (nq[..., None] + n_f[..., None, :] - both))
        nvb = n_v if by is None else n_v[:, None, None, None]
        base = n_f[..., None, :] / nvb
        close(out["lift"], np.where(base > 0, p / np.where(base > 0, base, 1), np.nan))
    single = st.cooccurrence(ds, "res", feature=4, others=[3, 4, 6]).compute()
    assert single["count"].dims == ("layer", "feature") and int(single["query"]) == 4
    np.testing.assert_array_equal(single["count"].values[:, 1], single["n_query"].values)


@pytest.mark.parametrize("by", ["author", None])
def test_metric_by_activity_matches_numpy(ds, ref, by):
    out = st.metric_by_activity(ds, "mlp", by=by).compute()
    x, v, a_idx, _ = sub(ref, "mlp")
    on = (np.where(v[:, None, :, :, None], x, 0) != 0)
    for m, arr in (("ce_loss", ref.ce_loss_ADT), ("entropy", ref.entropy_ADT)):
        mv = np.where(v, arr, 0).astype(np.float64)[:, None, :, :, None]
        s_act = (mv * on).sum((2, 3))
        n_act = on.sum((2, 3))
        tot = mv.sum((2, 3, 4))
        n_tot = v.sum((1, 2)).astype(float)[:, None]
        if by is None:
            s_act, n_act, tot, n_tot = s_act.sum(0), n_act.sum(0), tot.sum(0), n_tot.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            act = np.where(n_act > 0, s_act / n_act, np.nan)
            ina = (tot[..., None] - s_act) / (n_tot[..., None] - n_act)
        close(out[f"{m}_active"], act)
        close(out[f"{m}_inactive"], ina)
        close(out[f"{m}_diff"], act - ina)
    np.testing.assert_array_equal(out["n_active"].values, n_act)


# --- datasets opened other ways, and the CLI ----------------------------------------------------------------


@pytest.mark.parametrize("chunks", [None, "default"])
def test_open_zarr_without_dask_chunks_or_default_chunks(ref, chunks):
    ds = xr.open_zarr(ref.path) if chunks == "default" else xr.open_zarr(ref.path, chunks=None)
    got = st.feature_stats(ds, "res", by="author").compute()
    want = ref_stats(*sub(ref, "res")[:2], pooled=False)
    np.testing.assert_array_equal(got["count"].values, want["count"])
    close(got["max"], want["max"])


def test_open_run_accepts_a_file_url(ref):
    ds = saestore.open_run(f"file://{ref.path}")
    got = st.activation_count(ds, "res").compute()
    np.testing.assert_array_equal(got.values, ref_stats(*sub(ref, "res")[:2], pooled=True)["count"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".nc", ".zarr"])
def test_cli_writes_each_format(ref, tmp_path, suffix, capsys):
    import pandas as pd

    from saestore.stats import cli

    out = tmp_path / f"freq{suffix}"
    rc = cli.main([ref.path, "--stat", "frequency", "--by", "author", "--layer_type", "res", "--layer", "2",
                   "--out", str(out)])
    assert rc == 0 and "wrote frequency" in capsys.readouterr().out
    want = ref_stats(*sub(ref, "res", layers=[2])[:2], pooled=False)["frequency"][:, 0]  # (A, F)
    if suffix in (".csv", ".parquet"):
        df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
        got = df.set_index(["author", "feature"])["frequency"].unstack("feature").loc[list(AUTHORS)].to_numpy()
    else:
        got = (xr.open_dataset(out) if suffix == ".nc" else xr.open_zarr(out))["frequency"]
        got = got.squeeze().transpose("author", "feature").values
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_cli_top_examples_and_sparse_doc_vectors_to_tables(ref, tmp_path):
    import pandas as pd

    from saestore.stats import cli

    assert cli.main([ref.path, "--stat", "top_examples", "--layer_type", "res", "--feature", "4", "--k", "2",
                     "--window", "1", "--out", str(tmp_path / "top.parquet")]) == 0
    df = pd.read_parquet(tmp_path / "top.parquet")
    assert {"value", "example_author", "doc_id", "token", "context"} <= set(df.columns)
    assert "text" not in df.columns and "offset" not in df.columns
    assert cli.main([ref.path, "--stat", "doc_vectors", "--layer_type", "mlp", "--out", str(tmp_path / "dv.csv")]) == 0
    dv = pd.read_csv(tmp_path / "dv.csv")
    x = np.where(ref.valid_ADT[:, None, :, :, None], ref.acts["mlp"], 0).astype(np.float64).sum(3)
    assert len(dv) == np.count_nonzero(x)  # one row per nonzero (author, layer, doc, feature)
    np.testing.assert_allclose(np.sort(dv["sum"].to_numpy()), np.sort(x[x != 0]), rtol=1e-9)


def test_cli_errors_and_register(ref, tmp_path, capsys):
    import argparse

    from saestore.stats import cli

    assert cli.main([ref.path, "--stat", "frequency", "--author", "nobody", "--out", str(tmp_path / "x.csv")]) == 2
    assert "author 'nobody' is not in this run" in capsys.readouterr().err
    assert cli.main([ref.path, "--stat", "frequency", "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must end in one of" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="python -m saestore")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stats", ref.path, "--stat", "l0_summary", "--by", "author", "--out",
                              str(tmp_path / "l0.csv")])
    assert args.func(args) == 0
    assert (tmp_path / "l0.csv").read_text().startswith("layer_type,")


def test_cli_pooled_scalar_to_a_table(ref, tmp_path, capsys):
    """``--stat bits_per_byte`` pooled is one value per variable: a one-row table (csv, parquet)."""
    import pandas as pd

    from saestore.stats import cli

    want = st.bits_per_byte(saestore.open_run(ref.path), by=None).compute()
    assert not want.dims
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"bpb{suffix}"
        assert cli.main([ref.path, "--stat", "bits_per_byte", "--out", str(out)]) == 0, capsys.readouterr().err
        df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
        assert len(df) == 1 and set(want.data_vars) <= set(df.columns)
        for name in want.data_vars:
            np.testing.assert_allclose(df[name].to_numpy(), [float(want[name])], rtol=1e-12)


def test_cli_refuses_a_run_with_nothing_finished_and_warns_once_on_an_incomplete_one(tmp_path, capsys, caplog):
    """``stats`` on a run killed or failed before any doc-chunk finished: refused in one line (exit 2),
    nothing written; on an incomplete run one warning line says so and the statistic covers the
    finished doc-chunks only."""
    import logging

    from saestore.stats import cli
    from saestore.writer import finalize_run

    empty = tmp_path / "empty.zarr"
    write_run(empty, authors=[], finalize=False)
    finalize_run(str(empty), failed_authors=list(AUTHORS))
    for path, status in ((empty, "failed"), (tmp_path / "killed.zarr", "running")):
        if status == "running":
            write_run(path, authors=[], finalize=False)
        out = tmp_path / "x.csv"
        assert cli.main([str(path), "--stat", "top_author_features", "--layer_type", "res", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"has no finished doc-chunk (status {status}, 0 of " in err[0], err
        assert "nothing to compute" in err[0] and not out.exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the refusal is the one line
    partial = tmp_path / "partial.zarr"
    ref = write_run(partial, authors=[0], finalize=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saestore.stats.cli"):
        assert cli.main([str(partial), "--stat", "count", "--layer_type", "res", "--out",
                         str(tmp_path / "n.csv")]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "statistics of an incomplete run, over its finished doc-chunks only" in warned[0]
    assert "(status running)" in warned[0] and "\n" not in warned[0]
    import pandas as pd

    got = pd.read_csv(tmp_path / "n.csv").set_index(["layer", "feature"])["count"].unstack("feature").to_numpy()
    x, v, _, _ = sub(ref, "res", authors=[AUTHORS[0]])
    np.testing.assert_array_equal(got, ref_stats(x, v, pooled=True)["count"])


@pytest.mark.parametrize("full_text", [False, True])
def test_cli_top_examples_table_one_row_per_example(ref, tmp_path, full_text):
    """``--stat top_examples --out x.csv``: one row per (layer, feature, rank) example with its
    value, author, doc id, token and context string; the full document text only with --full_text."""
    import pandas as pd

    from saestore.stats import cli

    out = tmp_path / "top.csv"
    argv = [ref.path, "--stat", "top_examples", "--layer_type", "res", "--feature", "0", "4", "7", "--k", "3",
            "--window", "2", "--out", str(out)]
    assert cli.main(argv + (["--full_text"] if full_text else [])) == 0
    df = pd.read_csv(out, keep_default_na=False)
    te = st.top_examples(saestore.open_run(ref.path), "res", feature=[0, 4, 7], k=3, window=2).compute()
    n_examples = int(np.isfinite(te["value"].values).sum())
    assert len(df) == n_examples and 0 not in set(df["feature"])  # feature 0 is dead: no rows
    assert list(df.columns[:4]) == ["layer_type", "layer", "feature", "rank"]
    assert ("text" in df.columns) == full_text
    for row in df.itertuples():
        ex = te.sel(layer=row.layer, feature=row.feature, rank=row.rank)
        a, d, t = AUTHORS.index(row.example_author), int(ex["example_doc"]), int(ex["example_tok"])
        assert row.value == pytest.approx(float(ex["value"]), rel=1e-12)
        assert (row.doc_id, row.doc, row.tok) == (ref.doc_id_AD[a, d], d, t)
        assert row.token == ref.token_ADT[a, d, t]
        window = [ref.token_ADT[a, d, tt] for tt in range(max(t - 2, 0), min(t + 3, N_TOK))]
        assert row.context == "".join(window) and row.left_context + row.token + row.right_context == row.context
        if full_text:
            assert row.text == ref.text_AD[a, d]


def test_example_table_keeps_author_dimension(sp):
    from saestore.stats.examples import example_table

    te = st.top_examples(sp, "mlp", layer=2, feature=5, k=2, window=1, by="author").compute()
    df = example_table(te, text=True)
    assert list(df.columns[:5]) == ["layer_type", "author", "layer", "feature", "rank"]
    assert set(df["author"]) <= set(AUTHORS) and (df["author"] == df["example_author"]).all()
    assert len(df) == int(np.isfinite(te["value"].values).sum())
