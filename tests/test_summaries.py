"""PROTOCOL.md §2.8: per-feature doc-chunk summaries, written with the data, checked by validate,
and read by the statistics instead of the SAE blocks whenever the selection is whole doc-chunks
(same numbers as the full scan); top examples pruned by the per-chunk max (same examples)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import saestore
import saestore.stats as st
from saestore import protocol, reader
from saestore.errors import IncompleteRunWarning
from saestore.nonzeros import SparseActs, summarize
from saestore.stats import _select
from saestore.validate import validate_run

from tests.helpers.stats_run import AUTHORS, CHUNK_DOCS, LAYER_TYPES, LAYERS, N_DOCS, N_FEAT, Reference, write_run

SUMMARY_VARS = [protocol.summary_name(lt) for lt in LAYER_TYPES]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    return write_run(tmp_path_factory.mktemp("summaries") / "run.zarr")


@pytest.fixture(scope="module")
def sp(ref) -> xr.Dataset:
    return saestore.open_run(ref.path)


def _numpy_summary(ref: Reference, lt: str) -> np.ndarray:
    """``(A, L, C, F, 4)`` from the dense reference at valid tokens."""
    x = ref.acts[lt] * ref.valid_ADT[:, None, :, :, None]
    A, L, D, _, F = x.shape
    C = -(-D // CHUNK_DOCS)
    out = np.zeros((A, L, C, F, 4))
    for c in range(C):
        blk = x[:, :, c * CHUNK_DOCS:(c + 1) * CHUNK_DOCS].astype(np.float64)
        out[:, :, c, :, 0] = (blk != 0).sum((2, 3))
        out[:, :, c, :, 1] = blk.sum((2, 3))
        out[:, :, c, :, 2] = blk.max((2, 3))
        out[:, :, c, :, 3] = (blk ** 2).sum((2, 3))
    return out


@pytest.mark.parametrize("storage_format", ["sparse", "dense"])
def test_writer_stores_the_summaries_of_every_doc_chunk(tmp_path, storage_format):
    ref = write_run(tmp_path / "run.zarr", storage_format=storage_format)
    group = zarr.open_group(ref.path, mode="r")
    assert list(group["summary"][...]) == list(protocol.SUMMARY_FIELDS) == ["count", "sum", "max", "sum_sq"]
    for lt in LAYER_TYPES:
        arr = group[protocol.summary_name(lt)]
        assert arr.metadata.dimension_names == protocol.SUMMARY_DIMS
        assert arr.chunks == (1, 1, 1, N_FEAT, 4)
        np.testing.assert_allclose(arr[...], _numpy_summary(ref, lt), rtol=1e-12)
    assert validate_run(ref.path).ok


def test_summarize_counts_sums_and_max_per_feature():
    """Negative values count; the max of a feature that never fired is 0 (PROTOCOL.md §2.8)."""
    acts = SparseActs(rows=np.array([0, 1, 3]), cols=np.array([1, 1, 0]),
                      values=np.array([1.0001, -2.0, 5.0], np.float32), shape=(2, 2, 3))
    out = summarize(acts)
    np.testing.assert_array_equal(out[:, 0], [1, 2, 0])
    np.testing.assert_allclose(out[1], [2, np.float64(np.float32(1.0001)) - 2.0, np.float32(1.0001),
                                        np.float64(np.float32(1.0001)) ** 2 + 4.0])
    assert out[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # max is 0 where count is 0


def test_validate_names_a_stale_summary_and_repair_clears_its_shard(tmp_path):
    ref = write_run(tmp_path / "run.zarr")
    group = zarr.open_group(ref.path, mode="r+")
    arr = group[protocol.summary_name("mlp")]
    block = arr[2, 1, 1]
    block[7, 0] += 1  # one feature's count off by one in author 'c', layer 5, doc-chunk 1
    arr[2, 1, 1] = block
    report = validate_run(ref.path)
    assert not report.ok
    problem, shard_problem = report.problems  # the shard summary no longer adds up either
    assert "mlp_summary" in problem.where and "doc-chunk 1" in problem.where and "1 feature(s)" in problem.message
    assert "mlp_shard_summary" in shard_problem.where and "shard 0" in shard_problem.where
    repaired = validate_run(ref.path, repair=True)
    assert repaired.repaired == [("c", 0), ("c", 1)]  # the whole shard (2 doc-chunks) is redone


def test_shard_summaries_combine_the_doc_chunk_summaries_and_validate_checks_them(tmp_path):
    """§2.8 (1.3): each shard summary is its doc-chunks' summaries combined; a stale one is named and
    its shard redone; statistics over whole shards read them (same numbers as the doc-chunk rows)."""
    from saestore.nonzeros import combine_summaries

    ref = write_run(tmp_path / "run.zarr")
    group = zarr.open_group(ref.path, mode="r+")
    per_chunk, per_shard = group[protocol.summary_name("res")], group[protocol.shard_summary_name("res")]
    assert per_shard.metadata.dimension_names == protocol.SHARD_SUMMARY_DIMS and per_shard.chunks == (1, 1, 1, N_FEAT, 4)
    k = 2  # doc-chunks per shard: shard_docs = 2 · chunk_docs in tests/helpers/stats_run.py
    for a in range(len(AUTHORS)):
        for s in range(per_shard.shape[2]):
            chunks = per_chunk[a, 0, s * k:(s + 1) * k]
            np.testing.assert_array_equal(per_shard[a, 0, s], combine_summaries(chunks))
    ds = saestore.open_run(ref.path)
    _assert_same(st.feature_stats(ds, by="author").compute(),
                 st.feature_stats(ds.drop_vars([protocol.shard_summary_name(lt) for lt in LAYER_TYPES]),
                                  by="author").compute())
    block = per_shard[1, 1, 0]
    block[3, 2] += 0.5  # one feature's max in author 'zoë', layer 5, shard 0
    per_shard[1, 1, 0] = block
    [problem] = validate_run(ref.path).problems
    assert "res_shard_summary" in problem.where and "'zoë'" in problem.where and "1 feature(s)" in problem.message
    assert validate_run(ref.path, repair=True).repaired[:1] == [("zoë", 0)]


def test_combine_summaries_takes_max_where_active_only():
    from saestore.nonzeros import combine_summaries

    parts = np.array([[[2, 1.0, -0.5, 0.5], [0, 0, 0, 0]], [[1, -3.0, -3.0, 9.0], [0, 0, 0, 0]]])
    np.testing.assert_array_equal(combine_summaries(parts), [[3, -2.0, -0.5, 9.5], [0, 0, 0, 0]])


def test_runs_without_summaries_still_validate_and_read(tmp_path):
    """A store written before §2.8 (the variables removed) is valid and every statistic scans."""
    ref = write_run(tmp_path / "run.zarr")
    path = ref.path
    import shutil
    from pathlib import Path

    for name in (*SUMMARY_VARS, "summary"):
        shutil.rmtree(Path(path) / name)
    zarr.consolidate_metadata(path)
    assert validate_run(path).ok, validate_run(path).format()
    ds = saestore.open_run(path)
    assert not set(SUMMARY_VARS) & set(ds.data_vars)
    sel = _select.make_selection(ds, "res")
    assert _select.summary_chunks(ds, sel, "res") is None
    freq = st.frequency(ds, "res", by="author").compute()
    x = ref.acts["res"] * ref.valid_ADT[:, None, :, :, None]
    np.testing.assert_allclose(freq.values, (x != 0).sum((2, 3)) / ref.valid_ADT.sum((1, 2))[:, None, None])


def _full_scan(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_vars([v for v in SUMMARY_VARS if v in ds.data_vars])


STATS = ("count", "n_valid", "frequency", "sum", "mean", "mean_active", "max")


def _assert_same(a: xr.Dataset, b: xr.Dataset) -> None:
    for name in STATS:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12, equal_nan=True, err_msg=name)


def _assert_same_examples(a: xr.Dataset, b: xr.Dataset) -> None:
    """Two top_examples results are the same: every variable, values and strings alike."""
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert (x == y).all(), name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hs.data())
def test_summary_path_equals_full_scan_on_random_whole_chunk_selections(sp, data):
    n_chunks = -(-max(N_DOCS) // CHUNK_DOCS)
    chunks = data.draw(hs.lists(hs.integers(0, n_chunks - 1), min_size=1, max_size=n_chunks, unique=True))
    docs = sorted(d for c in chunks for d in range(c * CHUNK_DOCS, min((c + 1) * CHUNK_DOCS, max(N_DOCS))))
    authors = data.draw(hs.lists(hs.sampled_from(AUTHORS), min_size=1, max_size=3, unique=True))
    features = data.draw(hs.none() | hs.lists(hs.integers(0, N_FEAT - 1), min_size=1, max_size=6, unique=True))
    layer = data.draw(hs.none() | hs.sampled_from(LAYERS))
    by = data.draw(hs.sampled_from([None, "author"]))
    lt = data.draw(hs.sampled_from([None, "res", "mlp"]))
    kw = dict(by=by, author=authors, doc=docs, feature=features, layer=layer)
    sel = _select.make_selection(sp, "res", author=authors, doc=docs, feature=features, layer=layer)
    assert _select.summary_chunks(sp, sel, "res") is not None
    _assert_same(st.feature_stats(sp, lt, **kw).compute(), st.feature_stats(_full_scan(sp), lt, **kw).compute())


@pytest.mark.parametrize("doc", [[0, 2], slice(1, 4), [4]], ids=["split-chunks", "offset", "half-edge-chunk"])
def test_selections_not_aligned_to_doc_chunks_fall_back_to_the_scan(sp, doc):
    sel = _select.make_selection(sp, "res", doc=doc)
    if doc == [4]:  # doc 4 is alone in its chunk (max_docs 5): a whole doc-chunk after all
        assert _select.summary_chunks(sp, sel, "res") is not None
    else:
        assert _select.summary_chunks(sp, sel, "res") is None
    _assert_same(st.feature_stats(sp, by="author", doc=doc).compute(),
                 st.feature_stats(_full_scan(sp), by="author", doc=doc).compute())


def test_a_dataset_cut_after_opening_falls_back(sp):
    """Cut along tok or doc, the summaries no longer describe the blocks: the scan runs."""
    for cut in (sp.isel(tok=slice(0, 4)), sp.isel(doc=slice(1, 5))):
        sel = _select.make_selection(cut, "res")
        assert _select.summary_chunks(cut, sel, "res") is None
        _assert_same(st.feature_stats(cut, "res").compute(), st.feature_stats(_full_scan(cut), "res").compute())


def test_summary_path_reads_no_sae_chunk(sp, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an SAE chunk was decoded")

    monkeypatch.setattr(reader, "read_sparse_chunk", refuse)
    out = st.frequency(sp, "res", by="author").compute()
    assert out.shape == (len(AUTHORS), len(LAYERS), N_FEAT)
    dead = st.dead_features(sp, "mlp").compute()
    assert bool(dead.sel(feature=[0, 1, 2]).all())
    spec = st.author_specificity(sp, "res").compute()
    assert spec.sizes["author"] == len(AUTHORS)


def test_an_unfinished_run_reads_its_unfinished_summaries_as_absent(tmp_path):
    ref = write_run(tmp_path / "run.zarr", authors=[0, 2], finalize=False)
    with pytest.warns(IncompleteRunWarning):
        ds = saestore.open_run(ref.path)
    assert float(ds["res_summary"].isel(author=1).sum()) == 0.0
    _assert_same(st.feature_stats(ds, by="author").compute(), st.feature_stats(_full_scan(ds), by="author").compute())


@pytest.mark.parametrize("by", [None, "author"])
@pytest.mark.parametrize("k,feature", [(3, None), (4, 6), (50, [3, 4, 5, 0])], ids=["all", "one", "more-than-fired"])
def test_pruned_top_examples_equal_the_full_scan(sp, by, k, feature):
    """k=50 exceeds some features' activations (feature 0 is dead): empty ranks match too."""
    pruned = st.top_examples(sp, k=k, window=2, by=by, feature=feature).compute()
    full = st.top_examples(_full_scan(sp), k=k, window=2, by=by, feature=feature).compute()
    _assert_same_examples(pruned, full)


def test_pruned_top_examples_decode_only_chunks_that_can_enter(sp, monkeypatch):
    """One feature, k=1: only the doc-chunk holding the feature's largest value is decoded (one per
    author with by='author'), of the run's 7 doc-chunks per layer; the window tokens and the text
    are read from that chunk's blocks alone."""
    calls = []

    def counting(real):
        def read(arr, coords, *args):
            calls.append(tuple(coords))
            return real(arr, coords, *args)
        return read

    for name in ("read_sparse_chunk", "read_chunk_acts"):  # as sparse.COO blocks, or straight from the bytes
        monkeypatch.setattr(reader, name, counting(getattr(reader, name)))
    out = st.top_examples(sp, "res", layer=2, feature=4, k=1, window=1).compute()
    assert len(calls) == 1
    full = st.top_examples(_full_scan(sp), "res", layer=2, feature=4, k=1, window=1).compute()
    assert float(out["value"].values[0]) == float(full["value"].values[0])
    calls.clear()
    st.top_examples(sp, "res", layer=2, feature=4, k=1, window=1, by="author").compute()
    fired = int((sp["res_summary"].sel(layer=2, feature=4, summary="count").sum("doc_chunk") > 0).sum())
    assert 1 <= len(calls) == fired <= len(AUTHORS)  # one chunk per author where the feature fired


def test_a_run_created_without_summaries_resumes_without_them(tmp_path):
    """A 1.2 run created before §2.8 reopens with today's layout (summaries on) and keeps its layout."""
    from dataclasses import replace

    from saestore.writer import RunWriter, create_run, read_layout

    from tests.helpers.stats_run import make_attrs, make_layout

    path = str(tmp_path / "run.zarr")
    old = replace(make_layout(), summaries=False)
    create_run(path, old, make_attrs(old))
    assert not set(SUMMARY_VARS) & set(zarr.open_group(path, mode="r").keys())
    create_run(path, make_layout(), make_attrs(make_layout()))  # resume: no ConfigMismatchError
    assert read_layout(zarr.open_group(path, mode="r")) == old
    assert RunWriter(path).layout.summaries is False


def test_zone_map_keeps_every_block_that_can_hold_a_top_k_value():
    """On random block maxima with ties and inactive (-inf) blocks: every block whose max reaches
    its feature's k-th largest block max is kept (a block below it for every feature cannot hold a
    top-k value, since k stored values are at or above it), and no inactive-only block is kept."""
    from saestore.stats.examples import zone_map_blocks

    rng = np.random.default_rng(3)
    for _ in range(200):
        n_b, n_f, k = int(rng.integers(1, 12)), int(rng.integers(1, 4)), int(rng.integers(1, 5))
        smax = rng.integers(0, 5, size=(n_b, n_f)).astype(np.float64)
        smax[rng.random((n_b, n_f)) < 0.3] = -np.inf
        kept = set(zone_map_blocks(smax, k).tolist())
        for f in range(n_f):
            # worst case for pruning: each block holds its max once and values just below it
            vals = sorted(((smax[b, f], b) for b in range(n_b) if np.isfinite(smax[b, f])), reverse=True)
            kth = vals[k - 1][0] if len(vals) >= k else -np.inf
            assert all(b in kept for v, b in vals if v >= kth), (smax, k, f)
        assert all(np.isfinite(smax[b]).any() for b in kept)


def test_validate_names_a_summary_array_that_breaks_the_layout(tmp_path):
    """A summary variable with the wrong dimension names is a layout problem, like any variable's."""
    import json
    from pathlib import Path

    ref = write_run(tmp_path / "run.zarr")
    meta_path = Path(ref.path) / "res_summary" / "zarr.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["dimension_names"] = ["author", "layer", "doc", "feature", "summary"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    report = validate_run(ref.path)
    assert [(p.kind, p.where) for p in report.problems] == [("layout", "res_summary")]
    assert "dimension_names" in report.problems[0].message


def _block_scan(ds: xr.Dataset, fn, *args, **kw):
    """``fn`` with every SAE block decoded as ``sparse.COO`` (the path for datasets changed after
    opening): the reference for the fused read-decode-reduce of the chunk bytes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "chunk_source", lambda x: None)
        return fn(ds, *args, **kw).compute()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hs.data())
def test_fused_scan_equals_the_block_scan(sp, data):
    """Without stored summaries, a whole-doc-chunk selection is reduced straight from the chunk bytes
    (``_select.scanned_summary_array``): the same statistics as scanning sparse.COO blocks, for any
    selection of features."""
    n_chunks = -(-max(N_DOCS) // CHUNK_DOCS)
    chunks = data.draw(hs.lists(hs.integers(0, n_chunks - 1), min_size=1, max_size=n_chunks, unique=True))
    docs = sorted(d for c in chunks for d in range(c * CHUNK_DOCS, min((c + 1) * CHUNK_DOCS, max(N_DOCS))))
    authors = data.draw(hs.lists(hs.sampled_from(AUTHORS), min_size=1, max_size=3, unique=True))
    features = data.draw(hs.none() | hs.lists(hs.integers(0, N_FEAT - 1), min_size=1, max_size=6, unique=True))
    kw = dict(by=data.draw(hs.sampled_from([None, "author"])), author=authors, doc=docs, feature=features,
              layer=data.draw(hs.none() | hs.sampled_from(LAYERS)))
    lt = data.draw(hs.sampled_from([None, "res", "mlp"]))
    scan = _full_scan(sp)
    _assert_same(st.feature_stats(scan, lt, **kw).compute(), _block_scan(scan, st.feature_stats, lt, **kw))


def test_fused_scan_builds_no_block(sp, monkeypatch):
    blocks = _block_scan(_full_scan(sp), st.feature_stats, by="author")

    def refuse(*a, **k):
        raise AssertionError("an SAE chunk was decoded into a sparse.COO block")

    monkeypatch.setattr(reader, "read_sparse_chunk", refuse)
    _assert_same(st.feature_stats(_full_scan(sp), by="author").compute(), blocks)


def test_fused_scan_of_an_unfinished_run_skips_unfinished_chunks(tmp_path):
    ref = write_run(tmp_path / "run.zarr", authors=[0, 2], finalize=False)
    with pytest.warns(IncompleteRunWarning):
        ds = _full_scan(saestore.open_run(ref.path))
    _assert_same(st.feature_stats(ds, by="author").compute(), _block_scan(ds, st.feature_stats, by="author"))
    assert int(st.feature_stats(ds, by="author")["count"].isel(author=1).sum()) == 0


@pytest.mark.parametrize("summaries", [True, False], ids=["pruned", "scan"])
@pytest.mark.parametrize("feature", [None, 6, [5, 3, 0]], ids=["all", "one", "list"])
def test_top_examples_from_the_chunk_bytes_equal_the_block_path(sp, summaries, feature):
    """Blocks read straight from the bytes with the selected features only (``_select.DirectBlocks``,
    valid masks from ``doc_length``) give the examples the sparse.COO blocks give."""
    ds = sp if summaries else _full_scan(sp)
    direct = st.top_examples(ds, k=3, window=2, feature=feature).compute()
    blocks = _block_scan(ds, st.top_examples, k=3, window=2, feature=feature)
    _assert_same_examples(direct, blocks)


def test_a_summary_block_of_every_feature_lives_only_in_the_task_that_reads_it(sp):
    """The zone map and partial selections read a few features of every summary block (16k × 4
    float64 per doc-chunk in a real run): the features are taken in the reading task itself, so no
    task's result is a block of every feature (dask may run every read before any take, which held
    the whole run's summaries at once), and the values are those of the stored array."""
    import dask

    sel = _select.make_selection(sp, "res", feature=[4, 1])
    summ, _ = _select.summary_array(sp, sel, "res", _select.summary_chunks(sp, sel, "res"))
    (opt,) = dask.optimize(summ)
    layers = {k[0] if isinstance(k, tuple) else k for k in dict(opt.__dask_graph__())}
    raw = sp["res_summary"].data.name
    assert not [n for n in layers if n.endswith(raw.split("-", 1)[-1]) and not n.startswith("original-")], layers
    np.testing.assert_array_equal(summ.compute(), sp["res_summary"].isel(feature=[4, 1]).values)
