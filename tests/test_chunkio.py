"""saestore.chunkio against zarr's own pipeline, on whichever zarr line is installed (CI: 3.1 and newest).

The contract: a chunk written through the direct sparse path (nonzeros -> sparse_coo.encode_rows ->
chunkio.write_chunk) is byte-identical, as stored, to the same chunk written by ``arr[...] = dense``.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

import saestore
from saestore import chunkio, sparse_coo
from saestore.codec import SparseCOOCodec
from saestore.errors import CorruptChunkError, ProtocolError
from saestore.reader import is_sparse_variable

from tests.helpers.stats_run import write_run

REPO = Path(__file__).resolve().parent.parent


def _keys(store: MemoryStore) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list()]
    return sync(collect())


def _get(store: MemoryStore, key: str) -> bytes:
    return sync(store.get(key, prototype=default_buffer_prototype())).to_bytes()


def _pair(shape, chunks, value_dtype, dtype="float32"):
    """Two identical sparse arrays in one store: one for zarr's pipeline, one for the direct path."""
    group = zarr.open_group(MemoryStore(), mode="w")
    kw = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=0.0, serializer=SparseCOOCodec(value_dtype=value_dtype),
              compressors=[ZstdCodec(level=3), Crc32cCodec()])
    return group.create_array("pipeline", **kw), group.create_array("direct", **kw)


@st.composite
def cases(draw):
    value_dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim - 1)) + (draw(st.integers(1, 70)),)
    chunks = tuple(draw(st.integers(1, n)) for n in shape)  # edge chunks whenever n % c != 0
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return value_dtype, shape, chunks, density, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_direct_sparse_chunks_are_byte_identical_to_zarrs_pipeline(case):
    value_dtype, shape, chunks, density, seed = case
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(shape) < density, rng.lognormal(0, 2, shape), 0).astype(np.float32)
    pipeline, direct = _pair(shape, chunks, value_dtype)
    pipeline[...] = x
    grid = tuple(math.ceil(n / c) for n, c in zip(shape, chunks, strict=True))
    for coords in np.ndindex(*grid):
        sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, chunks, shape, strict=True))
        block = np.zeros(chunks, np.float32)  # an edge chunk is encoded at the full chunk shape, zero-padded
        block[tuple(slice(0, s.stop - s.start) for s in sel)] = x[sel]
        flat = block.reshape(-1, chunks[-1])
        rows, cols = np.nonzero(flat)
        raw = sparse_coo.encode_rows(flat.shape[0], flat.shape[1], rows, cols, flat[rows, cols], value_dtype)
        if sparse_coo.read_header(raw).nnz == 0:
            chunkio.delete_chunk(direct, coords)
        else:
            chunkio.write_chunk(direct, coords, raw)
        want = chunkio.read_stored(pipeline, coords)
        got = chunkio.read_stored(direct, coords)
        assert (None if want is None else want.to_bytes()) == (None if got is None else got.to_bytes()), coords
        if want is not None:
            assert bytes(chunkio.read_chunk(pipeline, coords)) == raw  # and the decode side undoes the same chain
    np.testing.assert_array_equal(direct[...], pipeline[...])


def test_chunk_key_and_shape_match_the_files_zarr_writes(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    arr = group.create_array("a/b", shape=(5, 7), chunks=(2, 3), dtype="float32", fill_value=0.0,
                             serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3), Crc32cCodec()])
    arr[...] = np.ones((5, 7), np.float32)
    assert chunkio.chunk_shape(arr) == (2, 3)
    assert chunkio.chunk_key(arr, (2, 1)) == "a/b/c/2/1"
    assert (tmp_path / "g.zarr" / chunkio.chunk_key(arr, (2, 1))).read_bytes() == chunkio.read_stored(arr, (2, 1)).to_bytes()
    root = zarr.create_array(tmp_path / "r.zarr", shape=(4,), chunks=(2,), dtype="float32", fill_value=0.0)
    assert chunkio.chunk_key(root, (1,)) == "c/1"


def test_chunk_spec_shim_is_the_spec_zarrs_pipeline_uses():
    """The version shim: the spec handed to the codecs, for an interior and an edge chunk."""
    arr = zarr.create_array(MemoryStore(), shape=(5, 7), chunks=(2, 3), dtype="float16", fill_value=0.0,
                            serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3), Crc32cCodec()])
    for coords in [(0, 0), (2, 2)]:
        spec = chunkio._chunk_spec(arr, coords)
        assert spec.shape == (2, 3)
        assert np.dtype(spec.dtype.to_native_dtype()) == np.float16
        assert float(spec.fill_value) == 0.0 and not np.signbit(spec.fill_value)
        if chunkio.ZARR_VERSION < (3, 2):
            from zarr.core.array_spec import ArrayConfig
            from zarr.core.buffer import default_buffer_prototype

            assert spec == arr.metadata.get_chunk_spec(coords, ArrayConfig.from_dict({}), default_buffer_prototype())
        else:
            assert not hasattr(arr.metadata, "get_chunk_spec")  # the reason for the shim; drop it when 3.1 goes


def test_the_decode_bound_is_the_sparse_formats_largest_chunk():
    arr = zarr.create_array(MemoryStore(), shape=(3, 4, 70_000), chunks=(3, 4, 70_000), dtype="float32",
                            fill_value=0.0, serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3), Crc32cCodec()])
    assert chunkio.max_decoded_size(arr) == sparse_coo.max_chunk_size(12, 70_000)
    full = np.ones((12, 70_000), np.float32)
    assert len(sparse_coo.encode_dense(full)) == sparse_coo.max_chunk_size(12, 70_000)  # the bound is tight
    dense = zarr.create_array(MemoryStore(), shape=(6, 5), chunks=(3, 5), dtype="float16", fill_value=0.0)
    assert chunkio.max_decoded_size(dense) == 3 * 5 * 2


def test_zstd_frame_claiming_more_than_the_bound_is_refused_before_decompressing():
    arr = zarr.create_array(MemoryStore(), shape=(2, 8), chunks=(2, 8), dtype="float32", fill_value=0.0,
                            serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3)])
    arr[...] = np.eye(2, 8, dtype=np.float32)
    frame = chunkio.read_stored(arr, (0, 0)).to_bytes()
    assert chunkio.zstd_content_size(frame) == len(sparse_coo.encode_dense(np.eye(2, 8, dtype=np.float32)))
    # single-segment frame header with an 8-byte content size of 2^40 (the body is never reached)
    bomb = frame[:4] + bytes([0xE0]) + (2**40).to_bytes(8, "little") + frame[6:]
    chunkio.write_stored(arr, (0, 0), bomb)
    with pytest.raises(CorruptChunkError, match="claims 1099511627776 bytes"):
        chunkio.read_chunk(arr, (0, 0))


def test_arrays_the_direct_path_cannot_serve_are_refused():
    from zarr.codecs import TransposeCodec

    arr = zarr.create_array(MemoryStore(), shape=(2, 8), chunks=(2, 8), dtype="float32", fill_value=0.0,
                            filters=[TransposeCodec(order=(1, 0))], compressors=None)
    assert not chunkio.is_direct(arr)
    with pytest.raises(ProtocolError, match="filters"):
        chunkio.byte_codecs(arr)
    from zarr.codecs import ShardingCodec

    # sharded along two axes, or with the index first: zarr's own pipeline reads them
    two_axes = zarr.create_array(MemoryStore(), shape=(4, 8), chunks=(2, 4), shards=(4, 8), dtype="float32",
                                 fill_value=0.0, serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3)])
    index_first = zarr.create_array(
        MemoryStore(), shape=(4, 8), chunks=(4, 8), dtype="float32", fill_value=0.0, compressors=None,
        serializer=ShardingCodec(chunk_shape=(2, 8), codecs=[SparseCOOCodec()], index_location="start"))
    for sharded in (two_axes, index_first):
        sharded[...] = np.eye(4, 8, dtype=np.float32)
        assert not chunkio.is_direct(sharded) and not is_sparse_variable(sharded)
        with pytest.raises(ProtocolError, match="sharded along one axis"):
            chunkio.chunk_shape(sharded)
        np.testing.assert_array_equal(sharded[...], np.eye(4, 8, dtype=np.float32))


def test_sharded_chunks_read_and_write_like_zarrs_sharding_codec():
    """write_shard's bytes equal zarr's sharding pipeline (absent inner chunks, the edge shard) and
    read_chunk reads each inner chunk back with two ranged reads."""
    store = MemoryStore()
    kw = dict(shape=(2, 10, 8), chunks=(1, 2, 8), shards=(1, 6, 8), dtype="float32", fill_value=0.0,
              serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3), Crc32cCodec()])
    ours, theirs = (zarr.create_array(store, name=n, **kw) for n in ("ours", "theirs"))
    assert chunkio.is_direct(ours) and is_sparse_variable(ours)
    assert chunkio.chunk_shape(ours) == (1, 2, 8) and chunkio.shard_shape(ours) == (1, 6, 8)
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((2, 10, 8)) < 0.2, rng.random((2, 10, 8)), 0).astype(np.float32)
    dense[0, 2:4] = 0  # an absent inner chunk in the middle of a shard
    dense[1, 6:] = 0  # an absent shard
    theirs[...] = dense
    for a in range(2):
        for s in range(2):  # shard 1 is the edge shard: docs 6..9 of a nominal 6..11
            inner = {}
            for i in range(3):
                block = np.zeros((1, 2, 8), np.float32)
                part = dense[a : a + 1, s * 6 + 2 * i : s * 6 + 2 * i + 2]
                block[:, : part.shape[1]] = part
                rows, cols = np.nonzero(block.reshape(2, 8))
                if len(rows):
                    inner[i] = sparse_coo.encode_rows(2, 8, rows, cols, block.reshape(2, 8)[rows, cols], "float32")
            chunkio.write_shard(ours, (a, s, 0), inner)
    ours_keys = sorted(k for k in _keys(store) if k.startswith("ours/c"))
    assert [k.replace("ours", "theirs") for k in ours_keys] == sorted(k for k in _keys(store) if k.startswith("theirs/c"))
    assert len(ours_keys) == 3
    for k in ours_keys:
        assert _get(store, k) == _get(store, k.replace("ours", "theirs")), k
    np.testing.assert_array_equal(ours[...], dense)
    for coords in [(0, 0, 0), (0, 1, 0), (1, 4, 0), (0, 4, 0)]:
        raw = chunkio.read_chunk(ours, coords)
        want = dense[coords[0], 2 * coords[1] : 2 * coords[1] + 2]
        if not want.any():
            assert raw is None
            continue
        _, rows, cols, values = sparse_coo.decode_rows(raw, 2, 8)
        got = np.zeros((2, 8), np.float32)
        got[rows, cols] = values
        np.testing.assert_array_equal(got[: want.shape[0]], want)
    with pytest.raises(ProtocolError, match="write whole shards"):
        chunkio.write_chunk(ours, (0, 0, 0), b"")


def test_a_damaged_shard_index_is_a_corrupt_chunk():
    store = MemoryStore()
    arr = zarr.create_array(store, name="x", shape=(1, 4, 8), chunks=(1, 2, 8), shards=(1, 4, 8), dtype="float32",
                            fill_value=0.0, serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3)])
    arr[...] = np.eye(4, 8, dtype=np.float32)[None]
    key = chunkio.chunk_key(arr, (0, 0, 0))
    data = bytearray(_get(store, key))
    data[-10] ^= 0xFF  # inside the index
    sync(store.set(key, cpu.Buffer.from_bytes(bytes(data))))
    with pytest.raises(CorruptChunkError, match="index fails its checksum"):
        chunkio.read_chunk(arr, (0, 1, 0))


def test_open_run_never_reads_an_overwritten_run_through_stale_metadata(tmp_path):
    """A run rewritten at the same path (here: another storage format and other values) reads as
    the new run, with new dask names; a doc-chunk rewritten in place changes the names too."""
    path = tmp_path / "run.zarr"
    ref = write_run(path, seed=0)
    first = saestore.open_run(path)
    np.testing.assert_array_equal(first.res.data.compute().todense(), ref.acts["res"])
    import shutil

    shutil.rmtree(path)
    ref2 = write_run(path, "dense", seed=1)
    second = saestore.open_run(path)
    assert second.res.data.name != first.res.data.name
    np.testing.assert_array_equal(np.asarray(second.res.data.compute()), ref2.acts["res"])
    shutil.rmtree(path)
    ref3 = write_run(path, seed=2)
    third = saestore.open_run(path)
    assert third.res.data.name not in (first.res.data.name, second.res.data.name)
    np.testing.assert_array_equal(third.res.data.compute().todense(), ref3.acts["res"])


def test_only_chunkio_reaches_into_zarr_internals():
    """`zarr.core` appears in the package only in chunkio and, for type hints, in the codec module."""
    hits = subprocess.run(["grep", "-rln", "--include=*.py", "zarr.core", "saestore", "scripts"], cwd=REPO, capture_output=True,
                          text=True).stdout.split()
    assert sorted(hits) == ["saestore/chunkio.py", "saestore/codec.py"], hits
    codec = (REPO / "saestore" / "codec.py").read_text()
    assert set(re.findall(r"from (zarr\.core\.\w+) import", codec)) == {"zarr.core.array_spec", "zarr.core.buffer"}
    tests = subprocess.run(["grep", "-rln", "--include=*.py", "zarr.core", "tests"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert sorted(tests) == ["tests/test_chunkio.py"], tests


def test_core_import_pulls_in_no_model_stack():
    """Reading, statistics, info and validate import no torch, transformers, sae_lens or datasets."""
    code = ("import sys, saestore, saestore.stats, saestore.info, saestore.validate, saestore.reader, saestore.writer, "
            "saestore.__main__; heavy = {'torch', 'transformers', 'sae_lens', 'transformer_lens', 'datasets'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
