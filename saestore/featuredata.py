"""Everything a feature page shows, for a set of features of one SAE, computed from a run: the
statistics (frequency, max, per-author frequency and specificity, the log-binned histogram), the
top-k examples and examples sampled from activation quantile bins, each with the tokens of its
window and the feature's activation on every one of them.

:func:`feature_data` returns plain Python (lists, dicts, floats, strings: JSON-ready); the
dashboard (:mod:`saestore.dashboard`) and the Neuronpedia export
(:mod:`saestore.export.neuronpedia`) render it. The numbers are those of :mod:`saestore.stats`
(``feature_stats``, ``author_specificity``, ``histogram``, ``top_examples``), computed lazily with
dask in two passes over the SAE's chunks, with a tqdm progress bar per pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.callbacks import Callback
from tqdm.auto import tqdm

from saestore.stats import kernels
from saestore.stats._select import index_arrays, make_selection, per_block, sae_array, token_array
from saestore.stats.core import feature_stats, histogram, log_bins, quantiles_from_histogram
from saestore.stats.examples import example_vars, top_examples
from saestore.stats.relations import author_specificity

__all__ = ["feature_data", "quantile_bin_examples", "progress", "FEATURE_DATA_VERSION"]

#: bumped when the structure returned by :func:`feature_data` changes
FEATURE_DATA_VERSION = 1


class progress(Callback):
    """A tqdm bar over the tasks of the dask computations run inside ``with progress(desc):``."""

    def __init__(self, desc: str, disable: bool | None = None) -> None:
        super().__init__()
        self.desc, self.disable, self.bar = desc, disable, None

    def _start_state(self, dsk: Any, state: Any) -> None:
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self.bar = tqdm(total=total, desc=self.desc, unit="task", disable=self.disable, leave=False)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self.bar is not None:
            self.bar.close()


def quantile_bin_examples(ds: xr.Dataset, layer_type: str, *, layer: int, feature: Sequence[int],
                          edges_FB: np.ndarray, m: int = 5, window: int = 8,
                          author: str | Sequence[str] | None = None) -> xr.Dataset:
    """Per feature and value bin (``edges_FB[f, b] <= value < edges_FB[f, b + 1]``), ``m`` examples
    drawn uniformly from the bin's activations over valid tokens (a fixed hash of the position, so
    the same on every scheduler and chunking), dims ``feature, bin, rank[, offset]``, with the
    variables of :func:`saestore.stats.top_examples` (lazy)."""
    feats = [int(f) for f in feature]
    sel = make_selection(ds, layer_type, layer=[layer], feature=feats, author=author)
    edges = np.asarray(edges_FB, dtype=np.float64)
    n_b = edges.shape[1] - 1
    acts = sae_array(ds, sel, layer_type)
    valid = token_array(ds, sel, "valid_mask", acts)
    n_w = 2 * window + 1
    parts = per_block(kernels.bin_samples, acts, [valid], positions=index_arrays(sel, acts),
                      new_axes={"g": len(feats) * n_b, "k": m, "p": 2 + n_w}, dtype=np.float64,
                      feature_idx=sel.feature_idx, edges_GB=edges, m=m, window=window, n_docs_sel=acts.shape[2])
    merge = partial(kernels.merge_top_k, k=m)
    best = da.reduction(parts, chunk=merge, combine=merge, aggregate=merge, axis=(0, 2), keepdims=False,
                        dtype=np.float64, concatenate=True, meta=np.empty((0,) * (parts.ndim - 2)))
    best = best[0].reshape(len(feats), n_b, m, 2 + n_w)
    v = example_vars(ds, sel, acts, best, window, ranked_by_value=False)
    dk, dw = ["feature", "bin", "rank"], ["feature", "bin", "rank", "offset"]
    return xr.Dataset({name: (dw if name in ("tokens", "window_acts") else dk, x) for name, x in v.items()},
                      coords={"feature": feats, "bin": np.arange(n_b), "rank": np.arange(m),
                              "offset": np.arange(-window, window + 1)})


def _num(x: Any, digits: int = 6) -> float | None:
    """A JSON-safe float (None for NaN/inf), rounded to ``digits`` significant digits."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _example_list(ex: xr.Dataset) -> list[dict[str, Any]]:
    """The non-empty ranks of one feature's (one bin's) examples as dicts."""
    out = []
    for r in range(ex.sizes["rank"]):
        e = ex.isel(rank=r)
        if not np.isfinite(float(e["value"])):
            continue
        acts = np.asarray(e["window_acts"].values, dtype=np.float64)
        tokens = [str(t) for t in e["tokens"].values]
        inside = np.flatnonzero(np.isfinite(acts) | (np.asarray(tokens) != ""))
        lo, hi = (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)
        out.append({
            "value": _num(e["value"]), "author": str(e["example_author"].values), "doc": int(e["example_doc"]),
            "doc_id": int(e["example_doc_id"]), "tok": int(e["example_tok"]),
            "tokens": tokens[lo:hi], "acts": [_num(a, 4) for a in acts[lo:hi]],
            "center": ex.sizes["offset"] // 2 - lo,
        })
    return out


def _logit_list(lg: xr.Dataset) -> dict[str, list[dict[str, Any]]]:
    """One feature's logit effects as ``{"positive": [{"token", "token_id", "value"}], "negative": [...]}``."""
    rank = np.asarray(lg["logit_rank"].values)
    rows = [{"rank": int(r), "token": str(t), "token_id": int(i), "value": _num(v, 4)}
            for r, t, i, v in zip(rank, lg["token"].values, lg["token_id"].values, lg["value"].values, strict=True)]
    return {"positive": [r for r in rows if r["rank"] > 0], "negative": [r for r in rows if r["rank"] < 0]}


def feature_data(ds: xr.Dataset, layer_type: str, layer: int, features: Sequence[int], *, k: int = 20,
                 window: int = 12, n_bins: int = 5, per_bin: int = 5, alpha: float = 0.5,
                 author: str | Sequence[str] | None = None, show_progress: bool | None = None) -> dict[str, Any]:
    """The data of the feature pages of ``features`` of the ``layer_type`` SAE at ``layer``:
    ``{"authors", "n_valid", "n_valid_author", "features": [{"feature", "count", "frequency", "max",
    "mean_active", "authors": [{"author", "count", "frequency", "log_odds", "z"}], "histogram":
    {"lower", "upper", "count"}, "top": [example], "bins": [{"lower", "upper", "q_lower", "q_upper",
    "examples": [example]}]}]}``; an example is ``{"value", "author", "doc", "doc_id", "tok", "tokens",
    "acts", "center"}`` (``acts[i]`` the activation on ``tokens[i]``, ``tokens[center]`` the example's
    token). Runs extracted with ``--logit_k`` add ``"logits": {"positive", "negative"}``, each a list of
    ``{"rank", "token", "token_id", "value"}`` (:func:`saestore.stats.logit_effects`). Quantile bins split each feature's active values at its approximate ``i / n_bins``
    quantiles (from the histogram). ``author`` restricts everything to those authors' documents
    (with one author, ``log_odds`` and ``z`` are None)."""
    feats = [int(f) for f in features]
    sel: dict[str, Any] = dict(layer=layer, feature=feats, author=author)
    edges = log_bins()
    pooled = feature_stats(ds, layer_type, **sel)
    if make_selection(ds, layer_type, author=author).authors.size >= 2:
        spec = author_specificity(ds, layer_type, alpha=alpha, **sel)
    else:  # one author: frequency only, no specificity against the others
        spec = feature_stats(ds, layer_type, by="author", **sel)[["count", "n_valid", "frequency"]]
        spec = spec.assign(log_odds=spec["frequency"] * np.nan, z=spec["frequency"] * np.nan)
    hist = histogram(ds, layer_type, edges=edges, **sel)
    top = top_examples(ds, layer_type, k=k, window=window, **sel)
    disable = None if show_progress is None else not show_progress
    with progress("statistics and top examples", disable=disable):
        pooled, hist, top = dask.compute(pooled, hist, top, scheduler="threads")
        # apart: dask 2026.8 loses a key when author_specificity's graph is computed with another
        spec = spec.compute(scheduler="threads")
    counts_FB = np.asarray(hist.values, dtype=np.int64).reshape(len(feats), -1)
    qs = [i / n_bins for i in range(1, n_bins)]
    q_FQ = quantiles_from_histogram(counts_FB, edges, qs)
    vmax = np.asarray(pooled["max"].values, dtype=np.float64).reshape(-1)
    bin_edges = np.column_stack([np.full(len(feats), -np.inf), np.nan_to_num(q_FQ, nan=np.inf),
                                 np.full(len(feats), np.inf)])
    bin_edges = np.maximum.accumulate(bin_edges, axis=1)
    bins = quantile_bin_examples(ds, layer_type, layer=layer, feature=feats, edges_FB=bin_edges, m=per_bin,
                                 window=window, author=author)
    with progress("quantile-bin examples", disable=disable):
        bins = bins.compute(scheduler="threads")
    logits = None
    if f"{layer_type}_logit_token_id" in ds:  # --logit_k runs (PROTOCOL.md §2.7)
        from saestore.stats.quality import logit_effects

        logits = logit_effects(ds, layer_type, layer=[layer], feature=feats).isel(layer=0).compute()
    authors = [str(a) for a in spec["author"].values]
    n_valid_author = [int(n) for n in np.asarray(spec["n_valid"].values).reshape(-1)]
    lower, upper = hist["bin_lower"].values, hist["bin_upper"].values
    out_features = []
    for i, f in enumerate(feats):
        fsel = dict(feature=f) if "feature" in pooled.dims else {}
        h = counts_FB[i]
        nz = np.flatnonzero(h)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        s = spec.sel(**fsel) if "feature" in spec.dims else spec
        out_features.append({
            "feature": f,
            "count": int(pooled["count"].sel(**fsel)),
            "frequency": _num(pooled["frequency"].sel(**fsel)),
            "max": _num(vmax[i]),
            "mean_active": _num(pooled["mean_active"].sel(**fsel)),
            "authors": [{"author": a, "count": int(s["count"].values[j]), "frequency": _num(s["frequency"].values[j]),
                         "log_odds": _num(s["log_odds"].values[j], 4), "z": _num(s["z"].values[j], 4)}
                        for j, a in enumerate(authors)],
            "histogram": {"lower": [_num(x) for x in lower[lo:hi]], "upper": [_num(x) for x in upper[lo:hi]],
                          "count": [int(c) for c in h[lo:hi]]},
            "top": _example_list(top.sel(**fsel) if "feature" in top.dims else top),
            "bins": [{"lower": _num(bin_edges[i, b]), "upper": _num(bin_edges[i, b + 1]),
                      "q_lower": b / n_bins, "q_upper": (b + 1) / n_bins,
                      "examples": sorted(_example_list(bins.sel(feature=f, bin=b)), key=lambda e: -e["value"])}
                     for b in range(n_bins)],
            **({"logits": _logit_list(logits.sel(feature=f))} if logits is not None else {}),
        })
    return {"version": FEATURE_DATA_VERSION, "layer_type": layer_type, "layer": int(layer), "authors": authors,
            "n_valid": int(pooled["n_valid"]), "n_valid_author": n_valid_author, "window": window,
            "features": out_features}
