"""Bytes per nonzero and throughput of the sparse codec chain on a synthetic SAE chunk.

Measures exactly what the run writer stores for a sparse SAE chunk — ``saestore.sparse_coo``
(from sparse triples, :func:`saestore.sparse_coo.encode_rows`) → zstd level 3 → crc32c, through
the zarr codec objects of a real array — for each value dtype, next to baselines:

* dense float32 + zstd level 1 (the ``dense`` storage format);
* naive COO: uint32 linear index + float32 value, zstd level 3;
* scipy CSR ``save_npz`` (deflate), the seed project's format (if scipy is installed);
* the information bound of the feature *sets*: Σ over tokens of log2 C(F, k_token) bits.

Throughput is nonzeros per second, best of ``--repeat`` runs, one thread: "encode" from sparse
triples, "decode" to (coords, values) as the sparse reader does; "chain" includes zstd and crc32c.

Not a section of the report: ``python -m saestore.bench --codec [--check]`` runs it alone, prints
the table and writes ``codec_bytes.json`` to the output folder (``--chunk-docs``, ``--n-tok``,
``--features``, ``--l0``, ``--repeat`` size it).
"""

from __future__ import annotations

import io
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import MemoryStore

from saestore import chunkio, sparse_coo
from saestore.bench.synthetic import SyntheticChunk, index_entropy_bound_bits, synthetic_sae_chunk
from saestore.codec import SparseCOOCodec
from saestore.errors import BenchError
from saestore.writer import DENSE_ZSTD_LEVEL, SPARSE_ZSTD_LEVEL

__all__ = ["TARGETS", "measure_codec", "markdown"]

TARGETS = {"float32": 4.8, "bfloat16": 2.8}  # bytes per nonzero, full chain


@dataclass(frozen=True, kw_only=True)
class Row:
    name: str
    n_bytes: int
    bytes_per_nnz: float
    encode_nnz_per_s: float | None = None
    decode_nnz_per_s: float | None = None
    chain_encode_nnz_per_s: float | None = None
    chain_decode_nnz_per_s: float | None = None
    target: float | None = None

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.bytes_per_nnz <= self.target


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(best wall time in seconds, last result) of ``repeat`` calls."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sparse_chain(chunk: SyntheticChunk, value_dtype: str, repeat: int, verify: bool) -> Row:
    """The writer's chain for one chunk, through the codec objects of a real zarr array."""
    shape = chunk.shape
    n_rows, n_cols = shape[0] * shape[1], shape[2]
    arr = zarr.create_array(MemoryStore(), shape=shape, chunks=shape, dtype="float32", fill_value=0.0,
                            serializer=SparseCOOCodec(value_dtype=value_dtype),
                            compressors=[ZstdCodec(level=SPARSE_ZSTD_LEVEL), Crc32cCodec()])
    rows = chunk.rows

    def encode_raw() -> bytes:
        return sparse_coo.encode_rows(n_rows, n_cols, rows, chunk.feature, chunk.values, value_dtype)

    def encode_chain() -> Any:
        return chunkio.encode_bytes(arr, (0, 0, 0), encode_raw())

    t_raw, raw = best_time(encode_raw, repeat)
    t_chain, stored = best_time(encode_chain, repeat)

    def decode_raw() -> tuple[np.ndarray, np.ndarray]:
        return sparse_coo.decode_coords(raw, shape)

    def decode_chain() -> tuple[np.ndarray, np.ndarray]:
        return sparse_coo.decode_coords(chunkio.decode_bytes(arr, (0, 0, 0), stored), shape)

    t_draw, _ = best_time(decode_raw, repeat)
    t_dchain, (coords, values) = best_time(decode_chain, repeat)
    nnz = chunk.nnz
    if not (np.array_equal(coords, np.vstack([chunk.doc, chunk.tok, chunk.feature]))
            and np.allclose(values, chunk.values, rtol=2.0**-8, atol=0)):
        raise BenchError(f"{value_dtype}: the chain does not decode to the input")
    if verify and value_dtype == "float32":  # the sparse path's bytes equal the dense (zarr) path's
        if sparse_coo.encode_dense(chunk.to_dense()) != raw:
            raise BenchError("encode_rows and encode_dense disagree")
    n_bytes = len(stored.as_numpy_array())
    return Row(name=f"sparse_coo {value_dtype} → zstd-{SPARSE_ZSTD_LEVEL} → crc32c", n_bytes=n_bytes,
               bytes_per_nnz=n_bytes / nnz, encode_nnz_per_s=nnz / t_raw, decode_nnz_per_s=nnz / t_draw,
               chain_encode_nnz_per_s=nnz / t_chain, chain_decode_nnz_per_s=nnz / t_dchain,
               target=TARGETS.get(value_dtype))


def baselines(chunk: SyntheticChunk, repeat: int) -> list[Row]:
    nnz = chunk.nnz
    shape = chunk.shape
    n_rows, n_cols = shape[0] * shape[1], shape[2]
    out: list[Row] = []

    raw = sparse_coo.encode_rows(n_rows, n_cols, chunk.rows, chunk.feature, chunk.values)
    out.append(Row(name="sparse_coo float32, no compression", n_bytes=len(raw), bytes_per_nnz=len(raw) / nnz))
    ones = sparse_coo.encode_rows(n_rows, n_cols, chunk.rows, chunk.feature, np.ones(nnz, np.float32))
    index_only = len(Zstd(level=SPARSE_ZSTD_LEVEL).encode(ones)) + 4  # constant values compress to ~0
    out.append(Row(name=f"sparse_coo index only (all values 1.0) → zstd-{SPARSE_ZSTD_LEVEL} → crc32c",
                   n_bytes=index_only, bytes_per_nnz=index_only / nnz))

    dense = chunk.to_dense()
    zstd_dense = Zstd(level=DENSE_ZSTD_LEVEL)
    t, enc = best_time(partial(zstd_dense.encode, dense), max(1, repeat // 2))
    out.append(Row(name=f"dense float32 → zstd-{DENSE_ZSTD_LEVEL} → crc32c", n_bytes=len(enc) + 4,
                   bytes_per_nnz=(len(enc) + 4) / nnz, chain_encode_nnz_per_s=nnz / t))
    del dense, enc

    linear = (chunk.rows * n_cols + chunk.feature).astype("<u4")
    zstd3 = Zstd(level=3)
    t, enc = best_time(lambda: zstd3.encode(linear.tobytes() + chunk.values.astype("<f4").tobytes()), repeat)
    out.append(Row(name="naive COO (uint32 linear index + f32) → zstd-3", n_bytes=len(enc),
                   bytes_per_nnz=len(enc) / nnz, chain_encode_nnz_per_s=nnz / t))

    try:
        import scipy.sparse
    except ImportError:
        print("scipy not installed: CSR save_npz baseline skipped", file=sys.stderr)
    else:
        csr = scipy.sparse.csr_matrix((chunk.values, (chunk.rows, chunk.feature)), shape=(n_rows, n_cols))

        def save() -> bytes:
            f = io.BytesIO()
            scipy.sparse.save_npz(f, csr, compressed=True)
            return f.getvalue()

        t, enc = best_time(save, repeat)
        out.append(Row(name="scipy CSR save_npz (deflate), seed format", n_bytes=len(enc),
                       bytes_per_nnz=len(enc) / nnz, chain_encode_nnz_per_s=nnz / t))

    bound_bytes = index_entropy_bound_bits(chunk) / 8
    out.append(Row(name="information bound of the index (Σ log2 C(F, k) per token)", n_bytes=round(bound_bytes),
                   bytes_per_nnz=bound_bytes / nnz))
    return out


def _fmt_rate(x: float | None) -> str:
    return "" if x is None else f"{x / 1e6:.1f}"


def markdown(doc: dict[str, Any]) -> str:
    """The table of a :func:`measure_codec` document."""
    workload, repeat = doc["workload"], doc["repeat"]
    lines = [
        f"Chunk {workload['shape']} (doc × tok × feature), {workload['nnz']:,} nonzeros, "
        f"{workload['n_valid_tokens']:,} real tokens (padding {workload['padding']:.1%}), "
        f"mean L0 {workload['mean_l0']:.1f}; throughput in M nonzeros/s, best of {repeat}, one thread.",
        "",
        "| encoding | bytes | B/nnz | encode | decode | chain encode | chain decode | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["results"]:
        target = "" if r["target"] is None else f"≤ {r['target']} {'PASS' if r['ok'] else 'FAIL'}"
        lines.append(f"| {r['name']} | {r['n_bytes']:,} | {r['bytes_per_nnz']:.2f} | {_fmt_rate(r['encode_nnz_per_s'])} | "
                     f"{_fmt_rate(r['decode_nnz_per_s'])} | {_fmt_rate(r['chain_encode_nnz_per_s'])} | "
                     f"{_fmt_rate(r['chain_decode_nnz_per_s'])} | {target} |")
    return "\n".join(lines)


def measure_codec(*, n_docs: int = 4, n_tok: int = 1024, n_features: int = 16384, l0: float = 70,
                  pad_frac: float = 0.49, seed: int = 0, repeat: int = 5, verify: bool = True) -> dict[str, Any]:
    """Every row for one synthetic chunk of ``n_docs`` × ``n_tok`` × ``n_features``, as a JSON-able
    document: the workload, one result per :class:`Row` (with its ``ok``), the missed targets,
    library versions and the machine."""
    chunk = synthetic_sae_chunk(n_docs, n_tok, n_features=n_features, l0=l0, pad_frac=pad_frac, seed=seed)
    n_valid = int(chunk.valid_DT.sum())
    workload = {"shape": list(chunk.shape), "nnz": chunk.nnz, "n_valid_tokens": n_valid,
                "padding": 1 - n_valid / chunk.valid_DT.size, "mean_l0": chunk.nnz / n_valid,
                "l0": l0, "pad_frac": pad_frac, "seed": seed, "generator": "saestore.bench.synthetic"}
    rows = [sparse_chain(chunk, vd, repeat, verify=verify) for vd in sparse_coo.VALUE_DTYPES]
    rows += baselines(chunk, repeat)
    versions = {}
    for name in ("saestore", "zarr", "numcodecs", "numpy", "scipy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"workload": workload, "repeat": repeat,
            "results": [{**asdict(r), "ok": r.ok} for r in rows],
            "missed": [r.name for r in rows if r.ok is False],
            "versions": versions, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor()}
