"""The ``saestore.sparse_coo`` byte format (PROTOCOL.md, section "Codec"): numpy to encode, one
numba-compiled walk to decode.

A chunk of shape ``(..., n_cols)`` is viewed as a row-major matrix of ``n_rows = prod(shape[:-1])``
rows and ``n_cols = shape[-1]`` columns (for SAE variables: one row per token, one column per
feature). Only nonzeros are stored:

``header (32 B) | row counts (u32 × n_rows) | column deltas (u16|u32 × nnz) | values (f32|f16|bf16 × nnz)``

Every section after the header is byte-shuffled (all first bytes, then all second bytes, ...),
which lets a following zstd see long runs of zero high bytes. Everything is little-endian.

Both the zarr codec and the numcodecs codec (:mod:`saestore.codec`), the run writer (which encodes
straight from GPU-side nonzeros) and the sparse dask reader use these functions, so there is
exactly one implementation of the format.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

import numba
import numpy as np

from saestore.errors import CodecEncodeError, CorruptChunkError, SaestoreError

MAGIC: Final = b"SCOO"
FORMAT_VERSION: Final = 1
HEADER = struct.Struct("<4sBBBBQII Q")  # magic, version, value code, index width, flags, n_rows, n_cols, reserved, nnz
HEADER_SIZE: Final = HEADER.size  # 32
COUNT_DTYPE: Final = np.dtype("<u4")
MAX_COLS: Final = 2**32 - 1

#: value dtype name -> (code in the header, bytes per value)
VALUE_DTYPES: Final = {"float32": (0, 4), "float16": (1, 2), "bfloat16": (2, 2)}
_VALUE_NAMES: Final = {code: name for name, (code, _) in VALUE_DTYPES.items()}
#: the largest finite value of each lossy value dtype (values up to the rounding midpoint above it round down to it)
_MAX_FINITE: Final = {"float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895313892515355e38}


def index_width(n_cols: int) -> int:
    """Bytes per stored column delta: 2 when every column id fits in uint16, else 4."""
    return 2 if n_cols <= 2**16 else 4


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed 32-byte header of one encoded chunk."""

    value_dtype: str
    index_width: int
    n_rows: int
    n_cols: int
    nnz: int

    def payload_size(self) -> int:
        """Exact length in bytes of a chunk with this header (header included)."""
        value_width = VALUE_DTYPES[self.value_dtype][1]
        return HEADER_SIZE + COUNT_DTYPE.itemsize * self.n_rows + self.nnz * (self.index_width + value_width)


def max_chunk_size(n_rows: int, n_cols: int) -> int:
    """The largest valid encoding of an ``n_rows`` x ``n_cols`` chunk, in bytes: every value stored,
    in the widest value type, so it bounds every ``value_dtype``. PROTOCOL.md §5.3: a reader bounds
    the zstd frame's declared content size by it before decompressing."""
    widest = max(VALUE_DTYPES, key=lambda name: VALUE_DTYPES[name][1])
    return Header(widest, index_width(n_cols), n_rows, n_cols, n_rows * n_cols).payload_size()


def _shuffle(a: np.ndarray) -> bytes:
    width = a.dtype.itemsize
    if width == 1 or a.size == 0:
        return a.tobytes()
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, width).T).tobytes()


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype("<u2")


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype("<u4") << 16).view("<f4")


def quantize(values: np.ndarray, value_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Cast float values to the stored dtype; return (stored array, values as read back in f32).

    Raises CodecEncodeError on NaN/inf, and on finite values whose rounding to ``value_dtype`` is
    infinite (PROTOCOL.md §5.3): float16 from |x| ≥ 65520, bfloat16 from |x| ≥ 2^128 − 2^119.
    Values between the largest finite value and that bound round down to it and are kept.
    """
    v32 = np.asarray(values, dtype=np.float32)
    if not np.isfinite(v32).all():
        bad = int(np.count_nonzero(~np.isfinite(v32)))
        raise CodecEncodeError(
            f"sparse_coo cannot store NaN or inf: {bad} of {v32.size} nonzero values are not finite; "
            "check the model/SAE output (e.g. run in float32) before storing"
        )
    if value_dtype == "float32":
        return v32.astype("<f4", copy=False), v32
    if value_dtype == "float16":
        with np.errstate(over="ignore"):
            stored = v32.astype("<f2")
        readback = stored.astype(np.float32)
    elif value_dtype == "bfloat16":
        stored = to_bfloat16_bits(v32)
        readback = from_bfloat16_bits(stored)
    else:
        raise CodecEncodeError(f"unknown value_dtype {value_dtype!r}; choose one of {sorted(VALUE_DTYPES)}")
    overflow = np.isinf(readback)
    if overflow.any():
        peak = float(np.abs(v32[overflow]).max())
        raise CodecEncodeError(
            f"value {peak:g} overflows {value_dtype}: it rounds to inf (the largest finite value is "
            f"{_MAX_FINITE[value_dtype]:g}); store with value_dtype='float32'"
        )
    return stored, readback


def encode_rows(
    n_rows: int,
    n_cols: int,
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    value_dtype: str = "float32",
) -> bytes:
    """Encode a chunk given its nonzeros as (row, column, value) triples.

    ``rows``/``cols`` index the chunk viewed as ``(n_rows, n_cols)``; they MUST be in row-major
    order without duplicates (what ``torch.nonzero`` / ``np.nonzero`` return). Values that are zero
    (including -0.0) or that become zero in ``value_dtype`` are dropped, so the bytes equal what
    encoding the dense chunk gives.
    """
    if value_dtype not in VALUE_DTYPES:
        raise CodecEncodeError(f"unknown value_dtype {value_dtype!r}; choose one of {sorted(VALUE_DTYPES)}")
    if not 1 <= n_cols <= MAX_COLS:
        raise CodecEncodeError(f"sparse_coo needs 1 <= n_cols <= {MAX_COLS}, got {n_cols}")
    if n_rows < 0:
        raise CodecEncodeError(f"n_rows must be >= 0, got {n_rows}")
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = np.asarray(cols, dtype=np.int64).ravel()
    values = np.asarray(values).ravel()
    if not rows.size == cols.size == values.size:
        raise CodecEncodeError(
            f"rows, cols and values differ in length: {rows.size}, {cols.size}, {values.size}"
        )
    if rows.size:
        if rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_cols:
            raise CodecEncodeError(
                f"nonzero index out of range for a ({n_rows}, {n_cols}) chunk: "
                f"rows in [{rows.min()}, {rows.max()}], cols in [{cols.min()}, {cols.max()}]"
            )
        linear = rows * n_cols + cols
        if linear.size > 1 and not (np.diff(linear) > 0).all():
            raise CodecEncodeError("nonzeros must be in row-major order without duplicates")
    stored, readback = quantize(values, value_dtype)
    keep = readback != 0
    if not keep.all():
        rows, cols, stored = rows[keep], cols[keep], stored[keep]
    nnz = int(rows.size)
    counts = np.bincount(rows, minlength=n_rows).astype(COUNT_DTYPE) if n_rows else np.zeros(0, COUNT_DTYPE)
    width = index_width(n_cols)
    deltas = np.empty(nnz, dtype=np.int64)
    if nnz:
        deltas[0] = cols[0]
        deltas[1:] = np.diff(cols)
        # the first nonzero of every row is stored as its absolute column
        new_row = np.flatnonzero(np.diff(rows)) + 1
        deltas[new_row] = cols[new_row]
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, VALUE_DTYPES[value_dtype][0], width, 0, n_rows, n_cols, 0, nnz
    )
    parts = [
        header,
        _shuffle(counts),
        _shuffle(deltas.astype(f"<u{width}")),
        _shuffle(np.ascontiguousarray(stored)),
    ]
    return b"".join(parts)


def encode_dense(chunk: np.ndarray, value_dtype: str = "float32") -> bytes:
    """Encode a dense chunk; its last axis is the column (feature) axis."""
    if chunk.ndim < 1:
        raise CodecEncodeError("sparse_coo needs arrays with at least one dimension")
    if chunk.dtype.kind != "f":
        raise CodecEncodeError(f"sparse_coo stores floating-point arrays, got dtype {chunk.dtype}")
    n_cols = int(chunk.shape[-1])
    n_rows = math.prod(chunk.shape[:-1])
    flat = np.ascontiguousarray(chunk).reshape(-1)
    nonfinite = ~np.isfinite(flat)
    if nonfinite.any():
        raise CodecEncodeError(
            f"sparse_coo cannot store NaN or inf: {int(nonfinite.sum())} of {flat.size} values are not "
            "finite; check the model/SAE output before storing"
        )
    linear = np.flatnonzero(flat)
    if n_cols == 0:
        raise CodecEncodeError("sparse_coo needs a non-empty last axis")
    rows, cols = np.divmod(linear, n_cols)
    return encode_rows(n_rows, n_cols, rows, cols, flat[linear], value_dtype)


def read_header(data: bytes | memoryview) -> Header:
    """Parse and check the header and the total length; raise CorruptChunkError if inconsistent."""
    view = memoryview(data)
    if view.nbytes < HEADER_SIZE:
        raise CorruptChunkError(
            f"sparse_coo chunk is truncated: {view.nbytes} bytes, the header alone needs {HEADER_SIZE}"
        )
    magic, version, code, width, flags, n_rows, n_cols, reserved, nnz = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptChunkError(f"not a sparse_coo chunk: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptChunkError(
            f"sparse_coo chunk format version {version} is not supported (this saestore reads {FORMAT_VERSION}); "
            "upgrade saestore"
        )
    if code not in _VALUE_NAMES:
        raise CorruptChunkError(f"sparse_coo chunk has unknown value dtype code {code}")
    if flags != 0 or reserved != 0:
        raise CorruptChunkError(f"sparse_coo chunk has reserved bits set (flags={flags}, reserved={reserved})")
    if n_cols < 1 or width != index_width(n_cols):
        raise CorruptChunkError(f"sparse_coo chunk has index width {width} for {n_cols} columns")
    if nnz > n_rows * n_cols:
        raise CorruptChunkError(f"sparse_coo header claims {nnz} nonzeros in a {n_rows}x{n_cols} chunk")
    header = Header(_VALUE_NAMES[code], width, n_rows, n_cols, nnz)
    if view.nbytes != header.payload_size():
        raise CorruptChunkError(
            f"sparse_coo chunk length {view.nbytes} does not match its header "
            f"({n_rows} rows, {nnz} nonzeros => {header.payload_size()} bytes); the chunk is truncated or corrupt"
        )
    return header


# The one walk over a chunk's sections: unshuffles counts, column deltas and values straight from the
# decompressed bytes, checks every invariant, and either writes (row, col, value) triples or adds
# each value into per-feature (count, sum, max, sum of squares) -- read, decode and reduce in one
# pass, with no intermediate array per section. Compiled once per machine (numba's cache).
_OK, _BAD_COUNTS, _UNSORTED, _COL_RANGE, _BAD_VALUE = 0, 1, 2, 3, 4


@numba.njit(cache=True, nogil=True, inline="always")
def _u16(buf: np.ndarray, start: int, n: int, i: int) -> int:
    """Element ``i`` of a shuffled little-endian uint16 section of ``n`` elements at ``start``."""
    return int(buf[start + i]) | int(buf[start + n + i]) << 8


@numba.njit(cache=True, nogil=True, inline="always")
def _u32(buf: np.ndarray, start: int, n: int, i: int) -> int:
    """Element ``i`` of a shuffled little-endian uint32 section of ``n`` elements at ``start``."""
    return (int(buf[start + i]) | int(buf[start + n + i]) << 8 | int(buf[start + 2 * n + i]) << 16
            | int(buf[start + 3 * n + i]) << 24)


@numba.njit(cache=True, nogil=True, inline="always")
def _half_to_float(h: int) -> float:
    e, m = (h >> 10) & 0x1F, h & 0x3FF
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1.0 + m / 1024.0) * 2.0 ** (e - 15)
    return -v if h >> 15 else v


@numba.njit(cache=True, nogil=True)
def _walk(buf: np.ndarray, n_rows: int, n_cols: int, nnz: int, width: int, code: int, fmap: np.ndarray,
          rows: np.ndarray, cols: np.ndarray, values: np.ndarray, acc: np.ndarray, detail: np.ndarray) -> int:
    pc = 32  # HEADER_SIZE
    pd = pc + 4 * n_rows
    pv = pd + width * nnz
    total = 0
    for r in range(n_rows):
        c = _u32(buf, pc, n_rows, r)
        if c > n_cols:
            detail[0] = -1
            return _BAD_COUNTS
        total += c
    if total != nnz:
        detail[0] = total
        return _BAD_COUNTS
    decode, reduce = cols.size > 0, acc.shape[0] > 0
    select = decode and fmap.size > 0
    kept = 0
    tmp = np.empty(1, dtype=np.uint32)
    tmp_f = tmp.view(np.float32)
    k = 0
    for r in range(n_rows):
        c = _u32(buf, pc, n_rows, r)
        col = np.int64(0)
        for j in range(c):
            if width == 2:
                d = np.int64(_u16(buf, pd, nnz, k))
            else:
                d = np.int64(_u32(buf, pd, nnz, k))
            if j == 0:
                col = d
            elif d == 0:
                return _UNSORTED
            else:
                col += d
            if col >= n_cols:
                detail[0] = col
                return _COL_RANGE
            if code == 0:
                tmp[0] = _u32(buf, pv, nnz, k)
                v = tmp_f[0]
            elif code == 2:
                tmp[0] = _u16(buf, pv, nnz, k) << 16
                v = tmp_f[0]
            else:
                v = np.float32(_half_to_float(_u16(buf, pv, nnz, k)))
            if v == 0 or not np.isfinite(v):
                return _BAD_VALUE
            if decode:
                if select:
                    g = fmap[col]
                    if g >= 0:
                        rows[kept], cols[kept], values[kept] = r, g, v
                        kept += 1
                else:
                    rows[k], cols[k], values[k] = r, col, v
            if reduce:
                g = fmap[col]
                if g >= 0:
                    x = np.float64(v)
                    acc[g, 0] += 1.0
                    acc[g, 1] += x
                    if acc[g, 0] == 1.0 or x > acc[g, 2]:
                        acc[g, 2] = x
                    acc[g, 3] += x * x
            k += 1
    detail[1] = kept if select else nnz
    return _OK


_NO_FMAP: Final = np.zeros(0, dtype=np.int64)
_NO_ACC: Final = np.zeros((0, 4), dtype=np.float64)
_NO_INT: Final = np.zeros(0, dtype=np.int64)
_NO_F32: Final = np.zeros(0, dtype=np.float32)


def _checked_header(data: bytes | memoryview, n_rows: int | None, n_cols: int | None,
                    value_dtype: str | None) -> Header:
    header = read_header(data)
    if n_rows is not None and header.n_rows != n_rows or n_cols is not None and header.n_cols != n_cols:
        raise CorruptChunkError(
            f"sparse_coo chunk is {header.n_rows}x{header.n_cols}, expected {n_rows}x{n_cols}"
        )
    if value_dtype is not None and header.value_dtype != value_dtype:
        raise CorruptChunkError(
            f"sparse_coo chunk stores {header.value_dtype} values (code {VALUE_DTYPES[header.value_dtype][0]}) "
            f"but the codec configuration says value_dtype {value_dtype!r}; the chunk belongs to another array or is corrupt"
        )
    return header


def _run_walk(data: bytes | memoryview, header: Header, fmap: np.ndarray, rows: np.ndarray, cols: np.ndarray,
              values: np.ndarray, acc: np.ndarray) -> int:
    """Run :func:`_walk`; raise its error as one CorruptChunkError; return the nonzeros written."""
    buf = np.frombuffer(data, dtype=np.uint8)
    detail = np.zeros(2, dtype=np.int64)
    err = _walk(buf, header.n_rows, header.n_cols, header.nnz, header.index_width,
                VALUE_DTYPES[header.value_dtype][0], fmap, rows, cols, values, acc, detail)
    if err == _BAD_COUNTS:
        got = f"sum to {int(detail[0])}" if detail[0] >= 0 else f"exceed the {header.n_cols} columns"
        raise CorruptChunkError(f"sparse_coo row counts {got}, header says {header.nnz} nonzeros")
    if err == _UNSORTED:
        raise CorruptChunkError("sparse_coo columns are not strictly increasing within a row (duplicate or unsorted)")
    if err == _COL_RANGE:
        raise CorruptChunkError(
            f"sparse_coo column index {int(detail[0])} out of range for {header.n_cols} columns"
        )
    if err == _BAD_VALUE:
        raise CorruptChunkError("sparse_coo values contain NaN, inf or explicit zeros")
    return int(detail[1])


def decode_rows(
    data: bytes | memoryview, n_rows: int | None = None, n_cols: int | None = None, *,
    value_dtype: str | None = None,
) -> tuple[Header, np.ndarray, np.ndarray, np.ndarray]:
    """Decode to (header, rows int64, cols int64, values float32), in row-major order.

    ``n_rows``/``n_cols``, when given, are the chunk shape the caller expects, each checked on its
    own (a transposed header of the same size is corrupt); ``value_dtype``, when given, is the codec
    configuration's, which the header's value dtype code must match. A mismatch is a
    CorruptChunkError. Every invariant is checked: the header before any allocation, then counts,
    column range, strict ordering and the values (finite, nonzero).
    """
    return decode_selected(data, None, n_rows, n_cols, value_dtype=value_dtype)


def decode_selected(
    data: bytes | memoryview, fmap: np.ndarray | None, n_rows: int | None = None, n_cols: int | None = None, *,
    value_dtype: str | None = None,
) -> tuple[Header, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`decode_rows` keeping only the nonzeros of selected columns: column ``c`` is kept as
    ``fmap[c]`` (int64, one entry per column; negative: dropped). ``fmap`` None keeps every column
    as it is. The whole chunk is checked either way."""
    header = _checked_header(data, n_rows, n_cols, value_dtype)
    if fmap is not None and fmap.shape != (header.n_cols,):
        raise SaestoreError(f"decode_selected needs fmap of shape ({header.n_cols},), got {fmap.shape}")
    rows = np.empty(header.nnz, dtype=np.int64)
    cols = np.empty(header.nnz, dtype=np.int64)
    values = np.empty(header.nnz, dtype=np.float32)
    fm = _NO_FMAP if fmap is None else np.asarray(fmap, dtype=np.int64)
    n = _run_walk(data, header, fm, rows, cols, values, _NO_ACC)
    return header, rows[:n], cols[:n], values[:n]


def accumulate(data: bytes | memoryview, acc: np.ndarray, fmap: np.ndarray, n_rows: int | None = None,
               n_cols: int | None = None, *, value_dtype: str | None = None) -> Header:
    """Add one chunk into ``acc`` (float64 ``(F', 4)``: per selected feature the count, sum, max and
    sum of squares of its nonzeros, the §2.8 summaries' order) without materializing it: feature
    ``c`` goes to row ``fmap[c]`` (int64, one entry per column; negative: not selected). ``max``
    starts from the first value seen (a row whose count is still 0 holds no maximum). The same
    checks as :func:`decode_rows`; a corrupt chunk may have added part of its values."""
    header = _checked_header(data, n_rows, n_cols, value_dtype)
    if fmap.shape != (header.n_cols,) or acc.ndim != 2 or acc.shape[1] != 4 or acc.dtype != np.float64:
        raise SaestoreError(f"accumulate needs fmap of shape ({header.n_cols},) and a float64 (F', 4) acc")
    _run_walk(data, header, np.asarray(fmap, dtype=np.int64), _NO_INT, _NO_INT, _NO_F32, acc)
    return header


def decode_dense(data: bytes | memoryview, shape: tuple[int, ...], dtype: np.dtype | str = "float32", *,
                 value_dtype: str | None = None) -> np.ndarray:
    """Decode to a dense array of ``shape`` (last axis = columns); ``value_dtype`` as in :func:`decode_rows`."""
    n_cols = int(shape[-1])
    n_rows = math.prod(shape[:-1])
    _, rows, cols, values = decode_rows(data, n_rows, n_cols, value_dtype=value_dtype)
    out = np.zeros(n_rows * n_cols, dtype=dtype)
    out[rows * n_cols + cols] = values
    return out.reshape(shape)


def decode_coords(data: bytes | memoryview, shape: tuple[int, ...], *,
                  value_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode to (coords of shape (ndim, nnz), float32 values) in C order, ready for ``sparse.COO``;
    ``value_dtype`` as in :func:`decode_rows`."""
    n_cols = int(shape[-1])
    n_rows = math.prod(shape[:-1])
    _, rows, cols, values = decode_rows(data, n_rows, n_cols, value_dtype=value_dtype)
    coords = np.empty((len(shape), values.size), dtype=np.int64)
    coords[-1] = cols
    if len(shape) > 1:
        # leading coordinates are computed once per row, then gathered per nonzero; size-1 axes are 0
        per_row = np.unravel_index(np.arange(n_rows, dtype=np.int64), shape[:-1])
        for axis, size in enumerate(shape[:-1]):
            if size == 1:
                coords[axis] = 0
            else:
                np.take(per_row[axis], rows, out=coords[axis])
    return coords, values
