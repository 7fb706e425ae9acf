"""One-off generator of the frozen ``saestore.sparse_coo`` test vectors in tests/fixtures/sparse_coo/.

NEVER RERUN THIS unless the codec's format version changes (PROTOCOL.md §5, byte 4). The files it
wrote are the format's memory: tests/test_codec.py checks that today's encoder reproduces
``encoded.NN.dat`` byte for byte from ``array.NN.npy`` and that the decoder reads it back. If the
encoder changes and the test fails, the encoder is wrong, not the vectors. A new format version
gets new vectors *next to* the old ones (a new folder), and the old ones keep being decoded.

Layout, one triple per vector (as numcodecs does for its codecs):

* ``array.NN.npy``  — the dense chunk (its dtype is the zarr array's dtype);
* ``config.NN.json`` — the codec metadata entry, the format version, the chunk shape, ``nnz``
  and a description;
* ``encoded.NN.dat`` — the codec's raw output (before zstd/crc32c, which are not ours to freeze).

Usage (refuses to overwrite existing files)::

    python -m tests.make_codec_fixtures [--out tests/fixtures/sparse_coo]   # from the repository root
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from saestore import sparse_coo
from saestore.bench.synthetic import synthetic_sae_chunk

FIXTURE_PATH = Path(__file__).resolve().parent / "fixtures" / "sparse_coo"


def _vectors() -> list[tuple[str, np.ndarray, str]]:
    """(description, dense chunk, value_dtype) for every vector, in NN order."""
    rng = np.random.default_rng(20261122)
    out: list[tuple[str, np.ndarray, str]] = []

    out.append(("empty chunk: all zeros, nnz 0 (header and zero counts only)",
                np.zeros((3, 16), np.float32), "float32"))

    full = rng.standard_normal((4, 8)).astype(np.float32)
    full[0, :6] = [1.0, -2.5, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                   np.float32(2.0**-126), np.float32(2.0**-149)]  # extremes incl. the smallest subnormal
    out.append(("full chunk: every value nonzero, incl. +-float32 max and subnormals", full, "float32"))

    one_d = np.where(rng.random(50) < 0.3, rng.standard_normal(50), 0.0).astype(np.float32)
    one_d[0], one_d[49] = 0.75, -3.0
    out.append(("1-D chunk (50,): one row, first and last column set", one_d, "float32"))

    three_d = np.where(rng.random((2, 5, 40)) < 0.2, rng.standard_normal((2, 5, 40)), 0.0).astype(np.float32)
    three_d[0, 3] = 0.0  # an empty row in the middle
    three_d[1, 1, [0, 39]] = [5.5, -0.125]
    out.append(("3-D chunk (2, 5, 40): 10 rows of 40 columns, an empty row, column 0 and 39", three_d, "float32"))

    wide = np.zeros((1, 70000), np.float16)
    cols = [0, 1, 2, 68000, 68001, 69998, 69999]  # delta 67998 needs all 4 index bytes
    wide[0, cols] = rng.uniform(0.5, 4.0, len(cols)).astype(np.float16)
    out.append(("wide chunk (1, 70000), float16 array: 4-byte column deltas (one delta > 65535)",
                wide, "float32"))

    f16 = np.zeros((6, 32), np.float32)
    f16[0] = rng.standard_normal(32) * 100  # ordinary rounding
    f16[1, :8] = [2.0**-24, 3 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-25, 5e-6, -2.0**-24, 1e-7, -6e-8]
    f16[2, :6] = [2.0**-25, 2.0**-26, 1e-10, -2.0**-25, 1e-30, 2.0**-25 * 1.0001]  # underflow, one just above
    f16[3, :5] = [65504.0, -65504.0, 65503.9, 65488.0, 65519.0 - 16]
    f16[5, :6] = [1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 2048 + 1, 2048 + 3, 1 + 2.0**-10]  # ties
    out.append(("float16 values: rounding, ties to even, subnormals, underflow to 0 (dropped), +-65504",
                f16, "float16"))

    bf16 = np.zeros((6, 32), np.float32)
    bf16[0] = rng.standard_normal(32) * 1000
    bf16[1, :6] = [1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 256 + 1, 256 + 3, 1 + 2.0**-7]  # ties
    bf16[2, :7] = [2.0**-149, 2.0**-134, 3 * 2.0**-134, 2.0**-133, 2.0**-126, -(2.0**-133), 1e-40]  # subnormals
    bf16[3, :3] = [3.3895313892515355e38, -3.3895313892515355e38, 3.0e38]
    bf16[5, ::3] = rng.lognormal(0, 1, 11)
    out.append(("bfloat16 values: ties to even, float32 subnormals, underflow to 0 (dropped), +-bf16 max",
                bf16, "bfloat16"))

    sae = synthetic_sae_chunk(n_docs=2, n_tok=16, n_features=256, l0=12, pad_frac=0.3, seed=7)
    out.append(("Zipf-like SAE chunk (2 docs, 16 tok, 256 features, L0 12, 30% padding) from "
                "saestore.bench.synthetic", sae.to_dense(), "float32"))

    one_col = np.array([[0.0], [1.5], [0.0], [-2.0], [7.0]], np.float32)
    out.append(("single column (5, 1) stored as float16", one_col, "float16"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURE_PATH, help="fixture folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (description, array, value_dtype) in enumerate(_vectors()):
        names = [args.out / f"{stem}.{i:02d}.{ext}" for stem, ext in
                 (("array", "npy"), ("config", "json"), ("encoded", "dat"))]
        if any(p.exists() for p in names):
            raise SystemExit(f"{names[0].parent} already holds vector {i:02d}; frozen vectors are never rewritten")
        encoded = sparse_coo.encode_dense(array, value_dtype)
        header = sparse_coo.read_header(encoded)
        config = {
            "codec": {"name": "saestore.sparse_coo", "configuration": {"value_dtype": value_dtype}},
            "format_version": sparse_coo.FORMAT_VERSION,
            "chunk_shape": list(array.shape),
            "array_dtype": array.dtype.name,
            "nnz": header.nnz,
            "description": description,
        }
        np.save(names[0], array, allow_pickle=False)
        names[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        names[2].write_bytes(encoded)
        print(f"{i:02d}: {array.shape} {array.dtype} -> {value_dtype}, nnz {header.nnz}, {len(encoded)} B: "
              f"{description}")


if __name__ == "__main__":
    main()
