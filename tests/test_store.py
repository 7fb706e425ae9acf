"""The run writer and reader: multi-process writes, fresh-process opens, byte identity, resume rules."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from saestore import protocol
from saestore.bench.workloads import synthetic_attrs
from saestore.errors import ConfigMismatchError, CorruptChunkError, ProtocolError, ProtocolVersionError, RunLockedError
from saestore.lock import RunLock
from saestore.reader import open_run
from saestore.writer import ChunkData, RunLayout, RunWriter, SparseActs, create_run, finalize_run, read_progress

N_TOK, N_FEAT = 12, 96
LAYERS = (1, 3)
LAYER_TYPES = ("res", "att")


def make_layout(storage_format: str = "sparse", value_dtype: str = "float32") -> RunLayout:
    storage = protocol.StorageInfo(format=storage_format, value_dtype=value_dtype, chunk_docs=3, shard_docs=6)
    return RunLayout(authors=("a/b", "..", "ünï\tcode", "d"), n_docs=(5, 2, 7, 3), n_tok=N_TOK,
                     layer_types=LAYER_TYPES, layers=LAYERS, n_features=N_FEAT, storage=storage)


def make_attrs(layout: RunLayout, config: dict | None = None) -> protocol.RunAttrs:
    return synthetic_attrs(layout, config or {"model": "synthetic", "seed": 0}, expected_l0=4.0, sae_path="/nowhere",
                           hook_layer=1)


def chunk_payload(layout: RunLayout, a: int, c: int) -> ChunkData:
    """Deterministic SAE-like data of one (author, doc-chunk), with ragged document lengths."""
    docs = layout.chunk_docs_range(a, c)
    rng = np.random.default_rng(1000 * a + c)
    n = len(docs)
    lengths = rng.integers(1, N_TOK + 1, size=n)
    valid = np.arange(N_TOK)[None, :] < lengths[:, None]
    acts = {}
    for lt in layout.layer_types:
        for layer in layout.layers:
            x = rng.exponential(1.0, size=(n, N_TOK, N_FEAT)).astype(np.float32)
            x *= (rng.random((n, N_TOK, N_FEAT)) < 0.08) * valid[..., None]
            acts[(lt, layer)] = SparseActs.from_dense(x) if layout.storage.format == "sparse" else x
    tok_ids = np.where(valid, rng.integers(0, 500, size=(n, N_TOK)), -1).astype(np.int32)
    tokens = np.where(valid, np.char.add("t", tok_ids.astype(str)), "").astype(object)
    ce = np.where(valid, rng.random((n, N_TOK)), np.nan).astype(np.float32)
    return ChunkData(token_id_DT=tok_ids, token_DT=tokens, valid_DT=valid, ce_loss_DT=ce, entropy_DT=ce * 2,
                     text_D=[f"doc {d} of {a} é" for d in docs], doc_id_D=np.array(list(docs)) + 100 * a,
                     doc_length_D=lengths.astype(np.int32), n_truncated_D=np.zeros(n, np.int32), acts=acts)


def dense_acts(acts: SparseActs | np.ndarray, n_docs: int) -> np.ndarray:
    if isinstance(acts, np.ndarray):
        return acts
    out = np.zeros((n_docs, N_TOK, N_FEAT), np.float32)
    out[acts.doc, acts.tok, acts.feature] = acts.values
    return out


def write_authors(path: str, author_indices: list[int]) -> None:
    writer = RunWriter(path)
    for a in author_indices:
        for c in range(writer.layout.n_chunks(a)):
            writer.write_chunk(a, c, chunk_payload(writer.layout, a, c))


def expected_dataset(layout: RunLayout) -> dict[str, np.ndarray]:
    A, D = len(layout.authors), layout.max_docs
    out = {lt: np.zeros((A, len(layout.layers), D, N_TOK, N_FEAT), np.float32) for lt in layout.layer_types}
    out["valid_mask"] = np.zeros((A, D, N_TOK), bool)
    out["token_id"] = np.full((A, D, N_TOK), -1, np.int32)
    out["ce_loss"] = np.full((A, D, N_TOK), np.nan, np.float32)
    out["text"] = np.full((A, D), "", dtype=object)
    out["doc_id"] = np.full((A, D), -1, np.int64)
    for a in range(A):
        for c in range(layout.n_chunks(a)):
            r = layout.chunk_docs_range(a, c)
            p = chunk_payload(layout, a, c)
            for (lt, layer), acts in p.acts.items():
                out[lt][a, layout.layers.index(layer), r.start:r.stop] = dense_acts(acts, len(r))
            out["valid_mask"][a, r.start:r.stop] = p.valid_DT
            out["token_id"][a, r.start:r.stop] = p.token_id_DT
            out["ce_loss"][a, r.start:r.stop] = p.ce_loss_DT
            out["text"][a, r.start:r.stop] = p.text_D
            out["doc_id"][a, r.start:r.stop] = p.doc_id_D
    return out


def _check(ds: xr.Dataset, expected: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        got = ds[name].values
        if want.dtype == object:
            assert [str(x) for x in got.ravel()] == [str(x) for x in want.ravel()], name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module", params=["sparse", "dense"])
def written_run(request, tmp_path_factory) -> tuple[str, RunLayout]:
    """A run written by two worker processes at once (authors dealt round-robin)."""
    layout = make_layout(request.param)
    path = str(tmp_path_factory.mktemp(f"run-{request.param}") / "run.zarr")
    create_run(path, layout, make_attrs(layout))
    ctx = mp.get_context("spawn")
    world = 2
    procs = [ctx.Process(target=write_authors, args=(path, list(range(len(layout.authors)))[r::world]))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert finalize_run(path).status == "complete"
    return path, layout


def test_multiprocess_run_reads_back_with_plain_xarray_and_open_run(written_run):
    path, layout = written_run
    expected = expected_dataset(layout)
    ds = xr.open_zarr(path)
    assert list(ds["author"].values) == list(layout.authors)
    _check(ds, expected)
    sp = open_run(path)
    _check(sp.drop_vars(list(layout.layer_types)), {k: v for k, v in expected.items() if k not in layout.layer_types})
    for lt in layout.layer_types:
        if layout.storage.format == "sparse":
            assert "sparse" in type(sp[lt].data._meta).__module__
            got = sp[lt].data.compute().todense()
        else:
            got = sp[lt].values
        np.testing.assert_array_equal(got, expected[lt])
    assert (read_progress(path)[..., 0].sum(axis=1) == [layout.n_chunks(a) for a in range(4)]).all()


def test_fresh_process_opens_without_importing_saestore(written_run):
    path, layout = written_run
    code = (
        "import sys, json, xarray as xr, numpy as np\n"
        f"ds = xr.open_zarr({path!r})\n"
        "out = {lt: float(ds[lt].sum().values) for lt in " + repr(list(layout.layer_types)) + "}\n"
        "out['imported'] = 'saestore' in sys.modules\n"
        "out['attrs'] = ds.attrs['saestore']['status']\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = expected_dataset(layout)
    assert out["attrs"] == "complete"
    for lt in layout.layer_types:
        assert out[lt] == pytest.approx(float(expected[lt].sum(dtype=np.float64)), rel=1e-5)
    if layout.storage.format == "sparse":
        # decoding needed the codec, found through the zarr.codecs entry point: saestore got imported
        # lazily by zarr, never by the user's code
        meta = json.loads((Path(path) / "res" / "zarr.json").read_text())
        assert meta["codecs"][0]["name"] == "sharding_indexed"
        inner = meta["codecs"][0]["configuration"]["codecs"]
        assert inner[0]["name"] == "saestore.sparse_coo"
        protocol.validate_json(inner[0], "sparse_coo_codec")


def test_sparse_writer_bytes_equal_zarr_pipeline(tmp_path):
    layout = make_layout("sparse", "bfloat16")
    path = str(tmp_path / "run.zarr")
    create_run(path, layout, make_attrs(layout))
    write_authors(path, [0])
    group = zarr.open_group(path, mode="r+")
    res = group["res"]
    assert res.shards is not None and res.shards[2] > res.chunks[2]  # several doc-chunks per shard
    twin = group.create_array("twin", shape=res.shape, chunks=res.chunks, shards=res.shards, dtype="float32",
                              fill_value=0.0, serializer=res.serializer, compressors=res.compressors,
                              dimension_names=list(protocol.SAE_DIMS))
    for layer in layout.layers:  # zarr's own sharding pipeline, one whole shard per layer
        parts = [dense_acts(chunk_payload(layout, 0, c).acts[("res", layer)], len(layout.chunk_docs_range(0, c)))
                 for c in range(layout.n_chunks(0))]
        twin[0, layout.layers.index(layer), : layout.n_docs[0]] = np.concatenate(parts)
    keys = sorted(p.name for p in (Path(path) / "res" / "c").rglob("*") if p.is_file())
    assert keys
    n = 0
    for k in (Path(path) / "res").rglob("*"):
        if k.is_file() and k.name != "zarr.json":
            twin_file = Path(path) / "twin" / k.relative_to(Path(path) / "res")
            assert twin_file.read_bytes() == k.read_bytes()
            n += 1
    assert n == sum(1 for k in (Path(path) / "twin").rglob("*") if k.is_file() and k.name != "zarr.json")


def test_every_sparse_variable_names_the_codec_and_fill_zero(written_run):
    path, layout = written_run
    for lt in layout.layer_types:
        meta = json.loads((Path(path) / lt / "zarr.json").read_text())
        assert meta["fill_value"] == 0.0
        assert meta["dimension_names"] == list(protocol.SAE_DIMS)
        assert [c["name"] for c in meta["codecs"]] == ["sharding_indexed"]
        names = [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]
        if layout.storage.format == "sparse":
            assert names == ["saestore.sparse_coo", "zstd", "crc32c"]
        else:
            assert names == ["bytes", "zstd", "crc32c"]


def test_resume_same_config_and_refuse_different_config(tmp_path):
    layout = make_layout()
    path = str(tmp_path / "run.zarr")
    create_run(path, layout, make_attrs(layout))
    write_authors(path, [1])
    finalize_run(path)
    assert protocol.read_attrs(dict(zarr.open_group(path).attrs)).failed_authors == ["a/b", "d", "ünï\tcode"]
    attrs = create_run(path, layout, make_attrs(layout))  # same config: resume, markers kept
    assert attrs.status == "running"
    assert RunWriter(path).done_chunks(1) == {0}
    with pytest.raises(ConfigMismatchError, match="differs in: seed"):
        create_run(path, layout, make_attrs(layout, {"model": "synthetic", "seed": 1}))
    assert RunWriter(path).done_chunks(1) == {0}  # nothing lost
    create_run(path, layout, make_attrs(layout, {"model": "synthetic", "seed": 1}), mode="overwrite")
    assert RunWriter(path).done_chunks(1) == set()


def test_protocol_version_and_layout_checks(tmp_path, written_run):
    path, _ = written_run
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["foo"] = 1
    with pytest.raises(ProtocolError, match="not a saestore run"):
        open_run(str(other))
    newer = tmp_path / "newer.zarr"
    g = zarr.open_group(str(newer), mode="w")
    data = json.loads(json.dumps(zarr.open_group(path).attrs["saestore"]))
    data["protocol_version"] = "2.0"
    g.attrs["saestore"] = data
    zarr.consolidate_metadata(str(newer))
    with pytest.raises(ProtocolVersionError, match="protocol 2.0"):
        open_run(str(newer))
    data["protocol_version"] = "1.7"
    data["something_new"] = {"x": 1}
    with pytest.warns(UserWarning, match="newer"):
        attrs = protocol.read_attrs({"saestore": data})
    assert attrs.protocol_version == "1.7"


def test_corrupt_sparse_chunk_is_named(tmp_path):
    layout = make_layout()
    path = str(tmp_path / "run.zarr")
    create_run(path, layout, make_attrs(layout))
    write_authors(path, [0])
    chunk = Path(path) / "res" / "c" / "0" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())  # the shard of doc-chunks 0, 1, …; its first inner chunk is doc-chunk 0
    data[8] ^= 0x10
    chunk.write_bytes(bytes(data))
    ds = open_run(path)
    with pytest.raises(CorruptChunkError, match=r"res\[author='a/b', layer=3, doc-chunk 0\]"):
        ds["res"].isel(author=0, layer=1).data.compute()


def test_lock_refuses_second_writer_and_takes_over_stale(tmp_path):
    run = tmp_path / "run.zarr"
    with RunLock(run):
        with pytest.raises(RunLockedError, match=r"pid \d+ on host"):
            RunLock(run).acquire()
    assert not Path(str(run) + ".lock").exists()
    Path(str(run) + ".lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 2**22 + 7,
                                                    "started_at": "2026-01-01T00:00:00+00:00"}))
    lock = RunLock(run).acquire()
    assert lock.holder()["pid"] == __import__("os").getpid()
    lock.release()


def test_layout_rejects_bad_input():
    storage = protocol.StorageInfo(format="sparse", value_dtype="float32", chunk_docs=2)
    base = dict(authors=("a",), n_docs=(1,), n_tok=4, layer_types=("res",), layers=(0,), n_features=8, storage=storage)
    RunLayout(**base)
    for bad in [dict(authors=()), dict(authors=("a", "a"), n_docs=(1, 1)), dict(n_docs=(0,)),
                dict(layer_types=("foo",)), dict(layers=(1, 1)), dict(n_tok=0)]:
        with pytest.raises(Exception, match=".") as e:
            RunLayout(**{**base, **bad})
        assert "Saestore" in type(e.value).__mro__[1].__name__ or e.type.__name__ == "SaestoreError"


def test_dense_bfloat16_is_refused(tmp_path):
    layout = make_layout("dense", "bfloat16")
    with pytest.raises(Exception, match="bfloat16 values need --storage_format sparse"):
        create_run(str(tmp_path / "r.zarr"), layout, make_attrs(layout))


def test_attrs_example_roundtrip():
    layout = make_layout()
    attrs = make_attrs(layout)
    assert protocol.RunAttrs.from_json(attrs.to_json()) == attrs
    with pytest.raises(ProtocolError, match="config_hash"):
        protocol.RunAttrs.from_json({**attrs.to_json(), "config_hash": "md5:x"})
    assert replace(attrs, status="complete").to_json()["status"] == "complete"


def test_open_run_warns_in_one_line_on_an_incomplete_run(tmp_path):
    """PROTOCOL.md §7.1: a running, interrupted or failed run is read, with one warning saying how much is done."""
    import warnings

    from saestore.errors import IncompleteRunWarning

    layout = make_layout()
    path = str(tmp_path / "run.zarr")
    create_run(path, layout, make_attrs(layout))
    write_authors(path, [1])
    with pytest.warns(IncompleteRunWarning, match=r"being written or its writer was killed \(status running\): 1 of 7 "
                                                  r"doc-chunks are done.*Rerun the extraction"):
        open_run(path)
    finalize_run(path, interrupted=True)
    with pytest.warns(IncompleteRunWarning, match=r"was interrupted \(SIGINT or SIGTERM\) before it was finished "
                                                  r"\(status interrupted\): 1 of 7 doc-chunks are done"):
        open_run(path)
    finalize_run(path)
    with pytest.warns(IncompleteRunWarning, match=r"authors unfinished: 'a/b', 'd', 'ünï\\tcode'"):
        open_run(path)
    write_authors(path, [0, 2, 3])
    finalize_run(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteRunWarning)
        open_run(path)


def test_a_run_being_written_reads_only_finished_doc_chunks_and_validates_as_incomplete(tmp_path):
    """#16: a live reader sees finished doc-chunks only, never half of one; validate says how far the run is."""
    from saestore.validate import validate_run

    layout = make_layout()  # n_docs (5, 2, 7, 3), chunk_docs 3, shard_docs 6
    path = str(tmp_path / "run.zarr")
    create_run(path, layout, make_attrs(layout))
    write_authors(path, [1])
    writer = RunWriter(path)
    for c in (0, 1):  # author 2's first shard: doc-chunks 0 and 1 (documents 0-5)
        writer.write_chunk(2, c, chunk_payload(layout, 2, c))
    # a writer caught between payloads: author 2's doc-chunk 2 (document 6) has activations, no marker yet
    stray = zarr.open_array(path, path="res", mode="r+")
    stray[2, 0, 6, :, :] = 5.0
    expected = expected_dataset(layout)
    done = np.zeros((4, layout.max_docs), bool)
    done[1, :] = done[3, 3:] = done[0, 6:] = True  # author 1 finished; no document past an author's doc-chunks
    done[2, :6] = True
    with pytest.warns(UserWarning, match=r"3 of 7 doc-chunks are done; the others read as absent"):
        ds = open_run(path)
    np.testing.assert_array_equal(ds["done"].values, done)
    keep = done[:, :, None]
    for name in ("valid_mask", "token_id", "ce_loss"):
        fill = {"valid_mask": False, "token_id": -1, "ce_loss": np.nan}[name]
        np.testing.assert_array_equal(ds[name].values, np.where(keep, expected[name], fill), err_msg=name)
    assert [str(t) for t in ds["text"].values[2]] == [*map(str, expected["text"][2][:6]), ""]
    for lt in LAYER_TYPES:
        np.testing.assert_array_equal(ds[lt].data.compute().todense(), expected[lt] * done[:, None, :, None, None],
                                      err_msg=lt)
    assert ds["res"].isel(author=2, doc=6).data.compute().nnz == 0  # the half-written doc-chunk reads as absent
    with pytest.warns(UserWarning, match=r"the others read as stored, possibly partial"):
        raw = open_run(path, only_done=False)
    assert raw["res"].isel(author=2, layer=0, doc=6).data.compute().todense().sum() == 5.0 * N_TOK * N_FEAT
    report = validate_run(path)  # the stray payload is in an unfinished doc-chunk: not checked, not a problem
    assert report.ok and report.incomplete and (report.n_done, report.n_doc_chunks) == (3, 7), report.format()
    assert "incomplete: 3 of 7 doc-chunks done (status running); only finished doc-chunks" in report.format()
    assert report.format().splitlines()[-1].startswith("INCOMPLETE")
    with RunLock(path):  # a live writer is named
        assert "being written by pid" in validate_run(path).format()
    write_authors(path, [0, 2, 3])
    finalize_run(path)
    ds = open_run(path)
    assert bool(ds["done"].all())
    report = validate_run(path)
    assert report.ok and not report.incomplete and report.format().endswith("OK")
