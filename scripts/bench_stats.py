"""Performance sanity check of saestore.stats: frequency + mean + max by author, computed

(a) on ``saestore.open_run`` (sparse.COO blocks decoded straight from the chunk bytes), and
(b) on plain ``xr.open_zarr(chunks={})`` of the same store (the codec decodes dense chunks),

at 1x, 4x and 16x the documents. Each measurement runs in a fresh subprocess (after a one-chunk
warm-up that pays the one-off import and compile costs) and reports the wall time and the
process's peak RSS (``resource.getrusage``). Targets: sparse >= 5x faster, peak memory flat as the
run grows.

    python scripts/bench_stats.py                      # default sizes, runs under /tmp/saestore-bench
    python scripts/bench_stats.py --scales 1 4 --docs 4 --n_tok 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_synthetic_run(path: Path, n_docs: int, n_tok: int, n_features: int, chunk_docs: int, l0: float) -> None:
    """Two authors, one res SAE at one layer, SAE-like synthetic data (saestore.bench.synthetic)."""
    from saestore import protocol
    from saestore.bench.synthetic import synthetic_run_data
    from saestore.writer import RunLayout, RunWriter, create_run, finalize_run

    storage = protocol.StorageInfo(format="sparse", value_dtype="float32", chunk_docs=chunk_docs)
    layout = RunLayout(authors=("alice", "bob"), n_docs=(n_docs, n_docs), n_tok=n_tok, layer_types=("res",),
                       layers=(12,), n_features=n_features, storage=storage)
    config = {"model": "synthetic-bench", "n_docs": n_docs, "n_tok": n_tok, "n_features": n_features}
    sae = protocol.SAEInfo(release=None, sae_id=None, path=None, hook_name="blocks.12.hook_resid_post",
                           width=n_features, expected_l0=l0, architecture="jumprelu")
    attrs = protocol.RunAttrs(
        protocol_version=protocol.PROTOCOL_VERSION, layout=protocol.LAYOUT, status="running",
        created_at="2026-01-01T00:00:00+00:00", finalized_at=None, config=config,
        config_hash=protocol.config_hash(config), model="synthetic-bench", setting="baseline", prompt_template=None,
        use_error_term=False, storage=storage, saes={"res": {"12": sae}})
    create_run(str(path), layout, attrs, mode="overwrite")
    writer = RunWriter(str(path))
    for a, c, data in synthetic_run_data(layout, l0=l0, seed=0):
        writer.write_chunk(a, c, data)
    finalize_run(str(path))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: str, mode: str) -> dict[str, float]:
    """In this (fresh) process: warm up on one chunk, then time the full computation."""
    import warnings

    import xarray as xr

    import saestore
    import saestore.stats as st

    warnings.filterwarnings("ignore")
    base = _rss_mb()  # after the imports
    ds = saestore.open_run(path) if mode == "sparse" else xr.open_zarr(path, chunks={})
    chunk_docs = ds.attrs["saestore"]["storage"]["chunk_docs"]
    st.feature_stats(ds, "res", by="author", doc=slice(0, chunk_docs))[["frequency", "mean", "max"]].compute()
    t0 = time.perf_counter()
    out = st.feature_stats(ds, "res", by="author")[["frequency", "mean", "max"]].compute()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base,
            "checksum": float(out["frequency"].sum() + out["mean"].sum() + out["max"].sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--docs", type=int, default=8, help="documents per author at 1x (default 8)")
    p.add_argument("--n_tok", type=int, default=512)
    p.add_argument("--features", type=int, default=16384)
    p.add_argument("--chunk_docs", type=int, default=4)
    p.add_argument("--l0", type=float, default=70)
    p.add_argument("--dir", default="/tmp/saestore-bench")
    p.add_argument("--measure", nargs=2, metavar=("RUN", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"features {args.features}, n_tok {args.n_tok}, chunk_docs {args.chunk_docs}, L0 {args.l0}, "
          f"2 authors, 1 SAE; {os.cpu_count()} cores")
    print(f"{'scale':>5} {'docs':>5} {'nnz/1e6':>8} {'sparse s':>9} {'dense s':>8} {'ratio':>6} "
          f"{'sparse peak MB (+over imports)':>31} {'dense peak MB (+over imports)':>30}")
    for scale in args.scales:
        n_docs = args.docs * scale
        path = root / f"run-{n_docs}x{args.n_tok}x{args.features}.zarr"
        if not (path / "zarr.json").exists():
            write_synthetic_run(path, n_docs, args.n_tok, args.features, args.chunk_docs, args.l0)
        res = {}
        for mode in ("sparse", "dense"):
            proc = subprocess.run([sys.executable, __file__, "--measure", str(path), mode], capture_output=True,
                                  text=True, check=True)
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        if abs(res["sparse"]["checksum"] - res["dense"]["checksum"]) > 1e-6 * abs(res["dense"]["checksum"]):
            raise SystemExit(f"sparse and dense results differ: {res}")
        import zarr

        nnz = int(zarr.open_array(str(path), path="_saestore/progress", mode="r")[..., 2].sum())
        s, d = res["sparse"], res["dense"]
        s_extra, d_extra = s["peak_rss_mb"] - s["base_rss_mb"], d["peak_rss_mb"] - d["base_rss_mb"]
        print(f"{scale:>5} {2 * n_docs:>5} {nnz / 1e6:>8.2f} {s['seconds']:>9.2f} {d['seconds']:>8.2f} "
              f"{d['seconds'] / s['seconds']:>5.1f}x {s['peak_rss_mb']:>22.0f} (+{s_extra:>4.0f})"
              f" {d['peak_rss_mb']:>21.0f} (+{d_extra:>4.0f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
