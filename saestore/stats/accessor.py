"""The ``ds.sae`` accessor: every statistic of :mod:`saestore.stats` as a method of a run Dataset.

``ds.sae.frequency(layer_type="res", by="author")`` is ``saestore.stats.frequency(ds, "res",
by="author")``; the arguments and results are the functions' (see their docstrings). Registered
when :mod:`saestore.stats` is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import xarray as xr

from saestore.stats import core, examples, loss, quality, relations

__all__ = ["SaeAccessor", "METHODS"]

METHODS: tuple[str, ...] = (
    "feature_stats", "activation_count", "frequency", "activation_sum", "activation_mean", "activation_max",
    "dead_features", "dense_features", "histogram", "quantiles", "l0", "l0_histogram", "l0_summary",
    "n_valid_tokens", "top_examples", "top_tokens", "doc_vectors", "author_specificity", "top_author_features",
    "cooccurrence", "metric_by_activity", "doc_loss", "bits_per_byte", "reconstruction_quality", "loss_recovered",
)


def _function(name: str) -> Callable[..., Any]:
    for module in (core, examples, relations, loss, quality):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(name)


def _method(name: str) -> Callable[..., Any]:
    fn = _function(name)

    @functools.wraps(fn)
    def call(self: SaeAccessor, *args: Any, **kwargs: Any) -> Any:
        return fn(self._ds, *args, **kwargs)

    call.__qualname__ = f"SaeAccessor.{name}"
    return call


@xr.register_dataset_accessor("sae")
class SaeAccessor:
    """``ds.sae.<statistic>(...)``: lazy SAE feature statistics of a saestore run Dataset.

    Methods: feature_stats, activation_count, frequency, activation_sum, activation_mean,
    activation_max, dead_features, dense_features, histogram, quantiles, l0, l0_histogram,
    l0_summary, n_valid_tokens, top_examples, top_tokens, doc_vectors, author_specificity,
    top_author_features, cooccurrence, metric_by_activity, doc_loss, bits_per_byte.
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(METHODS))


for _name in METHODS:
    setattr(SaeAccessor, _name, _method(_name))
