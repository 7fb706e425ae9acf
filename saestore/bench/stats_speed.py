"""Section 3: per-feature frequency, mean and max by author, three ways, each in a fresh process.

* ``sparse``: :func:`saestore.stats.feature_stats` on ``saestore.open_run`` (dask of ``sparse.COO``
  blocks decoded straight from the chunk bytes);
* ``dense``: the same function on plain ``xr.open_zarr(path, chunks={})`` (the codec decodes
  every chunk to a dense numpy block);
* ``seed``: load every author's ``.sparse.npz`` (and its metadata for the valid-token count), then
  scipy column reductions (:mod:`saestore.bench.seed`).

Each child first runs a warm-up on part of one chunk (imports, numba compilation of ``sparse``),
resets its peak-RSS counter (``/proc/self/clear_refs``), then times the full computation, so the
reported peak is that of the computation (plus what the process already held); results are saved
so the driver can check the three agree.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.child import reset_peak_rss, rss_mb

__all__ = ["child_stats", "compare_results"]


def child_stats(spec: dict[str, Any]) -> dict[str, Any]:
    """Compute frequency/mean/max by author for one layer type and layer; save them to ``spec["out"]``."""
    mode, lt, layer = spec["mode"], spec["layer_type"], int(spec["layer"])
    if mode == "seed":
        from saestore.bench import seed

        stems = [Path(s) for s in spec["stems"]]
        seed.feature_stats(stems[:1])  # warm-up: imports, first file
        base, reset = rss_mb(), reset_peak_rss()
        t0 = time.perf_counter()
        res = seed.feature_stats(stems)
        seconds = time.perf_counter() - t0
        nnz = int(sum(seed.load_sparse(s).nnz for s in stems))
    else:
        import xarray as xr

        import saestore
        import saestore.stats as st

        path = spec["path"]
        ds = saestore.open_run(path) if mode == "sparse" else xr.open_zarr(path, chunks={})
        chunk_docs = ds.attrs["saestore"]["storage"]["chunk_docs"]
        names = ["frequency", "mean", "max", "count"]
        # warm-up on part of the first doc-chunk: imports, numba compilation of sparse (slicing too)
        st.feature_stats(ds, lt, by="author", layer=layer, doc=slice(0, max(1, chunk_docs // 2)))[names].compute()
        base, reset = rss_mb(), reset_peak_rss()
        t0 = time.perf_counter()
        out = st.feature_stats(ds, lt, by="author", layer=layer)[names].compute()
        seconds = time.perf_counter() - t0
        res = {k: np.asarray(out[k].values) for k in ("frequency", "mean", "max")}
        nnz = int(out["count"].sum())
    np.savez(spec["out"], **res)
    return {"mode": mode, "seconds": seconds, "nnz": nnz, "nnz_per_s": nnz / seconds, "base_rss_mb": base,
            "peak_reset_after_warmup": reset}


def compare_results(paths: dict[str, str | Path], *, rtol: float = 1e-5) -> dict[str, Any]:
    """Largest relative difference of each mode's results from the first mode's."""
    loaded = {m: dict(np.load(p)) for m, p in paths.items()}
    ref_mode = next(iter(loaded))
    ref = loaded[ref_mode]
    worst = 0.0
    for res in loaded.values():
        for k, v in ref.items():
            diff = np.abs(res[k].astype(np.float64) - v.astype(np.float64))
            scale = np.maximum(np.abs(v.astype(np.float64)), 1e-12)
            worst = max(worst, float(np.max(diff / scale)) if diff.size else 0.0)
    return {"reference": ref_mode, "max_rel_diff": worst, "agree": worst <= rtol}
