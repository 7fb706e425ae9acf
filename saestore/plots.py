"""Plots of feature statistics (matplotlib; every function returns the Figure).

Each takes the (lazy or computed) result of a :mod:`saestore.stats` function and computes it if
needed:

* :func:`feature_density` — histogram of log10 feature frequency, one line per SAE, dead
  features counted in the legend (input: :func:`saestore.stats.frequency`);
* :func:`l0_distribution` — L0 per token, one line per author, one panel per SAE
  (input: :func:`saestore.stats.l0_histogram`);
* :func:`author_heatmap` — authors × their most specific features (input:
  :func:`saestore.stats.author_specificity` of one SAE);
* :func:`feature_card` — a feature's top examples as text, active tokens highlighted by
  activation (input: :func:`saestore.stats.top_examples`).

``ax=`` draws into an existing Axes where the plot is a single panel. Use a non-interactive
backend (``matplotlib.use("Agg")``) on servers; this module does not choose one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from saestore.extras import require

require("plots")

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from saestore.errors import PlotError  # noqa: E402

__all__ = ["feature_density", "l0_distribution", "author_heatmap", "feature_card"]


def _computed(x: Any) -> Any:
    return x.compute() if hasattr(x, "compute") else x


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _sae_slices(da: xr.DataArray) -> Iterator[tuple[str, xr.DataArray]]:
    """(label, slice) for every (layer_type, layer) present as a dim or scalar coordinate."""
    lts = da["layer_type"].values.tolist() if "layer_type" in da.dims else [None]
    layers = da["layer"].values.tolist() if "layer" in da.dims else [None]
    for lt in lts:
        for layer in layers:
            sel = {}
            if lt is not None:
                sel["layer_type"] = lt
            if layer is not None:
                sel["layer"] = layer
            part = da.sel(sel)
            lt_name = lt if lt is not None else (str(da["layer_type"].values) if "layer_type" in da.coords else "")
            layer_name = layer if layer is not None else (int(da["layer"].values) if "layer" in da.coords else "")
            yield f"{lt_name} L{layer_name}".strip(), part


def feature_density(freq: xr.DataArray | xr.Dataset, *, ax: Axes | None = None, bins: int = 40,
                    title: str | None = "Feature density") -> Figure:
    """Histogram of log10(frequency) of the features of each SAE (pooled over authors: pass a
    pooled :func:`saestore.stats.frequency`, or one with an ``author`` dim to average it first).
    Dead features (frequency 0) cannot be drawn on a log axis: the legend counts them."""
    freq = _computed(freq)
    if isinstance(freq, xr.Dataset):
        freq = freq["frequency"]
    if "author" in freq.dims:
        freq = freq.mean("author")
    fig, ax = _new_axes(ax, (6.4, 4.0))
    values = np.asarray(freq.values, dtype=float)
    positive = values[values > 0]
    lo = np.floor(np.log10(positive.min())) if positive.size else -6.0
    edges = np.linspace(lo, 0.0, bins + 1)
    for label, part in _sae_slices(freq):
        f = np.asarray(part.values, dtype=float).ravel()
        f = f[np.isfinite(f)]
        dead = int((f == 0).sum())
        ax.hist(np.log10(f[f > 0]), bins=edges, histtype="step", linewidth=1.5,
                label=f"{label} ({f.size} features, {dead} dead)")
    ax.set_xlabel("log10 frequency (fraction of valid tokens where the feature fires)")
    ax.set_ylabel("features")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small", frameon=False)
    return fig


def l0_distribution(hist: xr.DataArray, *, ax: Axes | None = None, density: bool = True,
                    title: str | None = "L0 per token") -> Figure:
    """L0 distributions from :func:`saestore.stats.l0_histogram`: one panel per SAE, one line per
    author (or one pooled line), with the mean L0 in the legend. ``ax=`` needs a single SAE."""
    hist = _computed(hist)
    panels = list(_sae_slices(hist))
    if ax is not None and len(panels) > 1:
        raise PlotError(f"ax= draws one panel, but the histogram holds {len(panels)} SAEs; select one")
    if ax is None:
        n = len(panels)
        cols = min(n, 3)
        rows = -(-n // cols)
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
        axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    else:
        fig, axes = ax.figure, [ax]
    k = np.asarray(hist["l0"].values)
    for a, (label, part) in zip(axes, panels, strict=True):
        groups = [(str(x), part.sel(author=x)) for x in part["author"].values] if "author" in part.dims \
            else [("pooled", part)]
        top = 0
        for name, h in groups:
            counts = np.asarray(h.values, dtype=float)
            total = counts.sum()
            if total == 0:
                continue
            top = max(top, int(k[counts > 0].max()))
            mean = float((counts * k).sum() / total)
            a.step(k, counts / total if density else counts, where="mid", label=f"{name} (mean {mean:.1f})")
        a.set_xlim(0, max(top + 1, 1))
        a.set_xlabel("active features per token (L0)")
        a.set_ylabel("fraction of tokens" if density else "tokens")
        a.set_title(label or "L0")
        a.legend(fontsize="small", frameon=False)
    if title and ax is None:
        fig.suptitle(title)
    return fig


def author_heatmap(spec: xr.Dataset, *, n: int = 5, score: str = "log_odds", ax: Axes | None = None,
                   title: str | None = "Author-specific features") -> Figure:
    """Heatmap of ``score`` (``log_odds`` or ``z``) for authors × the union of each author's ``n``
    most specific features (by ``z``), from :func:`saestore.stats.author_specificity` of one SAE."""
    spec = _computed(spec)
    extra = [d for d in spec[score].dims if d not in ("author", "feature")]
    if extra:
        raise PlotError(f"select one SAE first (e.g. spec.sel(layer=...)); extra dims: {extra}")
    z = np.asarray(spec["z"].values, dtype=float)
    values = np.asarray(spec[score].values, dtype=float)
    feats = spec["feature"].values
    chosen: list[int] = []
    for row in z:
        for i in np.argsort(-np.where(np.isnan(row), -np.inf, row), kind="stable")[:n]:
            if i not in chosen:
                chosen.append(int(i))
    authors = [str(a) for a in spec["author"].values]
    fig, ax = _new_axes(ax, (max(4.0, 0.45 * len(chosen) + 2.5), max(2.5, 0.45 * len(authors) + 1.5)))
    m = values[:, chosen]
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(chosen)), [str(feats[i]) for i in chosen], rotation=90, fontsize="small")
    ax.set_yticks(range(len(authors)), authors)
    ax.set_xlabel("feature")
    ax.set_ylabel("author")
    fig.colorbar(im, ax=ax, label=score.replace("_", " "))
    if title:
        ax.set_title(title)
    return fig


def _clean(token: str) -> str:
    return str(token).replace("\n", "⏎").replace("\t", "⇥") or "∅"


def feature_card(examples: xr.Dataset, *, feature: int | None = None, ax: Axes | None = None,
                 max_examples: int = 10, text_chars: int = 110, cmap: str = "Oranges") -> Figure:
    """A feature's top examples as text: one line per example (rank, value, author/doc), its token
    window with each token's box coloured by the feature's activation there (relative to the top
    value), and the start of the document text. Input: :func:`saestore.stats.top_examples` for one
    SAE (select ``feature`` if the result has a feature dim)."""
    import matplotlib as mpl

    ex = _computed(examples)
    if "feature" in ex.dims:
        if feature is None:
            raise PlotError("the examples hold several features: pass feature=")
        ex = ex.sel(feature=feature)
    extra = [d for d in ex["value"].dims if d != "rank"]
    if extra:
        raise PlotError(f"select one SAE (and author) first; extra dims: {extra}")
    feature = int(ex["feature"].values) if "feature" in ex.coords else feature
    ranks = [r for r in range(ex.sizes["rank"]) if np.isfinite(ex["value"].values[r])][:max_examples]
    colormap = mpl.colormaps[cmap]
    top = float(np.nanmax(ex["value"].values)) if ranks else 1.0
    n_lines = max(len(ranks), 1)
    if ax is None:  # fixed axes (no constrained layout): token boxes are placed in display units
        height = 0.75 * n_lines + 0.8
        fig = Figure(figsize=(11.0, height))
        ax = fig.add_axes((0.01, 0.02, 0.98, 1 - 0.6 / height))
    fig = ax.figure
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, n_lines)
    sae = " ".join(str(ex[c].values) for c in ("layer_type", "layer") if c in ex.coords)
    ax.set_title(f"feature {feature} {sae}: top {len(ranks)} examples (colour = activation / {top:.3g})",
                 loc="left", fontsize="medium")
    if not ranks:
        ax.text(0.5, 0.5, "never active in this selection", ha="center", va="center", color="0.4")
        return fig
    if not hasattr(fig.canvas, "get_renderer"):  # a bare Figure: measure text with Agg
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    inv = ax.transData.inverted()
    for line, r in enumerate(ranks):
        y = n_lines - line - 0.35
        where = f"{ex['example_author'].values[r]} doc {ex['example_doc'].values[r]}"
        who = f"#{r + 1}  {ex['value'].values[r]:.3g}  {where}"
        ax.text(0.0, y, who, fontsize="small", va="center", family="monospace", color="0.25", parse_math=False)
        x = 0.27
        acts = np.asarray(ex["window_acts"].values[r], dtype=float)
        for j, tok in enumerate(ex["tokens"].values[r]):
            if not tok and not np.isfinite(acts[j]):
                continue
            a = acts[j] if np.isfinite(acts[j]) else 0.0
            level = min(max(a / top, 0.0), 1.0) if top > 0 else 0.0
            centre = j == acts.size // 2
            t = ax.text(x, y, _clean(tok), fontsize="small", va="center", parse_math=False,
                        fontweight="bold" if centre else "normal", color="white" if level > 0.6 else "black",
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": colormap(0.08 + 0.92 * level) if a > 0
                              else "white", "edgecolor": "black" if centre else "0.85", "linewidth": 0.6})
            box = t.get_window_extent(renderer=renderer)
            x = inv.transform((box.x1, box.y0))[0] + 0.006
        text = str(ex["text"].values[r]).replace("\n", " ")
        ax.text(0.27, y - 0.38, text[:text_chars] + ("…" if len(text) > text_chars else ""), fontsize="x-small",
                va="center", color="0.45", parse_math=False)
    return fig
