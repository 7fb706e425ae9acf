"""Section 7: files and bytes of one run in the unsharded layout of protocol 1.1 and in 1.2's shards.

The same synthetic run (every doc-chunk generated from ``(seed, author, chunk)``) is written twice
with :class:`saestore.writer.RunWriter`: once unsharded (``shard_docs`` None: one object per chunk,
the 1.1 layout) and once with the default shards (``shard_docs`` the multiple of ``chunk_docs``
nearest 128). For each: *data files* (every file but the ``zarr.json`` metadata), *bytes of data*
(the sum of their sizes), *bytes on disk* (allocated blocks, which is what a filesystem charges for
many small files), bytes per stored nonzero, write throughput, and the median latency of reading one
document of one SAE through :func:`saestore.open_run` (the sharded read is two ranged reads: the
shard index, then the inner chunk). The synthetic run has no §2.6 quality variables; with them,
1.1 stored four arrays per SAE where 1.2 stores one, which this section does not count.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.workloads import SyntheticWorkload, synthetic_attrs, write_workload

__all__ = ["measure_layout", "count_files"]

LAYOUTS = ("unsharded", "sharded")


def count_files(path: str | Path) -> dict[str, int]:
    """Data files (all but ``zarr.json``), their bytes, and the bytes they occupy on disk."""
    files = [p for p in Path(path).rglob("*") if p.is_file() and p.name != "zarr.json"]
    stats = [p.stat() for p in files]
    return {"data_files": len(files), "data_bytes": sum(s.st_size for s in stats),
            "disk_bytes": sum(s.st_blocks * 512 for s in stats)}


def _write(wl: SyntheticWorkload, path: Path, layout_name: str) -> dict[str, Any]:
    layout = wl.layout()
    attrs = synthetic_attrs(layout)
    if layout_name == "unsharded":
        storage = dataclasses.replace(layout.storage, shard_docs=None)
        layout = dataclasses.replace(layout, storage=storage)
        attrs = dataclasses.replace(attrs, protocol_version="1.1", storage=storage)
    res = write_workload(wl, path, layout=layout, attrs=attrs)
    return {**res, "shard_docs": layout.storage.shard_docs}


def _read_latency(path: Path, wl: SyntheticWorkload, n_reads: int, seed: int = 0) -> list[float]:
    from saestore.reader import open_run

    ds = open_run(path)
    var = ds[wl.layer_types[0]]
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(n_reads):
        a, d = int(rng.integers(wl.n_authors)), int(rng.integers(wl.n_docs))
        t0 = time.perf_counter()
        block = var.isel(author=a, layer=0, doc=d).data.compute()
        times.append(time.perf_counter() - t0)
        assert block.shape == (wl.n_tok, wl.n_features)
    return times


def measure_layout(wl: SyntheticWorkload, work: Path, *, n_reads: int = 25, keep: bool = False) -> dict[str, Any]:
    """Write ``wl`` in both layouts under ``work`` and measure them side by side."""
    out: dict[str, Any] = {"workload": wl.to_json(), "n_tokens_positions": wl.n_authors * wl.n_docs * wl.n_tok,
                           "layouts": {}}
    for name in LAYOUTS:
        path = work / f"layout-{name}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        res = _write(wl, path, name)
        res.update(count_files(path))
        res["bytes_per_nnz"] = res["data_bytes"] / max(res["nnz"], 1)
        res["disk_over_data"] = res["disk_bytes"] / max(res["data_bytes"], 1)
        os.sync()
        times = _read_latency(path, wl, n_reads)
        res["read_one_doc_median_s"] = statistics.median(times)
        out["layouts"][name] = res
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
    u, s = out["layouts"]["unsharded"], out["layouts"]["sharded"]
    out["ratios"] = {
        "files_unsharded_over_sharded": u["data_files"] / s["data_files"],
        "disk_bytes_unsharded_over_sharded": u["disk_bytes"] / s["disk_bytes"],
        "bytes_per_nnz_sharded_over_unsharded": s["bytes_per_nnz"] / u["bytes_per_nnz"],
        "read_one_doc_sharded_over_unsharded": s["read_one_doc_median_s"] / u["read_one_doc_median_s"],
        "write_speed_sharded_over_unsharded": s["write_nnz_per_s"] / u["write_nnz_per_s"],
    }
    return out
