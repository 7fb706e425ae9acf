"""Mutation fuzzing of the sparse codec's decoder and of whole chunk files (sparse_coo → zstd → crc32c).

tests/test_codec.py fuzzes small hand-made chunks with hypothesis. Here a seeded mutator (flips,
cuts, inserts, header rewrites that keep the length consistent, section-aware edits, splices)
throws ~10^4 inputs at the decoders within a few seconds, and every input is held to three rules:

* the decoder returns a correct array (the one whose canonical encoding is exactly the input) or
  raises :class:`CorruptChunkError` — nothing else;
* it allocates at most a small multiple of the input plus the chunk it was asked for (tracemalloc);
* it takes bounded time (each input is timed; a watchdog dumps the stack and exits on a hang).

``SAESTORE_FUZZ_SCALE=100 pytest tests/test_fuzz.py -s`` runs 100x more (the figure reported in
the README was such a one-off run).
"""

from __future__ import annotations

import faulthandler
import math
import os
import random
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from saestore import chunkio, sparse_coo
from saestore.codec import SparseCOOCodec, SparseCOONumcodec
from saestore.errors import CorruptChunkError
from saestore.reader import read_sparse_chunk

SCALE = float(os.environ.get("SAESTORE_FUZZ_SCALE", "1"))
N_PAYLOADS = int(8500 * SCALE)
N_FILES = int(1500 * SCALE)
TIME_BOUND_S = 2.0  # per input: a hang guard; typical is 0.1-5 ms
FIGURES: dict[str, int] = {}


def _alloc_bound(n_input: int, n_dense: int = 0) -> int:
    """What one decode may allocate: a small multiple of its input, the dense chunk it was asked
    for, and a fixed allowance for numpy/zarr bookkeeping."""
    return 48 * n_input + 8 * n_dense + 256 * 1024


def _sae_like(rng: np.random.Generator, shape: tuple[int, ...], per_row: float, value_dtype: str) -> np.ndarray:
    x = np.zeros(shape, np.float32)
    rows = math.prod(shape[:-1])
    flat = x.reshape(rows, shape[-1])
    for r in range(rows):
        k = min(shape[-1], int(rng.poisson(per_row)))
        cols = rng.choice(shape[-1], size=k, replace=False)
        flat[r, cols] = rng.exponential(1.0, size=k).astype(np.float32) * rng.choice([1, -1], size=k)
    if value_dtype == "float16":
        x = np.clip(x, -60000, 60000)
    return x


def _seeds() -> list[tuple[bytes, tuple[int, ...]]]:
    rng = np.random.default_rng(0)
    out = []
    for value_dtype in ("float32", "float16", "bfloat16"):
        for shape, per_row in [((2, 31, 1024), 8.0), ((3, 5), 2.0), ((4, 70000), 3.0), ((7,), 3.0), ((2, 3), 0.0)]:
            x = _sae_like(rng, shape, per_row, value_dtype)
            out.append((sparse_coo.encode_dense(x, value_dtype), shape))
    return out


# --------------------------------------------------------------------------------------------
# the mutator
# --------------------------------------------------------------------------------------------

_FIELDS = {"version": (4, "B"), "code": (5, "B"), "width": (6, "B"), "flags": (7, "B"), "n_rows": (8, "Q"),
           "n_cols": (16, "I"), "reserved": (20, "I"), "nnz": (24, "Q")}
_INTERESTING = [0, 1, 2, 3, 4, 7, 255, 256, 65535, 65536, 65537, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
                2**63 - 1, 2**63, 2**64 - 1]


def _interesting(r: random.Random, original: int, fmt: str) -> int:
    limit = 2 ** (8 * struct.calcsize("<" + fmt)) - 1
    v = r.choice([*_INTERESTING, original - 1, original + 1, original * 2, original // 2, r.getrandbits(64)])
    return max(0, min(limit, v))


def _sections(data: bytes) -> tuple[sparse_coo.Header, list[np.ndarray]] | None:
    try:
        h = sparse_coo.read_header(data)
    except CorruptChunkError:
        return None
    v = sparse_coo.VALUE_DTYPES[h.value_dtype][1]
    pos = sparse_coo.HEADER_SIZE
    parts = []
    for n, w in ((h.n_rows, 4), (h.nnz, h.index_width), (h.nnz, v)):
        raw = np.frombuffer(data, np.uint8, n * w, pos).reshape(w, n).T.copy()
        parts.append(raw.view(f"<u{w}").reshape(n))
        pos += n * w
    return h, parts


def _join(data: bytes, parts: list[np.ndarray]) -> bytes:
    return data[: sparse_coo.HEADER_SIZE] + b"".join(
        np.ascontiguousarray(p.view(np.uint8).reshape(-1, p.dtype.itemsize).T).tobytes() for p in parts)


def mutate(r: random.Random, data: bytes, other: bytes) -> bytes:
    """One to three random mutations of an encoded chunk."""
    b = bytearray(data)
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        op = r.randrange(10)
        if op == 0 and b:  # bit flips
            for _ in range(r.randint(1, 4)):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        elif op == 1 and b:  # random bytes
            for _ in range(r.randint(1, 4)):
                b[r.randrange(len(b))] = r.randrange(256)
        elif op == 2:  # cut
            del b[r.randrange(len(b) + 1):]
        elif op == 3 and b:  # delete or insert a span
            i = r.randrange(len(b))
            if r.random() < 0.5:
                del b[i:i + r.randint(1, 16)]
            else:
                b[i:i] = r.randbytes(r.randint(1, 16))
        elif op == 4:  # append
            b += r.randbytes(r.randint(1, 64))
        elif op in (5, 6) and len(b) >= sparse_coo.HEADER_SIZE:  # a header field gets an interesting value
            name = r.choice(list(_FIELDS))
            off, fmt = _FIELDS[name]
            (orig,) = struct.unpack_from("<" + fmt, b, off)
            struct.pack_into("<" + fmt, b, off, _interesting(r, orig, fmt))
            if op == 6:  # ... and the length made consistent with the new header, to get past the length check
                _, _, code, width, _, n_rows, _, _, nnz = sparse_coo.HEADER.unpack_from(b, 0)
                size = sparse_coo.HEADER_SIZE + 4 * n_rows + (width + {1: 2, 2: 2}.get(code, 4)) * nnz
                if size < 4 * len(data) + 4096:
                    b = b[:size] + bytearray(r.randbytes(max(0, size - len(b))))
        elif op == 7:  # section-aware: one count, delta or value set to an edge value
            sec = _sections(bytes(b))
            if sec is not None and any(p.size for p in sec[1]):
                h, parts = sec
                p = r.choice([p for p in parts if p.size])
                i = r.randrange(p.size)
                top = int(np.iinfo(p.dtype).max)
                p[i] = r.choice([0, 1, int(p[i]) + 1, int(p[i]) - 1, top, r.randrange(top + 1),
                                 0x7FC0 if p.dtype.itemsize == 2 else 0x7FC00000,  # NaN
                                 0x7C00 if p.dtype.itemsize == 2 else 0x7F800000]) % (top + 1)  # inf
                b = bytearray(_join(bytes(b), parts))
        elif op == 8 and len(b) >= sparse_coo.HEADER_SIZE:  # splice: this header, another body
            b = b[: sparse_coo.HEADER_SIZE] + bytearray(other[sparse_coo.HEADER_SIZE:])
        elif op == 9:  # swap two counts (sum kept) or move a count
            sec = _sections(bytes(b))
            if sec is not None and sec[1][0].size >= 2:
                h, parts = sec
                i, j = r.randrange(parts[0].size), r.randrange(parts[0].size)
                parts[0][i], parts[0][j] = parts[0][j], parts[0][i]
                b = bytearray(_join(bytes(b), parts))
    return bytes(b)


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------

class Outcomes:
    def __init__(self) -> None:
        self.n = self.decoded = self.refused = 0
        self.max_seconds = 0.0
        self.max_ratio = 0.0

    def run(self, fn, n_input: int, n_dense: int = 0):
        """Run one decode under the time and allocation bounds; CorruptChunkError -> None."""
        result, seconds, peak = self._traced(fn)
        if peak > _alloc_bound(n_input, n_dense):  # tracemalloc also sees zarr's I/O thread: measure again
            peak = min(peak, self._traced(fn)[2])
        self.max_seconds = max(self.max_seconds, seconds)
        self.max_ratio = max(self.max_ratio, peak / _alloc_bound(n_input, n_dense))
        assert seconds < TIME_BOUND_S, f"decoding {n_input} bytes took {seconds:.3f}s"
        assert peak <= _alloc_bound(n_input, n_dense), f"decoding {n_input} bytes allocated {peak} bytes"
        return result


    @staticmethod
    def _traced(fn):
        tracemalloc.start()  # traced only while decoding: tracing everything costs 4x
        t0 = time.perf_counter()
        try:
            result = fn()
        except CorruptChunkError:
            result = None
        finally:
            seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return result, seconds, peak


def _check_payload(out: Outcomes, data: bytes, shape: tuple[int, ...]) -> None:
    """decode_rows / decode_dense / the numcodec on one input: a correct array or CorruptChunkError."""
    out.n += 1
    got = out.run(lambda: sparse_coo.decode_rows(data), len(data))
    dense = out.run(lambda: sparse_coo.decode_dense(data, shape), len(data), math.prod(shape))
    # the numcodec configured with the value dtype the header names (a mismatch is refused, §5.3)
    value_dtype = {0: "float32", 1: "float16", 2: "bfloat16"}.get(data[5] if len(data) > 5 else 0, "float32")
    numc = out.run(lambda: SparseCOONumcodec(n_cols=shape[-1], value_dtype=value_dtype).decode(data), len(data),
                   math.prod(shape))
    if got is None:
        assert dense is None and numc is None
        out.refused += 1
        return
    out.decoded += 1
    header, rows, cols, values = got
    # the decoded chunk is the one whose (unique) encoding is exactly these bytes
    assert sparse_coo.encode_rows(header.n_rows, header.n_cols, rows, cols, values, header.value_dtype) == data
    if dense is not None:
        want = np.zeros(math.prod(shape), np.float32)
        want[rows * shape[-1] + cols] = values
        np.testing.assert_array_equal(dense.reshape(-1), want)
        np.testing.assert_array_equal(numc, want)
    else:  # another shape than the caller expects: refused by the shape-checking decoders
        assert (header.n_rows, header.n_cols) != (math.prod(shape[:-1]), shape[-1])


@pytest.fixture(autouse=True)
def watchdog():
    """A hang anywhere in here dumps every thread's stack and ends the session instead of blocking CI."""
    faulthandler.dump_traceback_later(300 * max(1.0, SCALE), exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_mutated_payloads_decode_correctly_or_raise_typed_error_bounded():
    seeds = _seeds()
    r = random.Random(1)
    out = Outcomes()
    for data, shape in seeds:  # the seeds themselves decode
        _check_payload(out, data, shape)
    while out.n < N_PAYLOADS:
        data, shape = r.choice(seeds)
        _check_payload(out, mutate(r, data, r.choice(seeds)[0]), shape)
    assert out.refused > 0.5 * out.n and out.decoded > len(seeds)  # the mutator reaches both outcomes
    FIGURES["sparse_coo payloads"] = out.n
    print(f"\nfuzz payloads: {out.n} inputs, {out.decoded} decoded, {out.refused} refused; "
          f"max {out.max_seconds * 1e3:.2f} ms, max {out.max_ratio:.2f} of the allocation bound")


# --------------------------------------------------------------------------------------------
# whole chunk files: sparse_coo -> zstd -> crc32c, read by saestore's reader
# --------------------------------------------------------------------------------------------

def _store(tmp_path: Path) -> tuple[str, zarr.Array, list[bytes]]:
    """A small run-like array (SAE-shaped chunks); returns its path, array and stored chunk files."""
    path = str(tmp_path / "fuzz.zarr")
    arr = zarr.open_group(path, mode="w").create_array("res", shape=(2, 1, 2, 31, 1024), chunks=(1, 1, 2, 31, 1024), dtype="float32",
                            fill_value=0.0, serializer=SparseCOOCodec(), dimension_names=["author", "layer", "doc", "tok", "feature"],
                            compressors=[ZstdCodec(level=3), Crc32cCodec()])
    rng = np.random.default_rng(1)
    arr[...] = np.stack([_sae_like(rng, (1, 2, 31, 1024), 8.0, "float32") for _ in range(2)])
    files = [(Path(path) / f"res/c/{a}/0/0/0/0").read_bytes() for a in range(2)]
    return path, arr, files


def _crc(body: bytes) -> bytes:
    import google_crc32c  # what zarr's crc32c codec uses

    return struct.pack("<I", google_crc32c.value(body))


def _zstd_frame_header_size(frame: bytes) -> int:
    """Bytes of a zstd frame header (magic, descriptor, window, dictionary id, content size)."""
    fhd = frame[4]
    fcs = [0 if not fhd & 0x20 else 1, 2, 4, 8][fhd >> 6]
    return 4 + 1 + (0 if fhd & 0x20 else 1) + [0, 1, 2, 4][fhd & 3] + fcs


def test_mutated_chunk_files_decode_correctly_or_raise_typed_error_bounded(tmp_path):
    """Mutated files through ``read_sparse_chunk`` (the reader behind ``open_run``): raw mutations
    (crc32c catches them), mutations of the zstd blocks with a recomputed crc32c (zstd's own
    checks and then sparse_coo's), and mutations of the sparse_coo payload re-compressed with a
    valid zstd frame and crc32c (sparse_coo's checks)."""
    from numcodecs import Zstd

    path, arr, files = _store(tmp_path)
    n_dense = math.prod(arr.chunks)
    target = Path(path) / "res/c/0/0/0/0/0"
    zstd = Zstd(level=3)
    r = random.Random(2)
    out = Outcomes()
    kinds = {"raw": 0, "zstd-blocks": 0, "payload": 0}
    assert chunkio.chunk_shape(arr) == arr.chunks
    while out.n < N_FILES:
        base = r.choice(files)
        kind = r.choice(list(kinds))
        if kind == "raw":
            data = mutate(r, base, r.choice(files))
        elif kind == "zstd-blocks":  # keep the frame header (its content size is trusted, see below)
            frame = base[:-4]
            head = _zstd_frame_header_size(frame)
            body = mutate(r, frame[head:], r.choice(files)[head:-4])
            data = frame[:head] + body + _crc(frame[:head] + body)
        else:
            payload = zstd.decode(base[:-4])
            frame = zstd.encode(mutate(r, bytes(payload), bytes(zstd.decode(r.choice(files)[:-4]))))
            data = frame + _crc(frame)
        kinds[kind] += 1
        target.unlink()  # a new file rather than a truncated one: ext4 flushes truncate-and-rewrite (4 ms)
        target.write_bytes(data)
        out.n += 1
        got = out.run(lambda: read_sparse_chunk(arr, (0, 0, 0, 0, 0)), len(data), n_dense)
        if got is None:
            out.refused += 1
            continue
        out.decoded += 1
        # a chunk that decodes is exactly the one whose encoding the (valid) file holds (the format is
        # self-describing: a payload may store its values in another type than the array's codec says)
        inner = bytes(zstd.decode(data[:-4]))
        assert sparse_coo.encode_dense(got.todense(), sparse_coo.read_header(inner).value_dtype) == inner
    assert min(kinds.values()) > 0 and out.refused > 0.5 * out.n
    FIGURES["chunk files"] = out.n
    print(f"\nfuzz chunk files: {out.n} inputs {kinds}, {out.decoded} decoded, {out.refused} refused; "
          f"max {out.max_seconds * 1e3:.2f} ms, max {out.max_ratio:.2f} of the allocation bound")


def test_zstd_frame_claiming_a_huge_size_is_refused_cheaply(tmp_path):
    path, arr, files = _store(tmp_path)
    frame = files[0][:-4]
    head = _zstd_frame_header_size(frame)
    body = frame[head:]
    out = Outcomes()
    for claim in (2**31, 2**62):
        # single-segment frame with an 8-byte content size field
        bomb = frame[:4] + bytes([0xE0]) + struct.pack("<Q", claim) + body
        (Path(path) / "res/c/0/0/0/0/0").write_bytes(bomb + _crc(bomb))
        assert out.run(lambda: read_sparse_chunk(arr, (0, 0, 0, 0, 0)), len(bomb),
                       math.prod(arr.chunks)) is None


def test_figures():
    print("\nfuzz figures:", FIGURES, "total", sum(FIGURES.values()))
