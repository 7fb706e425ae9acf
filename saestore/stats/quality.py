"""SAE quality from the §2.6 variables: reconstruction metrics next to L0 and fraction alive, and
loss recovered (see :mod:`saestore.extract.quality` for the definitions); the logit effects of
features (§2.7, ``--logit_k``)."""

from __future__ import annotations

from typing import Any

import xarray as xr

from saestore import protocol
from saestore.errors import StatsError
from saestore.stats._select import select_labels as _select
from saestore.stats.core import feature_stats

__all__ = ["reconstruction_quality", "loss_recovered", "quality_metric", "logit_effects"]


def quality_metric(ds: xr.Dataset, layer_type: str, metric: str) -> xr.DataArray:
    """One §2.6 per-token metric of one layer type: ``{layer_type}_quality`` at that ``metric`` (protocol
    1.2), or the 1.1 variable ``{layer_type}_{metric}``."""
    packed = protocol.quality_name(layer_type)
    if packed in ds:
        return ds[packed].sel(metric=metric, drop=True)
    if f"{layer_type}_{metric}" in ds:
        return ds[f"{layer_type}_{metric}"]
    raise StatsError(f"this run has no {layer_type} reconstruction metrics ({packed}): it was written with "
                     "protocol 1.0; re-extract it to get them")


def reconstruction_quality(ds: xr.Dataset, layer_type: str = "res", *, by: str | None = "author",
                           author: Any = None, layer: Any = None) -> xr.Dataset:
    """Per ``[author,] layer``: ``mse`` (mean ‖x − x̂‖²), ``normalized_mse`` (Σ sq_error / Σ sq_norm),
    ``fvu`` (Σ sq_error / Σ sq_centered, variance within documents left unexplained), ``cos`` (mean
    cosine), ``l0`` (mean active features per token), ``fraction_alive`` and ``n_tokens``."""
    sub = _select(ds, author, layer)
    valid = sub["valid_mask"]
    dims = ("doc", "tok") if by == "author" else ("author", "doc", "tok")

    def total(field: str) -> xr.DataArray:
        return quality_metric(sub, layer_type, field).where(valid, 0.0).sum(dims, dtype="f8")

    n = valid.sum(dims, dtype="i8")
    sq_error = total("sq_error")
    fs = feature_stats(ds, layer_type, by=by, author=author, layer=layer)
    return xr.Dataset({
        "mse": sq_error / n,
        "normalized_mse": sq_error / total("sq_norm"),
        "fvu": sq_error / total("sq_centered"),
        "cos": total("cos") / n,
        "l0": fs["count"].sum("feature") / fs["n_valid"],
        "fraction_alive": (fs["count"] > 0).mean("feature"),
        "n_tokens": n,
    })


def loss_recovered(ds: xr.Dataset, layer_type: str = "res", *, by: str | None = "author", author: Any = None,
                   layer: Any = None) -> xr.Dataset:
    """Mean per-document CE of the clean, SAE-spliced and zero-ablated model and the loss-recovered
    fraction ``(ce_zero − ce_spliced) / (ce_zero − ce_clean)``, per ``[author,] layer`` (runs made with
    ``--loss_recovered``)."""
    sub = _select(ds, author, layer)
    if "ce_clean" not in sub:
        raise StatsError("this run has no loss-recovered variables: extract with --loss_recovered")
    dims = ("doc",) if by == "author" else ("author", "doc")
    has = sub["doc_length"] > 0
    clean = sub["ce_clean"].where(has).mean(dims)
    spliced = sub[f"{layer_type}_ce_spliced"].where(has).mean(dims)
    zero = sub[f"{layer_type}_ce_zero"].where(has).mean(dims)
    return xr.Dataset({"ce_clean": clean, "ce_spliced": spliced, "ce_zero": zero,
                       "loss_recovered": (zero - spliced) / (zero - clean)})


def logit_effects(ds: xr.Dataset, layer_type: str = "res", *, layer: Any = None, feature: Any = None) -> xr.Dataset:
    """Per ``layer, feature, logit_rank``: the output tokens each feature's decoder direction promotes
    (``logit_rank`` 1 … k, largest first) and suppresses (-1 … -k, most negative first) through the
    unembedding, stored at extraction with ``--logit_k`` (PROTOCOL.md §2.7): ``token_id``, ``token``
    (the token decoded alone) and ``value`` (the entry of ``W_dec @ W_U``)."""
    name = f"{layer_type}_logit_token_id"
    if name not in ds:
        raise StatsError(f"this run has no {layer_type} logit effects ({name}): extract with --logit_k K")
    sub = _select(ds, None, layer)
    if feature is not None:
        from saestore import selection

        idx, _ = selection.positions("feature", feature, sub["feature"].values, int, error=StatsError)
        sub = sub.isel(feature=idx)
    return xr.Dataset({"token_id": sub[name], "token": sub[f"{layer_type}_logit_token"],
                       "value": sub[f"{layer_type}_logit_value"]}).assign_attrs(layer_type=layer_type)
