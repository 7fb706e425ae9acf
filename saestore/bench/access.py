"""Section 4: latency of reading one document's features for one SAE.

* ``saestore (open_run)``: ``ds.<lt>.isel(author=a, layer=l, doc=d).data.compute()`` on an opened
  run: one chunk is read and decoded to ``sparse.COO``, then sliced to the document;
* ``saestore (plain zarr)``: ``zarr.open_array(run, path=lt)[a, l, d]``: the codec decodes the
  chunk to dense and zarr slices it;
* ``seed``: ``load_npz`` of the author's whole file, then the document's rows (the metadata file
  is not read, which favours the seed).

Reads are warm (the OS page cache holds the files; each format gets a warm-up read), documents
are drawn at random with a fixed seed, and the same documents are read in every format. The
median is reported; opening the run is timed separately.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure_access"]


def _timed(fn: Any, targets: list[tuple[int, int]]) -> list[float]:
    fn(*targets[0])  # warm-up
    out = []
    for a, d in targets:
        t = time.perf_counter()
        fn(a, d)
        out.append(time.perf_counter() - t)
    return out


def measure_access(run_path: Path, seed_root: Path, *, layer_type: str, layer: int, n_reads: int,
                   seed: int = 0) -> dict[str, Any]:
    """Median latencies (seconds) of one-document reads in each format, plus sanity checks."""
    import zarr

    import saestore
    from saestore.bench import seed as base

    t = time.perf_counter()
    ds = saestore.open_run(run_path)
    open_s = time.perf_counter() - t
    authors = [str(x) for x in ds["author"].values]
    n_docs = [int(x) for x in ds["n_docs"].values] if "n_docs" in ds else [ds.sizes["doc"]] * len(authors)
    n_tok = ds.sizes["tok"]
    li = [int(x) for x in ds["layer"].values].index(layer)
    rng = np.random.default_rng(seed)
    targets = [(int(a), int(rng.integers(0, n_docs[a]))) for a in rng.integers(0, len(authors), size=n_reads)]
    var = ds[layer_type]
    arr = zarr.open_array(str(run_path), path=layer_type, mode="r")

    def via_open_run(a: int, d: int) -> Any:
        return var.isel(author=a, layer=li, doc=d).data.compute()

    def via_zarr(a: int, d: int) -> np.ndarray:
        return arr[a, li, d]

    def via_seed(a: int, d: int) -> Any:
        return base.read_document(base.seed_stem(seed_root, authors[a], layer_type, layer), d, n_tok)

    a0, d0 = targets[0]
    got = {"open_run": via_open_run(a0, d0).todense(), "zarr": via_zarr(a0, d0),
           "seed": via_seed(a0, d0).toarray()}
    agree = all(np.array_equal(got["zarr"], g) for g in got.values())
    times = {"saestore_open_run": _timed(via_open_run, targets), "saestore_zarr": _timed(via_zarr, targets),
             "seed": _timed(via_seed, targets)}
    seed_file = base.seed_stem(seed_root, authors[0], layer_type, layer)
    seed_bytes = seed_file.with_name(seed_file.name + base.SPARSE_SUFFIX).stat().st_size
    return {"n_reads": n_reads, "open_run_s": open_s, "agree": agree, "docs_per_author": max(n_docs),
            "seed_file_bytes": seed_bytes,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()}}
