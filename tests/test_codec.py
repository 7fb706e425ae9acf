"""The ``saestore.sparse_coo`` codec (PROTOCOL.md §5): the pure-numpy core, the zarr v3 codec, the
numcodecs codec, malformed input, frozen test vectors and fresh-process decoding.

The byte format is checked three ways: against an independent, loop-based encoder written from
the PROTOCOL.md text (``spec_encode``), against frozen vectors (tests/fixtures/sparse_coo), and
by round trips. Lossy value types are held to the exact error bounds of §5.3.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import MemoryStore

from saestore import chunkio, protocol, sparse_coo
from saestore.codec import CODEC_NAME, SparseCOOCodec, SparseCOONumcodec
from saestore.errors import CodecEncodeError, CorruptChunkError, ProtocolError

FIXTURE_PATH = Path(__file__).resolve().parent / "fixtures" / "sparse_coo"
VALUE_DTYPES = ("float32", "float16", "bfloat16")
F16_MAX = 65504.0
BF16_MAX = 3.3895313892515355e38  # 0x7F7F
F32_MAX = float(np.finfo(np.float32).max)
MAX_FOR = {"float32": F32_MAX, "float16": F16_MAX, "bfloat16": BF16_MAX}
VALUE_CODE = {"float32": (0, 4), "float16": (1, 2), "bfloat16": (2, 2)}

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# Reference implementation of PROTOCOL.md §5.2, written from the text, deliberately naive
# --------------------------------------------------------------------------------------------

def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def ref_bfloat16_bits(v: float) -> int:
    """Nearest bfloat16 (ties to even) of a float32 value, by comparing the two candidates."""
    bits = _f32_bits(v)
    lo_bits = bits & 0xFFFF0000  # truncation toward zero (sign kept)
    hi_bits = lo_bits + 0x10000  # next bfloat16 away from zero
    # past the largest finite value the next candidate is 2^128 (with unbounded exponent): IEEE 754
    # round-to-nearest overflows to inf from the midpoint 2^128 - 2^119 on
    top = (hi_bits & 0x7F800000) == 0x7F800000
    lo, hi = _bits_f32(lo_bits), math.copysign(2.0**128, v) if top else _bits_f32(hi_bits)
    d_lo, d_hi = abs(v - lo), abs(hi - v)  # exact: both operands are float32 values
    if d_lo < d_hi or (d_lo == d_hi and not (lo_bits >> 16) & 1):
        return lo_bits >> 16
    return hi_bits >> 16


def ref_round(x: np.ndarray, value_dtype: str) -> np.ndarray:
    """What a chunk decodes to, as float32: the spec's rounding, zeros (incl. -0.0) as +0.0."""
    x32 = np.asarray(x, dtype=np.float32)
    if value_dtype == "float32":
        out = x32.copy()
    elif value_dtype == "float16":
        out = x32.astype(np.float16).astype(np.float32)
    else:
        flat = [_bits_f32(ref_bfloat16_bits(float(v)) << 16) for v in x32.ravel()]
        out = np.array(flat, dtype=np.float32).reshape(x32.shape)
    out[out == 0] = 0.0
    return out


def _shuffled(ints: list[int], size: int) -> bytes:
    raw = b"".join(int(v).to_bytes(size, "little") for v in ints)
    return b"".join(raw[j::size] for j in range(size))


def _stored_bits(v: float, value_dtype: str) -> int:
    if value_dtype == "float32":
        return _f32_bits(v)
    if value_dtype == "float16":
        return int(np.array(v, dtype=np.float32).astype(np.float16).view(np.uint16))
    return ref_bfloat16_bits(v)


def spec_encode(x: np.ndarray, value_dtype: str) -> bytes:
    """PROTOCOL.md §5.2, one value at a time."""
    x = np.asarray(x)
    n_cols = x.shape[-1]
    n_rows = math.prod(x.shape[:-1])
    m = x.reshape(n_rows, n_cols).astype(np.float32)
    code, size = VALUE_CODE[value_dtype]
    width = 2 if n_cols <= 65536 else 4
    counts, deltas, values = [], [], []
    sign_mask = 0x7FFFFFFF if size == 4 else 0x7FFF
    for r in range(n_rows):
        prev = None
        count = 0
        for c in range(n_cols):
            bits = _stored_bits(float(m[r, c]), value_dtype)
            if bits & sign_mask == 0:  # zero, -0.0, or underflowed to zero
                continue
            deltas.append(c if prev is None else c - prev)
            values.append(bits)
            prev = c
            count += 1
        counts.append(count)
    header = struct.pack("<4sBBBBQIIQ", b"SCOO", 1, code, width, 0, n_rows, n_cols, 0, len(values))
    return header + _shuffled(counts, 4) + _shuffled(deltas, width) + _shuffled(values, size)


def pack_chunk(*, n_rows: int, n_cols: int, counts: list[int], deltas: list[int], value_bits: list[int],
               value_dtype: str = "float32", nnz: int | None = None, width: int | None = None,
               magic: bytes = b"SCOO", version: int = 1, code: int | None = None, flags: int = 0,
               reserved: int = 0) -> bytes:
    """Hand-build a (possibly malformed) chunk."""
    vcode, size = VALUE_CODE[value_dtype]
    width = width if width is not None else (2 if n_cols <= 65536 else 4)
    header = struct.pack("<4sBBBBQIIQ", magic, version, vcode if code is None else code, width, flags,
                         n_rows, n_cols, reserved, len(value_bits) if nnz is None else nnz)
    return header + _shuffled(counts, 4) + _shuffled(deltas, width) + _shuffled(value_bits, size)


# --------------------------------------------------------------------------------------------
# Error bounds of PROTOCOL.md §5.3
# --------------------------------------------------------------------------------------------

def assert_within_bound(x: np.ndarray, got: np.ndarray, value_dtype: str) -> None:
    """float32 exact; float16 rel ≤ 2^-11 (|x| ≥ 2^-14), abs ≤ 2^-25 below, |x| ≤ 2^-25 dropped;
    bfloat16 rel ≤ 2^-8 (|x| ≥ 2^-126), abs ≤ 2^-134 below, |x| ≤ 2^-134 dropped."""
    x64 = np.asarray(x, dtype=np.float64)
    g = np.asarray(got)
    g64 = g.astype(np.float64)
    assert g.shape == x64.shape
    assert np.isfinite(g64).all()
    assert not np.signbit(g[g == 0]).any(), "-0.0 must decode as +0.0"
    nz = g64 != 0
    assert (np.sign(g64[nz]) == np.sign(x64[nz])).all()
    if value_dtype == "float32":
        np.testing.assert_array_equal(g64, x64.astype(np.float32).astype(np.float64))
        return
    ax, err = np.abs(x64), np.abs(g64 - x64)
    if value_dtype == "float16":
        normal_min, rel, sub_abs = 2.0**-14, 2.0**-11, 2.0**-25
        assert (g64.astype(np.float16).astype(np.float64) == g64).all(), "not a float16 value"
    else:
        normal_min, rel, sub_abs = 2.0**-126, 2.0**-8, 2.0**-134
        assert (g.astype(np.float32).view(np.uint32) & 0xFFFF == 0).all(), "not a bfloat16 value"
    normal = ax >= normal_min
    assert (err[normal] <= rel * ax[normal]).all(), f"relative error {np.max(err[normal] / ax[normal])} > {rel}"
    assert (err[~normal] <= sub_abs).all(), f"absolute error {np.max(err[~normal])} > {sub_abs}"
    dropped = ax <= sub_abs  # rounds to zero (2^-25 / 2^-134 themselves tie to the even zero)
    assert (g64[dropped] == 0).all() and (g64[~dropped] != 0).all()


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

def value_elements(value_dtype: str) -> st.SearchStrategy[float]:
    """Finite float32 values the value dtype can hold, often near its subnormal/underflow range."""
    limit = MAX_FOR[value_dtype]
    tiny = {"float32": 2.0**-120, "float16": 2.0**-12, "bfloat16": 2.0**-120}[value_dtype]
    return (st.floats(min_value=-limit, max_value=limit, width=32, allow_nan=False, allow_infinity=False)
            | st.floats(min_value=-tiny, max_value=tiny, width=32))


@st.composite
def dense_chunks(draw, value_dtype: str = "float32", min_lead: int = 0, max_dims: int = 4,
                 max_cols: int = 24) -> np.ndarray:
    """A float32 chunk: 1-4 dims (zero-length leading dims allowed), density 0..1."""
    ndim = draw(st.integers(1, max_dims))
    lead = tuple(draw(st.integers(min_lead, 4)) for _ in range(ndim - 1))
    shape = (*lead, draw(st.integers(1, max_cols)))
    values = draw(arrays(np.float32, shape, elements=value_elements(value_dtype)))
    density = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    mask = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(shape) < density
    return np.where(mask, values, np.float32(0.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The pure-numpy core
# --------------------------------------------------------------------------------------------

@settings(FAST, max_examples=300)
@given(data=st.data(), value_dtype=st.sampled_from(VALUE_DTYPES))
def test_core_round_trip_within_bound_and_matches_spec(data, value_dtype):
    x = data.draw(dense_chunks(value_dtype))
    enc = sparse_coo.encode_dense(x, value_dtype)
    assert enc == spec_encode(x, value_dtype)  # the byte layout, independently
    header = sparse_coo.read_header(enc)
    assert (header.n_rows, header.n_cols, header.value_dtype) == (math.prod(x.shape[:-1]), x.shape[-1], value_dtype)
    assert len(enc) == header.payload_size()
    got = sparse_coo.decode_dense(enc, x.shape)
    assert got.dtype == np.float32
    assert_within_bound(x, got, value_dtype)
    np.testing.assert_array_equal(got, ref_round(x, value_dtype))
    assert header.nnz == np.count_nonzero(got)
    coords, values = sparse_coo.decode_coords(enc, x.shape)
    np.testing.assert_array_equal(coords, np.array(np.nonzero(got)).reshape(x.ndim, -1))
    np.testing.assert_array_equal(values, got[tuple(coords)])


@settings(FAST, max_examples=200)
@given(data=st.data(), value_dtype=st.sampled_from(VALUE_DTYPES))
def test_encode_rows_from_triples_equals_encode_dense(data, value_dtype):
    x = data.draw(dense_chunks(value_dtype, min_lead=1))
    n_cols = x.shape[-1]
    flat = x.reshape(-1, n_cols)
    # sparse input may carry explicit zeros (and -0.0) at extra positions: they are dropped
    extra = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random(flat.shape) < 0.1
    flat_in = flat.copy()
    flat_in[extra & (flat == 0)] = data.draw(st.sampled_from([0.0, -0.0]))
    rows, cols = np.nonzero((flat != 0) | extra)
    enc = sparse_coo.encode_rows(flat.shape[0], n_cols, rows, cols, flat_in[rows, cols], value_dtype)
    assert enc == sparse_coo.encode_dense(x, value_dtype)


def test_core_zero_length_leading_dims_and_size_one_dims():
    for shape in [(0, 5), (2, 0, 3), (0, 0, 1), (1,), (1, 1), (1, 1, 1, 1), (0, 70000)]:
        x = np.zeros(shape, np.float32)
        enc = sparse_coo.encode_dense(x)
        assert enc == spec_encode(x, "float32")
        assert sparse_coo.decode_dense(enc, shape).shape == shape
        coords, values = sparse_coo.decode_coords(enc, shape)
        assert coords.shape == (len(shape), 0) and values.size == 0
    with pytest.raises(CodecEncodeError, match="last axis"):
        sparse_coo.encode_dense(np.zeros((3, 0), np.float32))
    with pytest.raises(CodecEncodeError, match="at least one dimension"):
        sparse_coo.encode_dense(np.float32(1.0).reshape(()))


def test_index_width_boundary():
    for n_cols, width in [(1, 2), (65535, 2), (65536, 2), (65537, 4), (70000, 4)]:
        x = np.zeros((1, n_cols), np.float32)
        x[0, [0, n_cols - 1]] = 1.0
        enc = sparse_coo.encode_dense(x)
        assert enc[6] == width == sparse_coo.read_header(enc).index_width
        np.testing.assert_array_equal(sparse_coo.decode_dense(enc, x.shape), x)


def test_negative_zero_is_zero():
    x = np.array([[0.0, -0.0, 1.5], [-0.0, -0.0, -0.0], [2.0, -0.0, -3.0]], np.float32)
    pos = np.where(x == 0, np.float32(0.0), x)
    assert np.signbit(x).sum() > 2 and not np.signbit(pos[pos == 0]).any()
    for vd in VALUE_DTYPES:
        enc = sparse_coo.encode_dense(x, vd)
        assert enc == sparse_coo.encode_dense(pos, vd)
        assert sparse_coo.read_header(enc).nnz == 3
        got = sparse_coo.decode_dense(enc, x.shape)
        assert not np.signbit(got[got == 0]).any()
        rows, cols = np.nonzero(np.ones_like(x))  # every position, -0.0 values included
        assert sparse_coo.encode_rows(3, 3, rows, cols, x[rows, cols], vd) == enc


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_nonfinite_values_are_refused(bad, value_dtype):
    x = np.zeros((2, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(CodecEncodeError, match="NaN or inf"):
        sparse_coo.encode_dense(x, value_dtype)
    with pytest.raises(CodecEncodeError, match="NaN or inf"):
        sparse_coo.encode_rows(2, 4, [0, 1], [1, 2], np.array([1.0, bad], np.float32), value_dtype)
    with pytest.raises(CodecEncodeError, match="NaN or inf"):
        SparseCOONumcodec(n_cols=4, value_dtype=value_dtype).encode(x)
    arr = _zarr_array((2, 4), (2, 4), value_dtype=value_dtype)
    with pytest.raises(CodecEncodeError, match="NaN or inf"):
        arr[...] = x
    assert arr.nchunks_initialized == 0  # nothing written


F16_OVERFLOW = 65520.0  # 2^16 - 2^4: the midpoint between 65504 and 65536, a tie that rounds to even (inf)
BF16_OVERFLOW = float(np.uint32(0x7F7F8000).view(np.float32))  # 2^128 - 2^119, the same midpoint for bfloat16


def _refused_everywhere(x: np.ndarray, value_dtype: str) -> None:
    flat = x.reshape(1, -1)
    with pytest.raises(CodecEncodeError, match=f"overflows {value_dtype}: it rounds to inf"):
        sparse_coo.encode_dense(flat, value_dtype)
    with pytest.raises(CodecEncodeError, match=f"overflows {value_dtype}"):
        sparse_coo.encode_rows(1, flat.shape[1], [0] * flat.shape[1], range(flat.shape[1]), flat[0], value_dtype)
    arr = _zarr_array(flat.shape, flat.shape, value_dtype=value_dtype)
    with pytest.raises(CodecEncodeError, match=f"overflows {value_dtype}"):
        arr[...] = flat
    assert arr.nchunks_initialized == 0


@pytest.mark.parametrize("value", [F16_OVERFLOW, -F16_OVERFLOW, 65536.0, 70000.0, -1e6, F32_MAX])
def test_float16_overflow_is_refused(value):
    """PROTOCOL.md §5.3: refused exactly when float16(x) is infinite, i.e. |x| >= 65520."""
    x = np.array([1.0, value], np.float32)
    _refused_everywhere(x, "float16")
    np.testing.assert_array_equal(sparse_coo.decode_dense(sparse_coo.encode_dense(x), x.shape), x)  # float32: fine


def test_float16_values_below_the_overflow_bound_round_to_the_max():
    below = np.nextafter(np.float32(F16_OVERFLOW), np.float32(0))  # 65519.996
    x = np.array([65504.0, 65505.0, 65519.0, 65519.9, float(below), -float(below)], np.float32)
    got = sparse_coo.decode_dense(sparse_coo.encode_dense(x, "float16"), x.shape)
    np.testing.assert_array_equal(got, np.sign(x) * F16_MAX)
    assert got[3] == 65504.0


def test_bfloat16_overflow_is_refused():
    """PROTOCOL.md §5.3: refused exactly when the bfloat16 rounding of binary32 x is infinite."""
    for value in [BF16_OVERFLOW, -BF16_OVERFLOW, F32_MAX, -F32_MAX]:
        _refused_everywhere(np.array([value], np.float32), "bfloat16")
    below = float(np.nextafter(np.float32(BF16_OVERFLOW), np.float32(0)))
    ok = np.array([BF16_MAX, -BF16_MAX, 3.39e38, below, -below], np.float32)
    got = sparse_coo.decode_dense(sparse_coo.encode_dense(ok, "bfloat16"), ok.shape)
    np.testing.assert_array_equal(got, np.sign(ok) * np.float32(BF16_MAX))
    assert [ref_bfloat16_bits(v) for v in (below, BF16_OVERFLOW)] == [0x7F7F, 0x7F80]


def test_rounding_edge_values():
    """Ties to even and underflow, value by value (PROTOCOL.md §5.2/§5.3)."""
    cases = {
        "float16": [(1 + 2.0**-11, 1.0), (1 + 3 * 2.0**-11, 1 + 2.0**-9), (2.0**-25, 0.0),
                    (2.0**-25 * (1 + 2.0**-20), 2.0**-24), (3 * 2.0**-25, 2.0**-23), (2.0**-26, 0.0),
                    (65503.9, 65504.0)],
        "bfloat16": [(1 + 2.0**-8, 1.0), (1 + 3 * 2.0**-8, 1 + 2.0**-6), (2.0**-149, 0.0), (2.0**-134, 0.0),
                     (3 * 2.0**-134, 2.0**-132), (2.0**-133, 2.0**-133), (-(1 + 2.0**-8), -1.0)],
    }
    for vd, pairs in cases.items():
        x = np.array([v for v, _ in pairs], np.float32)
        want = np.array([w for _, w in pairs], np.float32)
        got = sparse_coo.decode_dense(sparse_coo.encode_dense(x, vd), x.shape)
        np.testing.assert_array_equal(got, want)
        assert sparse_coo.read_header(sparse_coo.encode_dense(x, vd)).nnz == np.count_nonzero(want)
    assert [ref_bfloat16_bits(v) for v in (1 + 2.0**-8, 1 + 3 * 2.0**-8)] == [0x3F80, 0x3F82]


def test_bfloat16_bits_helpers_match_reference():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= BF16_MAX)]
    got = sparse_coo.to_bfloat16_bits(x)
    assert got.dtype == np.dtype("<u2")
    assert got.tolist() == [ref_bfloat16_bits(float(v)) for v in x]
    back = sparse_coo.from_bfloat16_bits(got)
    assert (back.view(np.uint32) == got.astype(np.uint32) << 16).all()


@pytest.mark.parametrize(("rows", "cols", "match"), [
    ([1, 0], [0, 0], "row-major order"),            # rows out of order
    ([0, 0], [3, 1], "row-major order"),            # columns out of order within a row
    ([0, 0], [2, 2], "without duplicates"),         # duplicate triple
    ([0, 1, 1], [1, 2, 2], "without duplicates"),
    ([2], [0], "out of range"),                     # row >= n_rows
    ([0], [4], "out of range"),                     # col >= n_cols
    ([-1], [0], "out of range"),
    ([0], [-1], "out of range"),
])
def test_encode_rows_refuses_bad_triples(rows, cols, match):
    values = np.ones(len(rows), np.float32)
    with pytest.raises(CodecEncodeError, match=match):
        sparse_coo.encode_rows(2, 4, rows, cols, values)


def test_encode_rows_refuses_bad_arguments():
    with pytest.raises(CodecEncodeError, match="differ in length"):
        sparse_coo.encode_rows(2, 4, [0, 1], [0], [1.0, 2.0])
    with pytest.raises(CodecEncodeError, match="n_cols"):
        sparse_coo.encode_rows(2, 0, [], [], [])
    with pytest.raises(CodecEncodeError, match="n_rows"):
        sparse_coo.encode_rows(-1, 3, [], [], [])
    with pytest.raises(CodecEncodeError, match="value_dtype"):
        sparse_coo.encode_rows(1, 3, [0], [0], [1.0], "float8")
    with pytest.raises(CodecEncodeError, match="floating-point"):
        sparse_coo.encode_dense(np.ones((2, 2), np.int32))


# --------------------------------------------------------------------------------------------
# Malformed bytes: always CorruptChunkError, never another exception, never a big allocation
# --------------------------------------------------------------------------------------------

SMALL = np.array([[0.0, 1.5, 0.0, -2.0, 0.0], [0.0] * 5, [3.0, 0.0, 0.0, 0.0, 4.25]], np.float32)


def _decoders(data: bytes, shape: tuple[int, ...] = SMALL.shape):
    n_cols = shape[-1]
    # the numcodec is configured with the value dtype the header names (a mismatch is its own error)
    value_dtype = {0: "float32", 1: "float16", 2: "bfloat16"}.get(data[5] if len(data) > 5 else 0, "float32")
    yield lambda: sparse_coo.read_header(data)
    yield lambda: sparse_coo.decode_rows(data)
    yield lambda: sparse_coo.decode_dense(data, shape)
    yield lambda: sparse_coo.decode_coords(data, shape)
    yield lambda: SparseCOONumcodec(n_cols=n_cols, value_dtype=value_dtype).decode(data)
    n_rows = math.prod(shape[:-1])
    if n_cols > 4096:  # the fused walk's feature map and accumulator are the caller's, sized by n_cols
        return
    yield lambda: sparse_coo.decode_selected(data, np.arange(n_cols)[::-1].copy(), n_rows, n_cols)
    yield lambda: sparse_coo.accumulate(data, np.zeros((n_cols, 4)), np.arange(n_cols), n_rows, n_cols)


def assert_corrupt(data: bytes, match: str | None = None, shape: tuple[int, ...] = SMALL.shape,
                   header_ok: bool = False) -> None:
    for i, decode in enumerate(_decoders(data, shape)):
        if header_ok and i == 0:
            sparse_coo.read_header(data)  # the header alone is consistent
            continue
        with pytest.raises(CorruptChunkError, match=match):
            decode()


@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_truncated_at_every_length(value_dtype):
    enc = sparse_coo.encode_dense(SMALL, value_dtype)
    assert len(enc) == 32 + 4 * 3 + 4 * (2 + VALUE_CODE[value_dtype][1])
    for n in range(len(enc)):
        assert_corrupt(enc[:n], "truncated|does not match")
    assert_corrupt(enc + b"\0", "does not match")  # one byte too many


def test_wrong_magic_version_code_flags_width():
    enc = bytearray(sparse_coo.encode_dense(SMALL))
    for offset, value, match in [
        (0, ord("X"), "magic"), (4, 0, "version 0"), (4, 2, "version 2 is not supported"),
        (5, 3, "unknown value dtype code 3"), (5, 255, "unknown value dtype code"),
        (6, 4, "index width 4 for 5 columns"), (6, 3, "index width"), (7, 1, "reserved bits"),
        (20, 1, "reserved bits"),
    ]:
        bad = bytearray(enc)
        bad[offset] = value
        assert_corrupt(bytes(bad), match)
    wide = pack_chunk(n_rows=1, n_cols=70000, counts=[1], deltas=[5], value_bits=[_f32_bits(1.0)], width=2)
    assert_corrupt(wide, "index width 2 for 70000 columns", shape=(1, 70000))
    zero_cols = pack_chunk(n_rows=1, n_cols=0, counts=[0], deltas=[], value_bits=[])
    assert_corrupt(zero_cols, "index width|columns", shape=(1, 1))


def test_inconsistent_sizes():
    # more nonzeros than cells (length consistent with the claim)
    assert_corrupt(pack_chunk(n_rows=1, n_cols=2, counts=[3], deltas=[0, 1, 1], value_bits=[_f32_bits(1.0)] * 3),
                   "claims 3 nonzeros in a 1x2 chunk", shape=(1, 2))
    # counts that do not sum to nnz
    one = _f32_bits(1.0)
    assert_corrupt(pack_chunk(n_rows=3, n_cols=5, counts=[1, 0, 0], deltas=[0, 1], value_bits=[one, one]),
                   "row counts sum to 1, header says 2", header_ok=True)
    assert_corrupt(pack_chunk(n_rows=3, n_cols=5, counts=[2, 1, 0], deltas=[0, 1], value_bits=[one, one]),
                   "row counts sum to 3", header_ok=True)
    # a row count above n_cols (the sum still matching nnz)
    assert_corrupt(pack_chunk(n_rows=2, n_cols=2, counts=[3, 0], deltas=[0, 1, 1], value_bits=[one] * 3),
                   "row counts", shape=(2, 2), header_ok=True)
    # a chunk of another shape than expected
    enc = sparse_coo.encode_dense(SMALL)
    for shape in [(5, 3), (15,), (1, 3, 4)]:
        with pytest.raises(CorruptChunkError, match="expected"):
            sparse_coo.decode_dense(enc, shape)
        with pytest.raises(CorruptChunkError, match="expected"):
            sparse_coo.decode_coords(enc, shape)
    with pytest.raises(CorruptChunkError, match="columns, codec configured for 4"):
        SparseCOONumcodec(n_cols=4).decode(enc)


@pytest.mark.parametrize(("header_dtype", "config_dtype"), [
    ("float16", "float32"), ("bfloat16", "float16"), ("float32", "bfloat16"), ("bfloat16", "float32"),
])
def test_value_dtype_code_must_match_configuration(header_dtype, config_dtype):
    """PROTOCOL.md §5.2/§5.3: the header's value dtype code MUST be the configuration's value_dtype."""
    enc = sparse_coo.encode_dense(SMALL, header_dtype)
    match = f"stores {header_dtype} values .* configuration says value_dtype '{config_dtype}'"
    for decode in [lambda: sparse_coo.decode_rows(enc, value_dtype=config_dtype),
                   lambda: sparse_coo.decode_dense(enc, SMALL.shape, value_dtype=config_dtype),
                   lambda: sparse_coo.decode_coords(enc, SMALL.shape, value_dtype=config_dtype),
                   lambda: SparseCOONumcodec(n_cols=5, value_dtype=config_dtype).decode(enc)]:
        with pytest.raises(CorruptChunkError, match=match):
            decode()
    sparse_coo.decode_dense(enc, SMALL.shape, value_dtype=header_dtype)  # the matching one decodes
    arr = _zarr_array(SMALL.shape, SMALL.shape, value_dtype=config_dtype)
    chunkio.write_chunk(arr, (0, 0), enc)
    with pytest.raises(CorruptChunkError, match=match):
        arr[...]


def test_transposed_header_of_the_same_size_is_corrupt():
    """PROTOCOL.md §5.3: n_rows and n_cols are checked one by one, not only their product."""
    x = np.zeros((5, 3), np.float32)
    x[[0, 2, 4], [2, 0, 1]] = [1.0, -2.0, 3.5]
    transposed = sparse_coo.encode_dense(x)  # a 5x3 header, where a 3x5 chunk is expected
    assert math.prod(SMALL.shape) == x.size
    for shape in [(3, 5), (1, 3, 5), (3, 1, 5)]:
        with pytest.raises(CorruptChunkError, match="is 5x3, expected 3x5"):
            sparse_coo.decode_dense(transposed, shape)
        with pytest.raises(CorruptChunkError, match="is 5x3, expected 3x5"):
            sparse_coo.decode_coords(transposed, shape)
        with pytest.raises(CorruptChunkError, match="is 5x3, expected 3x5"):
            sparse_coo.decode_rows(transposed, math.prod(shape[:-1]), shape[-1])
    same_size = sparse_coo.encode_dense(np.ones((15, 1), np.float32))  # 15x1 vs 3x5, 1x15 vs 3x5
    for enc in [same_size, sparse_coo.encode_dense(np.ones((1, 15), np.float32))]:
        with pytest.raises(CorruptChunkError, match="expected 3x5"):
            sparse_coo.decode_dense(enc, (3, 5))
    arr = _zarr_array((3, 5), (3, 5))
    chunkio.write_chunk(arr, (0, 0), transposed)
    with pytest.raises(CorruptChunkError, match="expected 3x5"):
        arr[...]


def test_bad_columns():
    one = _f32_bits(1.0)
    # absolute first column out of range
    assert_corrupt(pack_chunk(n_rows=3, n_cols=5, counts=[0, 1, 0], deltas=[5], value_bits=[one]),
                   "column index 5 out of range", header_ok=True)
    # out of range by accumulation
    assert_corrupt(pack_chunk(n_rows=3, n_cols=5, counts=[2, 0, 0], deltas=[3, 2], value_bits=[one, one]),
                   "column index 5 out of range", header_ok=True)
    # duplicate column within a row (zero delta after the first)
    assert_corrupt(pack_chunk(n_rows=3, n_cols=5, counts=[0, 0, 2], deltas=[2, 0], value_bits=[one, one]),
                   "strictly increasing", header_ok=True)
    # a zero first delta of a later row is column 0, which is fine
    ok = pack_chunk(n_rows=3, n_cols=5, counts=[1, 1, 0], deltas=[4, 0], value_bits=[one, one])
    np.testing.assert_array_equal(sparse_coo.decode_coords(ok, (3, 5))[0], [[0, 1], [4, 0]])
    # huge deltas (u32) cannot wrap around into range
    wide = pack_chunk(n_rows=1, n_cols=70000, counts=[2], deltas=[1, 2**32 - 1], value_bits=[one, one])
    assert_corrupt(wide, "out of range", shape=(1, 70000), header_ok=True)


@pytest.mark.parametrize(("value_dtype", "bits", "what"), [
    ("float32", 0x7FC00000, "NaN"), ("float32", 0xFFC00001, "NaN"), ("float32", 0x7F800000, "inf"),
    ("float32", 0xFF800000, "-inf"), ("float32", 0, "0"), ("float32", 0x80000000, "-0"),
    ("float16", 0x7E00, "NaN"), ("float16", 0x7C00, "inf"), ("float16", 0x8000, "-0"),
    ("bfloat16", 0x7FC0, "NaN"), ("bfloat16", 0xFF80, "-inf"), ("bfloat16", 0x0000, "0"),
])
def test_bad_value_bytes(value_dtype, bits, what):
    one = _stored_bits(1.0, value_dtype)
    data = pack_chunk(n_rows=3, n_cols=5, counts=[1, 0, 1], deltas=[1, 4], value_bits=[one, bits],
                      value_dtype=value_dtype)
    assert_corrupt(data, "NaN, inf or explicit zeros", header_ok=True)


def test_huge_claims_fail_fast_without_allocating():
    claims = [
        # 2^60 nonzeros in a tiny chunk
        (pack_chunk(n_rows=1, n_cols=4, counts=[0], deltas=[], value_bits=[], nnz=2**60), (1, 4)),
        # 2^60 nonzeros that the shape would allow (2^30 x 2^30), in a 36-byte buffer
        (pack_chunk(n_rows=2**30, n_cols=2**30, counts=[0], deltas=[], value_bits=[], nnz=2**60), (2**30, 2**30)),
        # 2^40 rows, no nonzeros
        (pack_chunk(n_rows=2**40, n_cols=16, counts=[0], deltas=[], value_bits=[], nnz=0), (2**40, 16)),
        # the largest n_cols, one row
        (pack_chunk(n_rows=1, n_cols=2**32 - 1, counts=[0], deltas=[], value_bits=[], nnz=2**33), (1, 2**32 - 1)),
    ]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        for data, shape in claims:
            assert len(data) < 64
            for decode in _decoders(data, shape):
                with pytest.raises(CorruptChunkError):
                    decode()
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"decoding a lying header allocated {peak} bytes"
    assert elapsed < 1.0


@st.composite
def mutated_chunks(draw) -> tuple[bytes, bytes]:
    value_dtype = draw(st.sampled_from(VALUE_DTYPES))
    base = draw(st.sampled_from(["small", "wide", "empty"]))
    if base == "small":
        x = SMALL
    elif base == "wide":
        x = np.zeros((2, 70000), np.float32)
        x[0, [3, 65535, 69999]] = [1.0, -2.0, 0.5]
        x[1, 0] = 7.0
    else:
        x = np.zeros((2, 3), np.float32)
    enc = sparse_coo.encode_dense(x, value_dtype)
    data = bytearray(enc)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "set", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return enc, bytes(data)


@settings(FAST, max_examples=500)
@given(mutated_chunks())
def test_mutated_bytes_raise_corrupt_or_decode_canonically(case):
    """Flipped, cut or inserted bytes: CorruptChunkError, or a valid chunk that re-encodes to the
    very same bytes (the format has one encoding per chunk)."""
    _, data = case
    try:
        header, rows, cols, values = sparse_coo.decode_rows(data)
    except CorruptChunkError:
        return
    assert rows.size == cols.size == values.size == header.nnz
    assert (cols < header.n_cols).all() and np.isfinite(values).all() and (values != 0).all()
    linear = rows * header.n_cols + cols
    assert (np.diff(linear) > 0).all()
    assert sparse_coo.encode_rows(header.n_rows, header.n_cols, rows, cols, values, header.value_dtype) == data


# --------------------------------------------------------------------------------------------
# The zarr v3 codec
# --------------------------------------------------------------------------------------------

def _zarr_array(shape, chunks, *, dtype="float32", value_dtype="float32", store=None, **kw) -> zarr.Array:
    return zarr.create_array(store if store is not None else MemoryStore(), shape=shape, chunks=chunks, dtype=dtype,
                             fill_value=0.0, serializer=SparseCOOCodec(value_dtype=value_dtype),
                             compressors=[ZstdCodec(level=3), Crc32cCodec()], **kw)


def _raw_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> bytes | None:
    """The sparse_coo bytes of one stored chunk (after undoing crc32c and zstd), or None if absent."""
    raw = chunkio.read_chunk(arr, coords)
    return None if raw is None else bytes(raw)


@st.composite
def zarr_cases(draw):
    array_dtype, value_dtype = draw(st.sampled_from([
        ("float32", "float32"), ("float32", "float16"), ("float32", "bfloat16"),
        ("float16", "float16"), ("float16", "float32"),
    ]))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(0 if i < ndim - 1 else 1, 7 if ndim < 4 else 4)) for i in range(ndim))
    chunks = tuple(draw(st.integers(1, max(n, 1))) for n in shape)  # edge chunks when n % c != 0
    limit = min(MAX_FOR[value_dtype], F16_MAX if array_dtype == "float16" else F32_MAX)
    elements = st.floats(-limit, limit, width=16 if array_dtype == "float16" else 32)
    values = draw(arrays(np.dtype(array_dtype), shape, elements=elements))
    density = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    mask = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(shape) < density
    return array_dtype, value_dtype, chunks, np.where(mask, values, values.dtype.type(0))


@settings(FAST, max_examples=100)
@given(zarr_cases())
def test_zarr_round_trip(case):
    array_dtype, value_dtype, chunks, x = case
    arr = _zarr_array(x.shape, chunks, dtype=array_dtype, value_dtype=value_dtype)
    arr[...] = x
    got = arr[...]
    assert got.dtype == np.dtype(array_dtype) and got.shape == x.shape
    assert_within_bound(x, got, value_dtype)
    # every stored chunk is the encoding of the full chunk (edge chunks padded with 0.0); chunks
    # that store no value are absent (PROTOCOL.md §6)
    for coords in np.ndindex(*(math.ceil(n / c) for n, c in zip(x.shape, chunks, strict=True))):
        raw = _raw_chunk(arr, coords)
        sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, chunks, x.shape, strict=True))
        block = np.zeros(chunks, dtype=array_dtype)
        block[tuple(slice(0, s.stop - s.start) for s in sel)] = x[sel]
        want = sparse_coo.encode_dense(block, value_dtype)
        assert raw == (want if sparse_coo.read_header(want).nnz else None)


def test_zarr_edge_chunks_and_negative_zero_on_disk(tmp_path):
    x = np.zeros((5, 7, 33), np.float32)
    x[4, 6, 32] = 1.25  # only in the last (edge) chunk
    x[0, 0, 0] = -0.0
    x[1, 2, [0, 5, 31]] = [-0.0, 3.0, -7.5]
    x[2, 3, 20] = -0.0  # the only value of chunk (1, 1, 1)
    arr = _zarr_array(x.shape, (2, 3, 16), store=zarr.storage.LocalStore(tmp_path / "a.zarr"))
    arr[...] = x
    got = arr[...]
    np.testing.assert_array_equal(got, x)
    assert not np.signbit(got[got == 0]).any()
    minus_zero_only = _raw_chunk(arr, (1, 1, 1))  # absence is checked by the next test
    assert minus_zero_only is None or sparse_coo.read_header(minus_zero_only).nnz == 0
    assert _raw_chunk(arr, (0, 0, 0)) == sparse_coo.encode_dense(np.where(x[:2, :3, :16] == 0, 0, x[:2, :3, :16]))
    raw = _raw_chunk(arr, (2, 2, 2))
    edge = np.zeros((2, 3, 16), np.float32)
    edge[0, 0, 0] = 1.25
    assert raw == sparse_coo.encode_dense(edge)
    assert sparse_coo.read_header(raw).n_rows == 6


@pytest.mark.parametrize(("value", "value_dtype"), [(-0.0, "float32"), (-0.0, "bfloat16"), (1e-9, "float16"),
                                                   (2.0**-140, "bfloat16")])
def test_zarr_chunk_that_stores_no_value_is_absent(value, value_dtype):
    """BUG (see report): PROTOCOL.md §6 says a chunk of zeros is absent and the sparse writer's
    bytes equal the pipeline's. The writer deletes chunks with nnz 0, but zarr compares the fill
    value bitwise, so a chunk of -0.0 (or of values that underflow in value_dtype) goes through the
    codec and is stored as an nnz-0 chunk."""
    arr = _zarr_array((2, 8), (1, 4), value_dtype=value_dtype)
    x = np.zeros((2, 8), np.float32)
    x[0, 1] = value  # chunk (0, 0): nothing survives encoding
    x[1, 6] = 3.0    # chunk (1, 1): one value
    arr[...] = x
    np.testing.assert_array_equal(arr[...], np.where(np.abs(x) < 1e-6, 0.0, x))
    assert _raw_chunk(arr, (1, 1)) is not None
    assert _raw_chunk(arr, (0, 0)) is None, "an nnz-0 chunk was stored; the sparse writer would delete it"


def test_zarr_surfaces_corrupt_payloads_as_corrupt_chunk_error():
    """A payload that passes crc32c and zstd but breaks the format reaches the user as CorruptChunkError."""
    arr = _zarr_array((3, 5), (3, 5))
    arr[...] = SMALL
    one = _f32_bits(1.0)
    bad = pack_chunk(n_rows=3, n_cols=5, counts=[2, 0, 0], deltas=[1, 0], value_bits=[one, one])
    chunkio.write_chunk(arr, (0, 0), bad)
    with pytest.raises(CorruptChunkError, match="strictly increasing"):
        arr[...]
    chunkio.write_chunk(arr, (0, 0), sparse_coo.encode_dense(np.ones((5, 3), np.float32)))
    with pytest.raises(CorruptChunkError, match="expected 3x5"):
        arr[...]


@pytest.mark.parametrize("fill", [np.nan, 1.0, -0.0])
def test_zarr_refuses_fill_values_other_than_zero(fill):
    with pytest.raises(ValueError, match="fill_value 0.0"):
        zarr.create_array(MemoryStore(), shape=(4, 4), chunks=(2, 4), dtype="float32", fill_value=fill,
                          serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3), Crc32cCodec()])


def test_xarray_default_nan_fill_is_refused_and_zero_fill_works(tmp_path):
    import xarray as xr

    ds = xr.Dataset({"acts": (("tok", "feature"), np.where(np.eye(3, 4) > 0, 2.5, 0.0).astype(np.float32))})
    encoding = {"serializer": SparseCOOCodec(), "compressors": [ZstdCodec(level=3), Crc32cCodec()]}
    with pytest.raises(ValueError, match="fill_value 0.0"):
        ds.to_zarr(tmp_path / "nan.zarr", zarr_format=3, consolidated=False, encoding={"acts": encoding})
    ds.to_zarr(tmp_path / "ok.zarr", zarr_format=3, consolidated=False,
               encoding={"acts": {**encoding, "fill_value": 0.0}})
    back = xr.open_zarr(tmp_path / "ok.zarr", consolidated=False)
    np.testing.assert_array_equal(back["acts"].values, ds["acts"].values)


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool", "complex64"])
def test_zarr_refuses_non_float_dtypes(dtype):
    with pytest.raises(ValueError, match="stores float arrays"):
        zarr.create_array(MemoryStore(), shape=(4, 4), chunks=(2, 4), dtype=dtype, fill_value=0,
                          serializer=SparseCOOCodec(), compressors=[ZstdCodec(level=3)])


def test_float64_array_is_refused_or_exact():
    """BUG (see report): float64 arrays are accepted but silently rounded to float32 (and tiny
    values dropped). The codec must either refuse float64 or store it exactly."""
    x = np.array([0.1, 1e-50, 1 + 2.0**-40, 3.0], np.float64)
    try:
        arr = _zarr_array((4,), (4,), dtype="float64")
    except ValueError as e:
        assert "float" in str(e)
        return
    arr[...] = x
    np.testing.assert_array_equal(arr[...], x)


@pytest.mark.parametrize("value", [65504.0, 65408.0, -65440.0])
def test_float16_array_with_bfloat16_values_never_decodes_to_inf(value):
    """BUG (see report): a finite float16 value near 65504 rounds in bfloat16 to 65536, which
    decodes to inf in a float16 array. The codec must refuse the combination (or the value)."""
    try:
        arr = _zarr_array((2,), (2,), dtype="float16", value_dtype="bfloat16")
    except ValueError as e:
        assert "bfloat16" in str(e)
        return
    x = np.array([value, 1.0], np.float16)
    try:
        arr[...] = x
    except CodecEncodeError:
        return
    assert np.isfinite(arr[...]).all(), f"wrote finite {x}, read back {arr[...]}"


def test_codec_config_round_trip_and_schema():
    for vd in VALUE_DTYPES:
        codec = SparseCOOCodec(value_dtype=vd)
        d = codec.to_dict()
        assert d == {"name": CODEC_NAME, "configuration": {"value_dtype": vd}}
        protocol.validate_json(d, "sparse_coo_codec")
        assert SparseCOOCodec.from_dict(d) == codec
        arr = _zarr_array((2, 3), (2, 3), value_dtype=vd)
        stored = arr.metadata.to_dict()["codecs"]
        assert stored[0] == d and [c["name"] for c in stored] == [CODEC_NAME, "zstd", "crc32c"]
        protocol.validate_json(stored[0], "sparse_coo_codec")
    assert SparseCOOCodec.from_dict({"name": CODEC_NAME}) == SparseCOOCodec()
    schema_enum = protocol.load_schema("sparse_coo_codec")["properties"]["configuration"]["properties"][
        "value_dtype"]["enum"]
    assert sorted(schema_enum) == sorted(sparse_coo.VALUE_DTYPES) == sorted(VALUE_DTYPES)
    for bad in [{"name": CODEC_NAME, "configuration": {"value_dtype": "float64"}},
                {"name": CODEC_NAME, "configuration": {"value_dtype": "float32", "level": 3}},
                {"name": "sparse_coo", "configuration": {"value_dtype": "float32"}},
                {"name": CODEC_NAME}]:
        with pytest.raises(ProtocolError):
            protocol.validate_json(bad, "sparse_coo_codec")
    with pytest.raises(ValueError, match="value_dtype"):
        SparseCOOCodec(value_dtype="float64")
    with pytest.raises(ValueError, match="unknown configuration keys"):
        SparseCOOCodec.from_dict({"name": CODEC_NAME, "configuration": {"value_dtype": "float32", "level": 3}})
    with pytest.raises(ValueError, match="expected codec name"):
        SparseCOOCodec.from_dict({"name": "bytes", "configuration": {}})


# --------------------------------------------------------------------------------------------
# The numcodecs codec
# --------------------------------------------------------------------------------------------

@settings(FAST, max_examples=100)
@given(data=st.data(), value_dtype=st.sampled_from(VALUE_DTYPES))
def test_numcodec_round_trip(data, value_dtype):
    x = data.draw(dense_chunks(value_dtype, min_lead=1, max_dims=2))
    x2 = x.reshape(-1, x.shape[-1])
    codec = numcodecs.get_codec({"id": CODEC_NAME, "n_cols": x.shape[-1], "value_dtype": value_dtype})
    assert isinstance(codec, SparseCOONumcodec)
    assert numcodecs.get_codec(codec.get_config()).get_config() == codec.get_config()
    enc = codec.encode(x)
    assert enc == sparse_coo.encode_dense(x2, value_dtype)
    got = codec.decode(enc)
    assert got.dtype == np.float32 and got.shape == (x.size,)
    assert_within_bound(x.ravel(), got, value_dtype)
    out = np.full(x.size, 9.0, np.float32)
    codec.decode(np.frombuffer(enc, np.uint8), out=out)
    np.testing.assert_array_equal(out, got)


def test_numcodec_refuses_ragged_and_non_float():
    codec = SparseCOONumcodec(n_cols=4)
    with pytest.raises(CodecEncodeError, match="whole number of 4-wide rows"):
        codec.encode(np.ones(6, np.float32))
    with pytest.raises(CodecEncodeError, match="float"):
        codec.encode(np.ones(8, np.int32))
    with pytest.raises(ValueError, match="value_dtype"):
        SparseCOONumcodec(n_cols=4, value_dtype="float8")


@pytest.mark.parametrize("n_cols", [0, -3, 2**32])
def test_numcodec_refuses_bad_n_cols(n_cols):
    """BUG (see report): n_cols=0 is accepted and encode dies with ZeroDivisionError."""
    with pytest.raises(ValueError, match="n_cols"):
        codec = SparseCOONumcodec(n_cols=n_cols)
        codec.encode(np.ones(8, np.float32))


# --------------------------------------------------------------------------------------------
# Frozen test vectors (tests/make_codec_fixtures.py wrote them once; never regenerate)
# --------------------------------------------------------------------------------------------

FIXTURE_IDS = sorted(p.name.split(".")[1] for p in FIXTURE_PATH.glob("array.*.npy"))


def test_fixture_folder_is_complete_and_small():
    assert len(FIXTURE_IDS) >= 8
    for stem, ext in [("config", "json"), ("encoded", "dat")]:
        assert sorted(p.name.split(".")[1] for p in FIXTURE_PATH.glob(f"{stem}.*.{ext}")) == FIXTURE_IDS
    assert sum(p.stat().st_size for p in FIXTURE_PATH.iterdir()) < 220_000


@pytest.mark.parametrize("nn", FIXTURE_IDS)
def test_frozen_vector(nn):
    array = np.load(FIXTURE_PATH / f"array.{nn}.npy", allow_pickle=False)
    config = json.loads((FIXTURE_PATH / f"config.{nn}.json").read_text(encoding="utf-8"))
    encoded = (FIXTURE_PATH / f"encoded.{nn}.dat").read_bytes()
    protocol.validate_json(config["codec"], "sparse_coo_codec")
    assert config["format_version"] == sparse_coo.FORMAT_VERSION == encoded[4]
    assert tuple(config["chunk_shape"]) == array.shape and config["array_dtype"] == array.dtype.name
    value_dtype = config["codec"]["configuration"]["value_dtype"]
    shape = array.shape
    # encoding reproduces the frozen bytes, and so does the spec's reference encoder
    assert sparse_coo.encode_dense(array, value_dtype) == encoded
    assert spec_encode(array, value_dtype) == encoded
    header = sparse_coo.read_header(encoded)
    assert (header.n_rows, header.n_cols, header.nnz) == (math.prod(shape[:-1]), shape[-1], config["nnz"])
    # decoding gives the array with the value dtype's rounding
    want = ref_round(array, value_dtype)
    got = sparse_coo.decode_dense(encoded, shape, array.dtype)
    np.testing.assert_array_equal(got, want.astype(array.dtype))
    assert_within_bound(array, got, value_dtype)
    codec = SparseCOONumcodec(n_cols=shape[-1], value_dtype=value_dtype)
    assert codec.encode(array) == encoded
    np.testing.assert_array_equal(codec.decode(encoded), want.ravel())
    # the zarr pipeline stores the same bytes (under zstd and crc32c) and reads the array back
    arr = _zarr_array(shape, shape, dtype=array.dtype.name, value_dtype=value_dtype)
    arr[...] = array
    assert _raw_chunk(arr, (0,) * array.ndim) == (encoded if header.nnz else None)
    np.testing.assert_array_equal(arr[...], want.astype(array.dtype))


# --------------------------------------------------------------------------------------------
# Fresh processes find the codec through entry points, without importing saestore
# --------------------------------------------------------------------------------------------

def _run_fresh(code: str, *args: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_process_opens_store_via_zarr_codecs_entry_point(tmp_path):
    rng = np.random.default_rng(3)
    x = np.where(rng.random((3, 10, 40)) < 0.1, rng.lognormal(size=(3, 10, 40)), 0.0).astype(np.float32)
    path = tmp_path / "fresh.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3)
    expected = {}
    for name, vd in [("acts", "float32"), ("acts_bf16", "bfloat16")]:
        arr = group.create_array(name, shape=x.shape, chunks=(2, 10, 16), dtype="float32", fill_value=0.0,
                                 dimension_names=["doc", "tok", "feature"], serializer=SparseCOOCodec(value_dtype=vd),
                                 compressors=[ZstdCodec(level=3), Crc32cCodec()])
        arr[...] = x
        expected[name] = hashlib.sha256(np.ascontiguousarray(ref_round(x, vd)).tobytes()).hexdigest()
    zarr.consolidate_metadata(path)
    child = """
        import hashlib, json, sys
        import numpy as np, xarray as xr, zarr
        before = "saestore" not in sys.modules
        print(f"saestore not in sys.modules before reading: {before}", flush=True)
        path = sys.argv[1]
        ds = xr.open_zarr(path)
        out = {"before": before}
        for name in ["acts", "acts_bf16"]:
            via_xr = np.ascontiguousarray(ds[name].values)
            via_zarr = zarr.open_array(path, path=name, mode="r")[...]
            out[name] = [hashlib.sha256(via_xr.tobytes()).hexdigest(), hashlib.sha256(via_zarr.tobytes()).hexdigest()]
        out["codec_module"] = type(zarr.open_array(path, path="acts", mode="r").serializer).__module__
        print(json.dumps(out))
    """
    out = _run_fresh(child, str(path), cwd=tmp_path)
    assert out["before"] is True
    assert out["codec_module"] == "saestore.codec"
    for name, digest in expected.items():
        assert out[name] == [digest, digest]


def test_fresh_process_gets_numcodec_via_entry_point(tmp_path):
    x = np.zeros((4, 16), np.float32)
    x[[0, 2, 3], [15, 0, 7]] = [1.0, -2.0, 0.5]
    encoded = SparseCOONumcodec(n_cols=16).encode(x)
    child = """
        import json, sys
        before = "saestore" not in sys.modules
        print(f"saestore not in sys.modules before get_codec: {before}", flush=True)
        import numcodecs, numpy as np
        codec = numcodecs.get_codec({"id": "saestore.sparse_coo", "n_cols": 16})
        got = codec.decode(bytes.fromhex(sys.argv[1]))
        print(json.dumps({"before": before, "cls": f"{type(codec).__module__}.{type(codec).__name__}",
                          "values": got.tolist(), "config": codec.get_config()}))
    """
    out = _run_fresh(child, encoded.hex(), cwd=tmp_path)
    assert out["before"] is True
    assert out["cls"] == "saestore.codec.SparseCOONumcodec"
    assert out["config"] == {"id": CODEC_NAME, "n_cols": 16, "value_dtype": "float32"}
    assert out["values"] == x.ravel().tolist()


# --------------------------------------------------------------------------------------------
# The synthetic workload of the codec benchmark (saestore.bench.synthetic)
# --------------------------------------------------------------------------------------------

def test_synthetic_sae_chunk_is_sae_like_deterministic_and_fast():
    from saestore.bench.synthetic import synthetic_sae_chunk

    start = time.perf_counter()
    chunk = synthetic_sae_chunk()
    assert time.perf_counter() - start < 2.0
    assert chunk.shape == (4, 1024, 16384)
    valid = chunk.valid_DT
    assert abs((1 - valid.mean()) - 0.49) < 0.01
    assert (valid[:, :1]).all() and not (np.diff(valid.astype(int), axis=1) > 0).any()  # right padding
    k = chunk.active_per_token()
    assert (k[~valid] == 0).all()
    assert 65 < k[valid].mean() < 75
    linear = chunk.rows * chunk.n_features + chunk.feature
    assert (np.diff(linear) > 0).all() and chunk.values.dtype == np.float32 and (chunk.values > 0).all()
    density = np.bincount(chunk.feature, minlength=chunk.n_features) / valid.sum()
    assert (density > 0.5).sum() >= 3 and np.median(density) < 0.01  # a few hot features, a long tail
    again = synthetic_sae_chunk()
    assert np.array_equal(again.feature, chunk.feature) and np.array_equal(again.values, chunk.values)
    assert not np.array_equal(synthetic_sae_chunk(seed=1).feature[:100], chunk.feature[:100])


def test_synthetic_run_data_fits_a_layout():
    from saestore.bench.synthetic import synthetic_run_data
    from saestore.writer import RunLayout

    storage = protocol.StorageInfo(format="sparse", value_dtype="float32", chunk_docs=2)
    layout = RunLayout(authors=("a", "b"), n_docs=(3, 1), n_tok=32, layer_types=("res", "att"), layers=(0, 2),
                       n_features=64, storage=storage)
    units = list(synthetic_run_data(layout, l0=5, pad_frac=0.3, seed=4))
    assert [(a, c) for a, c, _ in units] == [(0, 0), (0, 1), (1, 0)]
    for a, c, data in units:
        n_d = len(layout.chunk_docs_range(a, c))
        assert data.valid_DT.shape == (n_d, 32) and set(data.acts) == {("res", 0), ("res", 2), ("att", 0), ("att", 2)}
        assert (data.doc_length_D == data.valid_DT.sum(1)).all()
        for acts in data.acts.values():
            assert data.valid_DT[acts.doc, acts.tok].all() and (acts.feature < 64).all()
    assert [d.token_id_DT.tolist() for *_, d in synthetic_run_data(layout, l0=5, pad_frac=0.3, seed=4)] == \
        [d.token_id_DT.tolist() for *_, d in units]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), value_dtype=st.sampled_from(VALUE_DTYPES))
def test_the_fused_walk_agrees_with_decoding(data, value_dtype):
    """``accumulate`` (read, decode and reduce in one pass) adds exactly the §2.8 summary that
    ``nonzeros.summarize`` computes from the decoded chunk, for any feature selection; and
    ``decode_selected`` keeps exactly the selected nonzeros of ``decode_rows``."""
    from saestore.nonzeros import SparseActs, summarize

    n_rows, n_cols = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 40))
    dense = data.draw(arrays(np.float32, (n_rows, n_cols), elements=st.sampled_from(
        [0.0, 0.0, 0.0, 1.0, -2.5, 3e-3, 7.25, 1e-30, -0.0, 65000.0])))
    enc = sparse_coo.encode_dense(dense, value_dtype)
    _, rows, cols, values = sparse_coo.decode_rows(enc)
    want = summarize(SparseActs(rows=rows, cols=cols, values=values, shape=(1, n_rows, n_cols)))
    acc = np.zeros((n_cols, 4))
    sparse_coo.accumulate(enc, acc, np.arange(n_cols))
    np.testing.assert_array_equal(acc, want)
    chosen = np.asarray(data.draw(st.lists(st.integers(0, n_cols - 1), unique=True)), dtype=np.int64)
    fmap = np.full(n_cols, -1, dtype=np.int64)
    fmap[chosen] = np.arange(chosen.size)
    acc = np.zeros((chosen.size, 4))
    sparse_coo.accumulate(enc, acc, fmap)
    np.testing.assert_array_equal(acc, want[chosen])
    _, r2, c2, v2 = sparse_coo.decode_selected(enc, fmap)
    keep = fmap[cols] >= 0
    np.testing.assert_array_equal(r2, rows[keep])
    np.testing.assert_array_equal(c2, fmap[cols[keep]])
    np.testing.assert_array_equal(v2, values[keep])


def test_accumulate_adds_chunk_after_chunk():
    """Two chunks into one accumulator: counts and sums add, max is the larger, a feature seen first
    in the second chunk takes its max from there (not from the 0 it started at)."""
    a = np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], np.float32)
    b = np.array([[0.5, -3.0, 0.0]], np.float32)
    acc = np.zeros((3, 4))
    for chunk in (a, b):
        sparse_coo.accumulate(sparse_coo.encode_dense(chunk), acc, np.arange(3))
    np.testing.assert_array_equal(acc, [[3, 3.5, 2.0, 5.25], [1, -3.0, -3.0, 9.0], [0, 0, 0, 0]])
