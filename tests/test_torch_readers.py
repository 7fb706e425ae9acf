"""saestore.torch: ordered, shuffled and pooled readers against the dense arrays of xr.open_zarr;
sharding over DataLoader workers × DDP ranks; the author probe on a tiny-model run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.needs import module_needs

module_needs("torch")

import torch
import xarray as xr
from torch.utils.data import DataLoader

from saestore import protocol
from saestore.bench.workloads import synthetic_attrs
from saestore.torch import DocumentDataset, ShuffledTokenDataset, SparseBatch, TokenDataset, TorchReaderError
from saestore.writer import ChunkData, RunLayout, RunWriter, SparseActs, create_run, finalize_run

N_TOK, N_FEAT, CHUNK_DOCS = 12, 64, 3
AUTHORS = ("zeta", "a/b", "ünï", "d")  # deliberately unsorted: the run keeps the writer's order
N_DOCS = (7, 2, 9, 4)
LAYERS = (1, 3)
LAYER_TYPES = ("res", "att")
ROOT = Path(__file__).resolve().parents[1]


def _attrs(layout: RunLayout) -> protocol.RunAttrs:
    return synthetic_attrs(layout, {"model": "synthetic", "storage": layout.storage.format}, expected_l0=4.0,
                           sae_path="/nowhere", hook_layer=1)


def _payload(layout: RunLayout, a: int, c: int) -> ChunkData:
    """Ragged documents (one of them empty), ~15% active features, some negative values."""
    docs = layout.chunk_docs_range(a, c)
    rng = np.random.default_rng(100 * a + c)
    n = len(docs)
    lengths = rng.integers(1, N_TOK + 1, size=n)
    if (a, c) == (2, 1):
        lengths[1] = 0  # an existing document without tokens
    valid = np.arange(N_TOK)[None, :] < lengths[:, None]
    acts = {}
    for lt in layout.layer_types:
        for layer in layout.layers:
            x = rng.exponential(1.0, size=(n, N_TOK, N_FEAT)).astype(np.float32)
            x *= np.where(rng.random(x.shape) < 0.1, -1, 1).astype(np.float32)
            x *= (rng.random(x.shape) < 0.15) * valid[..., None]
            acts[(lt, layer)] = SparseActs.from_dense(x) if layout.storage.format == "sparse" else x
    tok_ids = np.where(valid, rng.integers(0, 500, size=(n, N_TOK)), -1).astype(np.int32)
    ce = np.where(valid, rng.random((n, N_TOK)), np.nan).astype(np.float32)
    return ChunkData(token_id_DT=tok_ids, token_DT=np.where(valid, "t", "").astype(object), valid_DT=valid,
                     ce_loss_DT=ce, entropy_DT=ce + 1, text_D=[f"doc {d}" for d in docs],
                     doc_id_D=np.array(list(docs)), doc_length_D=lengths.astype(np.int32),
                     n_truncated_D=np.zeros(n, np.int32), acts=acts)


@pytest.fixture(scope="module", params=["sparse", "dense"])
def run(request, tmp_path_factory) -> dict:
    """A synthetic run (sparse or dense format) and its dense arrays read back with xr.open_zarr."""
    storage = protocol.StorageInfo(format=request.param, value_dtype="float32", chunk_docs=CHUNK_DOCS)
    layout = RunLayout(authors=AUTHORS, n_docs=N_DOCS, n_tok=N_TOK, layer_types=LAYER_TYPES, layers=LAYERS,
                       n_features=N_FEAT, storage=storage)
    path = str(tmp_path_factory.mktemp("torch") / f"{request.param}.zarr")
    create_run(path, layout, _attrs(layout))
    writer = RunWriter(path)
    for a in range(len(AUTHORS)):
        for c in range(layout.n_chunks(a)):
            writer.write_chunk(a, c, _payload(layout, a, c))
    finalize_run(path)
    ds = xr.open_zarr(path)
    ref = {name: ds[name].values for name in [*LAYER_TYPES, "valid_mask", "token_id", "ce_loss", "entropy"]}
    return {"path": path, **ref}


def _expected_tokens(run: dict, layer_types, layers, authors=None, docs=None) -> dict:
    """Rows of the selection in order (author as given, doc, tok), from the dense arrays."""
    a_idx = [AUTHORS.index(x) for x in authors] if authors else list(range(len(AUTHORS)))
    l_idx = [LAYERS.index(x) for x in layers]
    rows = {k: [] for k in ("author", "doc", "tok", "x", "token_id", "ce_loss", "entropy")}
    for pos, a in enumerate(a_idx):
        for d in sorted(docs) if docs is not None else range(run["valid_mask"].shape[1]):
            for t in np.flatnonzero(run["valid_mask"][a, d]):
                rows["author"].append(pos)
                rows["doc"].append(d)
                rows["tok"].append(t)
                rows["x"].append(np.concatenate([run[lt][a, li, d, t] for lt in layer_types for li in l_idx]))
                for k in ("token_id", "ce_loss", "entropy"):
                    rows[k].append(run[k][a, d, t])
    return {k: np.asarray(v) for k, v in rows.items()}


def _collect(batches) -> dict:
    batches = list(batches)
    out = {k: np.concatenate([getattr(b, k).numpy() for b in batches])
           for k in ("author", "doc", "tok", "token_id", "ce_loss", "entropy", "n_tokens")
           if getattr(batches[0], k) is not None}
    out["x"] = np.concatenate([b.to_dense().numpy() for b in batches])
    out["sizes"] = [len(b) for b in batches]
    return out


def _keys(got: dict) -> list[tuple[int, int, int]]:
    return list(zip(got["author"].tolist(), got["doc"].tolist(), got["tok"].tolist(), strict=True))


@pytest.mark.parametrize("sel", [
    {},
    {"layer_type": "att", "layer": 3, "author": ["d", "zeta"], "doc": [0, 2, 4, 6]},
    {"layer_type": ["att", "res"], "layer": [3, 1], "doc": slice(1, 8, 2)},
])
def test_ordered_reader_yields_valid_tokens_in_order(run, sel):
    lts = [sel["layer_type"]] if isinstance(sel.get("layer_type"), str) else sel.get("layer_type", ["res"])
    layers = [sel["layer"]] if isinstance(sel.get("layer"), int) else sel.get("layer", list(LAYERS))
    docs = sel.get("doc")
    docs = list(range(max(N_DOCS)))[docs] if isinstance(docs, slice) else docs
    ds = TokenDataset(run["path"], batch_size=7, token_vars=("token_id", "ce_loss", "entropy"), **sel)
    want = _expected_tokens(run, lts, layers, sel.get("author"), docs)
    got = _collect(ds)
    assert ds.blocks == [(lt, layer) for lt in lts for layer in layers]
    assert ds.authors == (sel.get("author") or list(AUTHORS)) and ds.n_rows == len(want["tok"])
    assert got["sizes"][:-1] == [7] * (len(got["sizes"]) - 1) and 0 < got["sizes"][-1] <= 7
    for k in ("author", "doc", "tok", "token_id"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(got["ce_loss"], want["ce_loss"])
    np.testing.assert_array_equal(got["entropy"], want["entropy"])
    np.testing.assert_array_equal(got["x"], want["x"])  # exact: float32 in, float32 out
    assert ds.n_batches() == len(got["sizes"])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_batch_formats_agree(run):
    ds = TokenDataset(run["path"], layer_type=["res", "att"], batch_size=16)
    dense_ds = TokenDataset(run["path"], layer_type=["res", "att"], batch_size=16, dense=True)
    batch, dense_batch = next(iter(ds)), next(iter(dense_ds))
    x = batch.to_dense()
    assert x.shape == (16, 4 * N_FEAT) and dense_batch.dense is not None
    torch.testing.assert_close(dense_batch.dense, x)
    torch.testing.assert_close(batch.to_sparse_csr().to_dense(), x)
    torch.testing.assert_close(batch.to_sparse_coo().to_dense(), x)
    w = torch.randn(4 * N_FEAT, 3, dtype=torch.float32, requires_grad=True)
    b = torch.randn(3)
    torch.testing.assert_close(batch.linear(w, b), x @ w + b, rtol=1e-5, atol=1e-5)
    batch.linear(w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0)[:, None].expand(-1, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_batch.linear(w, b), x @ w + b, rtol=1e-5, atol=1e-5)
    moved = batch.to("cpu")
    assert isinstance(moved, SparseBatch) and len(moved) == 16 and moved.nnz == batch.nnz


def _loader_run(ds, num_workers: int = 2) -> dict:
    return _collect(DataLoader(ds, batch_size=None, num_workers=num_workers))


def test_ordered_reader_shards_are_contiguous_and_disjoint(run):
    want = _expected_tokens(run, ["res"], LAYERS)
    parts = [_loader_run(TokenDataset(run["path"], batch_size=5, rank=r, world_size=2)) for r in range(2)]
    keys = _keys(parts[0]) + _keys(parts[1])
    assert sorted(keys) == sorted(_keys(want)) and len(set(keys)) == len(keys)
    # no doc-chunk is split between ranks
    chunks = [{(a, d // CHUNK_DOCS) for a, d, _ in _keys(p)} for p in parts]
    assert not chunks[0] & chunks[1]
    # in one process each rank's stream is in order, and rank 0's part comes first
    order = {k: i for i, k in enumerate(_keys(want))}
    streams = [[order[k] for k in _keys(_loader_run(TokenDataset(run["path"], batch_size=5, rank=r, world_size=2),
                                                    num_workers=0))] for r in range(2)]
    assert streams[0] + streams[1] == list(range(len(order)))


def test_rank_defaults_to_torch_distributed(run, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = ShuffledTokenDataset(run["path"], batch_size=8)
        assert (ds.rank, ds.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()
    assert (TokenDataset(run["path"]).rank, TokenDataset(run["path"]).world_size) == (0, 1)


def _shuffled(run, rank: int, epoch: int, seed: int = 7, **kw) -> dict:
    ds = ShuffledTokenDataset(run["path"], layer_type=["res", "att"], layer=3, batch_size=8, seed=seed,
                              buffer_size=64, rank=rank, world_size=2, **kw)
    ds.set_epoch(epoch)
    got = _loader_run(ds)
    got["n_batches"] = ds.n_batches(num_workers=2)
    return got


def test_shuffled_reader_covers_each_token_once_per_epoch(run):
    want = _expected_tokens(run, ["res", "att"], [3])
    index = {k: i for i, k in enumerate(_keys(want))}
    epochs = []
    for epoch in (0, 1):
        parts = [_shuffled(run, rank, epoch) for rank in (0, 1)]
        keys = _keys(parts[0]) + _keys(parts[1])
        assert len(keys) == len(index) and set(keys) == set(index), "every valid token exactly once"
        for p in parts:  # values travel with their labels
            np.testing.assert_array_equal(p["x"], want["x"][[index[k] for k in _keys(p)]])
            assert len(p["sizes"]) == p["n_batches"]
        chunks = [{(a, d // CHUNK_DOCS) for a, d, _ in _keys(p)} for p in parts]
        assert not chunks[0] & chunks[1], "ranks share no doc-chunk"
        assert keys != sorted(keys, key=index.__getitem__), "shuffled"
        epochs.append(keys)
    assert epochs[0] != epochs[1], "another epoch, another order"
    again = _shuffled(run, 0, 0)
    assert _keys(again) == epochs[0][: len(_keys(again))], "deterministic for a seed and epoch"
    assert _keys(_shuffled(run, 0, 0, seed=8)) != _keys(again)


def test_shuffle_buffer_is_bounded_and_mixes(run):
    with pytest.raises(TorchReaderError, match="buffer_size=20 is too small"):
        ShuffledTokenDataset(run["path"], batch_size=8, buffer_size=20)
    need = 8 + CHUNK_DOCS * N_TOK  # one batch + the largest possible doc-chunk
    ds = ShuffledTokenDataset(run["path"], batch_size=8, buffer_size=need, seed=1)
    got = _collect(ds)
    assert 0 < ds.peak_buffered_rows <= need
    assert sorted(_keys(got)) == sorted(_keys(_expected_tokens(run, ["res"], LAYERS)))
    first = {(a, d // CHUNK_DOCS) for a, d, _ in _keys(got)[:8]}
    assert len(got["sizes"]) > 3 and all(s == 8 for s in got["sizes"][:-1])
    big = ShuffledTokenDataset(run["path"], batch_size=8, buffer_size=10_000, seed=1)
    first_big = {(a, d // CHUNK_DOCS) for a, d, _ in _keys(_collect(big))[:8]}
    assert len(first_big) > 1 and len(first_big) >= len(first)


def test_even_batches_for_ddp(run):
    counts = []
    for rank in (0, 1):
        ds = ShuffledTokenDataset(run["path"], batch_size=8, buffer_size=64, rank=rank, world_size=2,
                                  even_batches=True, seed=3)
        got = _loader_run(ds)
        assert all(s == 8 for s in got["sizes"])
        counts.append(len(got["sizes"]))
        assert counts[-1] == ds.n_batches(num_workers=2)
    assert counts[0] == counts[1] > 0


def _pool_reference(run: dict, pool: str, layer_types, layers) -> dict:
    out = {"author": [], "doc": [], "n_tokens": [], "x": []}
    l_idx = [LAYERS.index(x) for x in layers]
    for a in range(len(AUTHORS)):
        for d in range(N_DOCS[a]):
            valid = run["valid_mask"][a, d]
            if not valid.any():
                continue
            x_TF = np.concatenate([run[lt][a, li, d][valid] for lt in layer_types for li in l_idx], axis=1)
            x = {"mean": x_TF.astype(np.float64).mean(0), "sum": x_TF.astype(np.float64).sum(0),
                 "max": x_TF.max(0)}[pool]
            out["author"].append(a)
            out["doc"].append(d)
            out["n_tokens"].append(int(valid.sum()))
            out["x"].append(x)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("pool", ["mean", "max", "sum"])
def test_pooled_documents_equal_numpy(run, pool):
    ds = DocumentDataset(run["path"], pool=pool, layer_type=["res", "att"], batch_size=5)
    got, want = _collect(ds), _pool_reference(run, pool, ["res", "att"], LAYERS)
    assert sum(N_DOCS) - 1 == len(want["doc"]) == ds.n_rows  # the empty document is skipped
    for k in ("author", "doc", "n_tokens"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_allclose(got["x"], want["x"], rtol=1e-6, atol=1e-6)
    shuffled = _loader_run(DocumentDataset(run["path"], pool=pool, layer_type=["res", "att"], batch_size=5,
                                           shuffle=True, seed=2, rank=1, world_size=2, dense=True))
    order = {(a, d): i for i, (a, d) in enumerate(zip(want["author"], want["doc"], strict=True))}
    idx = [order[a, d] for a, d in zip(shuffled["author"], shuffled["doc"], strict=True)]
    assert 0 < len(idx) < len(order) and len(set(idx)) == len(idx)
    np.testing.assert_allclose(shuffled["x"], want["x"][idx], rtol=1e-6, atol=1e-6)


def test_bad_selections_are_named(run):
    with pytest.raises(TorchReaderError, match="layer type 'mlp' is not in"):
        TokenDataset(run["path"], layer_type="mlp")
    with pytest.raises(TorchReaderError, match="author 'nobody' is not in this run"):
        TokenDataset(run["path"], author="nobody")
    with pytest.raises(TorchReaderError, match="layer 2 is not in this run"):
        TokenDataset(run["path"], layer=2)
    with pytest.raises(TorchReaderError, match="out of range"):
        TokenDataset(run["path"], doc=[99])
    with pytest.raises(TorchReaderError, match="rank"):
        TokenDataset(run["path"], rank=2, world_size=2)
    with pytest.raises(TorchReaderError, match="pool"):
        DocumentDataset(run["path"], pool="median")


# --------------------------------------------------------------------------------------------
# The author probe on a tiny-model run


def _load_probe_module():
    spec = importlib.util.spec_from_file_location("author_probe", ROOT / "examples" / "author_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory) -> Path:
    from saestore.extract.launch import main

    out = tmp_path_factory.mktemp("probe")
    code = main(["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3", "--layer_types", "res",
                 "--sae_features_width", "1k", "--use_error_term", "--n_docs_per_author", "24", "--max_seq_len", "64",
                 "--devices", "cpu", "--output_dir", str(out), "--run_name", "probe", "--quiet"])
    assert code == 0
    return out / "demo" / "tiny" / "probe.zarr"


@pytest.mark.extract  # the tiny model and an extraction
def test_author_probe_beats_chance(tiny_run):
    probe = _load_probe_module()
    result = probe.train_author_probe(tiny_run, layer_type="res", layer=3, epochs=30, seed=0)
    assert result["n_authors"] == 5 and result["chance"] == pytest.approx(0.2)
    assert result["n_test_docs"] >= 20 and result["n_train_docs"] >= 80
    assert result["test_accuracy"] >= 2 * result["chance"], result


def test_readers_of_a_run_being_written_yield_finished_doc_chunks_only(tmp_path):
    """#16: like open_run, the torch readers read unfinished doc-chunks as absent (a payload written
    before its marker is not yielded) and say in one line that the run is incomplete."""
    storage = protocol.StorageInfo(format="sparse", value_dtype="float32", chunk_docs=CHUNK_DOCS,
                                   shard_docs=CHUNK_DOCS)  # a shard per doc-chunk: each written alone
    layout = RunLayout(authors=AUTHORS, n_docs=N_DOCS, n_tok=N_TOK, layer_types=LAYER_TYPES, layers=LAYERS,
                       n_features=N_FEAT, storage=storage)
    path = str(tmp_path / "live.zarr")
    create_run(path, layout, _attrs(layout))
    writer = RunWriter(path)
    finished = {(0, 0), (0, 2), (2, 1), (3, 0)}
    for a, c in sorted(finished):
        writer.write_chunk(a, c, _payload(layout, a, c))
    # a writer caught between payloads of (author 1, doc-chunk 0): its doc_length is written, no marker
    import zarr
    zarr.open_array(path, path="doc_length", mode="r+")[1, 0:2] = 5
    ds_live = xr.open_zarr(path)
    done = np.zeros(ds_live["valid_mask"].shape[:2], bool)
    for a, c in finished:
        done[a, c * CHUNK_DOCS:(c + 1) * CHUNK_DOCS] = True
    ref = {name: ds_live[name].values for name in [*LAYER_TYPES, "valid_mask", "token_id", "ce_loss", "entropy"]}
    ref["valid_mask"] = ref["valid_mask"] & done[:, :, None]
    with pytest.warns(UserWarning, match=r"4 of 9 doc-chunks are done; the others read as absent"):
        ds = TokenDataset(path, layer_type=["res", "att"], batch_size=5, token_vars=("token_id",))
    want = _expected_tokens(ref, ["res", "att"], list(LAYERS))
    got = _collect(ds)
    assert ds.n_rows == len(want["tok"]) > 0
    for k in ("author", "doc", "tok", "token_id", "x"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.warns(UserWarning, match="doc-chunks are done"):
        docs = DocumentDataset(path, batch_size=4)
    assert docs.n_rows == int((done & (ds_live["doc_length"].values > 0)).sum())
