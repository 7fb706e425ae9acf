"""Section 8: statistics at corpus scale (``--only scale --tokens N``).

One synthetic run of about N token positions (one SAE, no padding, like the 10.5M-token run of
issue 14: 40 authors × 256 docs × 1023 tokens at N = 10M) and the seed's files for the same data.
Side by side, each in a fresh process with its own peak RSS:

* frequency, mean and max per feature by author through the §2.8 doc-chunk summaries
  (``open_run`` + ``feature_stats``), through the full scan of the SAE blocks (the same call with the
  summaries dropped from the Dataset) and through the seed's path (load each author's CSR
  ``.npz``, scipy column reductions);
* ``top_examples`` (k = 16, window 5) for 1 and for 64 features, pruned by the stored per-chunk max
  and by the full scan (summaries dropped).

Each child warms up first (imports, numba compilation of ``sparse``) on a small selection, resets its
peak-RSS counter, then times the computation. The results of the three frequency paths and of the
two top-k paths are saved and compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.child import reset_peak_rss, rss_mb, run_child
from saestore.bench.workloads import SyntheticWorkload

__all__ = ["scale_workload", "child_scale", "section_scale"]

TOP_K, WINDOW = 16, 5
#: the features of the top-k rows: one (as in issue 14's measurement) and 64
TOPK_FEATURES = {"topk_1": [5], "topk_64": list(range(64))}


def scale_workload(tokens: int, quick: bool) -> SyntheticWorkload:
    """About ``tokens`` token positions: 1023 per document (255 with ``quick``, and a 2048-wide SAE
    of L0 20), 4 to 40 authors, whole doc-chunks of 4 documents."""
    n_tok, n_features, l0 = (255, 2048, 20.0) if quick else (1023, 16384, 70.0)
    n_authors = int(min(40, max(4, tokens // 250_000)))
    chunk_docs = 4
    n_docs = max(chunk_docs, round(tokens / (n_authors * n_tok) / chunk_docs) * chunk_docs)
    return SyntheticWorkload(n_authors=n_authors, n_docs=n_docs, n_tok=n_tok, n_features=n_features, l0=l0,
                             pad_frac=0.0, layer_types=("res",), chunk_docs=chunk_docs)


def _dataset(path: str, summaries: bool) -> Any:
    import saestore
    from saestore import protocol

    ds = saestore.open_run(path)
    return ds if summaries else ds.drop_vars([protocol.summary_name(lt) for lt in protocol.LAYER_TYPES
                                              if protocol.summary_name(lt) in ds.data_vars])


def child_scale(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured path of section 8 (``spec["path_name"]``); saves its result to ``spec["out"]``."""
    name, layer, chunk_docs = spec["path_name"], int(spec["layer"]), int(spec["chunk_docs"])
    if name == "freq_seed":
        from saestore.bench import seed

        stems = [Path(s) for s in spec["stems"]]
        seed.feature_stats(stems[:1])
        base, reset = rss_mb(), reset_peak_rss()
        t0 = time.perf_counter()
        res = seed.feature_stats(stems)
        seconds = time.perf_counter() - t0
    else:
        import saestore.stats as st

        ds = _dataset(spec["path"], summaries=spec["summaries"])
        if name.startswith("freq"):
            names = ["frequency", "mean", "max"]
            st.feature_stats(ds, "res", by="author", layer=layer, doc=slice(0, chunk_docs))[names].compute()
            base, reset = rss_mb(), reset_peak_rss()
            t0 = time.perf_counter()
            out = st.feature_stats(ds, "res", by="author", layer=layer)[names].compute()
            seconds = time.perf_counter() - t0
            res = {k: np.asarray(out[k].values) for k in names}
        else:
            features = spec["features"]
            st.top_examples(ds, "res", layer=layer, feature=features, k=TOP_K, window=WINDOW,
                            doc=slice(0, chunk_docs))["value"].compute()
            base, reset = rss_mb(), reset_peak_rss()
            t0 = time.perf_counter()
            out = st.top_examples(ds, "res", layer=layer, feature=features, k=TOP_K, window=WINDOW).compute()
            seconds = time.perf_counter() - t0
            res = {"value": np.asarray(out["value"].values), "doc": np.asarray(out["example_doc"].values),
                   "tok": np.asarray(out["example_tok"].values),
                   "window_acts": np.asarray(out["window_acts"].values)}
    np.savez(spec["out"], **res)
    return {"path_name": name, "seconds": seconds, "base_rss_mb": base, "peak_reset_after_warmup": reset}


def _same(a: Path, b: Path) -> float:
    """Largest relative difference of two saved results (NaN-aware: NaN only where both are NaN)."""
    x, y = dict(np.load(a)), dict(np.load(b))
    worst = 0.0
    for k, v in x.items():
        v, w = v.astype(np.float64), y[k].astype(np.float64)
        if (np.isnan(v) != np.isnan(w)).any():
            return float("inf")
        ok = ~np.isnan(v)
        diff = np.abs(v[ok] - w[ok]) / np.maximum(np.abs(v[ok]), 1e-12)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def _measure(wl: SyntheticWorkload, tag: str, work: Path, timeout: float,
             write_run_and_seed: Callable[[SyntheticWorkload, Path, Path, str, int], None]) -> dict[str, Any]:
    """Write one run and its seed files (untimed), then run every path of section 8 on it."""
    from saestore.bench.seed import seed_stem

    layer = wl.layers[0]
    run_path, seed_root = work / "runs" / f"{tag}.zarr", work / "seed" / tag
    t0 = time.perf_counter()
    write_run_and_seed(wl, run_path, seed_root, "res", layer)
    setup_s = time.perf_counter() - t0
    stems = [str(seed_stem(seed_root, a, "res", layer)) for a in wl.authors]
    base = {"path": str(run_path), "layer": layer, "chunk_docs": wl.chunk_docs, "stems": stems}
    paths = {"freq_summary": {"summaries": True}, "freq_scan": {"summaries": False}, "freq_seed": {}}
    for key, features in TOPK_FEATURES.items():
        paths[f"{key}_pruned"] = {"summaries": True, "features": features}
        paths[f"{key}_scan"] = {"summaries": False, "features": features}
    rows, outs = {}, {}
    for name, extra in paths.items():
        outs[name] = work / f"{tag}-{name}.npz"
        rows[name] = run_child("scale", {**base, **extra, "path_name": name, "out": str(outs[name])}, timeout=timeout)
    return {"rows": rows, "outs": outs, "setup_s": setup_s, "n_tokens": wl.n_authors * wl.n_docs * wl.n_tok}


def section_scale(tokens: int, quick: bool, work: Path, timeout: float,
                  write_run_and_seed: Callable[[SyntheticWorkload, Path, Path, str, int], None],
                  growth: int = 4) -> dict[str, Any]:
    """Write the run and the seed's files with ``write_run_and_seed`` (untimed; the driver's, in
    ``bench/run.py``), then measure every path of section 8; then the same on a run ``growth``
    times smaller, for the peak-RSS growth of each path."""
    wl = scale_workload(tokens, quick)
    big = _measure(wl, "scale", work, timeout, write_run_and_seed)
    small = _measure(scale_workload(tokens // growth, quick), "scale-small", work, timeout, write_run_and_seed)
    rows, outs, setup_s, n_tokens = big["rows"], big["outs"], big["setup_s"], big["n_tokens"]
    t = {name: r["seconds"] for name, r in rows.items()}
    ratios = {"seed_over_summary_time": t["freq_seed"] / t["freq_summary"],
              "seed_over_scan_time": t["freq_seed"] / t["freq_scan"],
              "scan_over_summary_time": t["freq_scan"] / t["freq_summary"]}
    for key in TOPK_FEATURES:
        ratios[f"{key}_scan_over_pruned_time"] = t[f"{key}_scan"] / t[f"{key}_pruned"]
    rss_growth = {name: rows[name]["peak_rss_mb"] / small["rows"][name]["peak_rss_mb"] for name in rows}
    check = {"freq_summary_vs_scan": _same(outs["freq_summary"], outs["freq_scan"]),
             "freq_summary_vs_seed": _same(outs["freq_summary"], outs["freq_seed"]),
             **{f"{key}_pruned_vs_scan": _same(outs[f"{key}_pruned"], outs[f"{key}_scan"])
                for key in TOPK_FEATURES}}
    desc = (f"Synthetic run of {n_tokens:,} token positions ({wl.n_authors} authors × {wl.n_docs} docs × {wl.n_tok} "
            f"tok, no padding), one res SAE of {wl.n_features:,} features, L0 {wl.l0:g}, chunk_docs "
            f"{wl.chunk_docs}; written untimed in {setup_s:.0f} s. top_examples: k = {TOP_K}, window {WINDOW}. "
            "Each path in a fresh process after a warm-up; 'peak RSS' is the high-water mark of the timed part. "
            f"The same paths ran on a run of {small['n_tokens']:,} token positions ({growth}× smaller) for the "
            "growth of each path's peak RSS.")
    return {"description": desc, "workload": wl.to_json(), "n_tokens": n_tokens, "rows": rows, "ratios": ratios,
            "check": check, "agree": all(v <= (1e-4 if "seed" in k else 1e-12) for k, v in check.items()),
            "setup_s": setup_s, "requested_tokens": tokens, "quick": quick, "growth": growth,
            "small_rows": small["rows"], "small_n_tokens": small["n_tokens"], "rss_growth": rss_growth}
