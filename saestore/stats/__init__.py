"""Lazy per-feature statistics of a run, computed from the SAE blocks without densifying them.

Works on ``saestore.open_run(path)`` (sparse.COO blocks) and on plain ``xr.open_zarr(path)``
(dense numpy blocks) alike. Every function returns a lazy xarray object: call ``.compute()``.
Importing this package also registers the ``ds.sae`` accessor (:mod:`saestore.stats.accessor`)::

    >>> import saestore, saestore.stats                                    # doctest: +SKIP
    >>> ds = saestore.open_run("runs/demo/tiny/demo.zarr")                 # doctest: +SKIP
    >>> ds.sae.frequency(layer_type="res", by="author").compute()          # doctest: +SKIP
    >>> saestore.stats.top_examples(ds, "res", feature=[3, 7], k=5)        # doctest: +SKIP

Selections (every function): ``layer_type`` (str, list or None = all), ``author`` (names),
``layer`` (layer numbers), ``doc`` (positions: int, slice or list), ``feature`` (ids). A scalar
layer type, layer or feature drops that dimension. ``by="author"`` keeps authors apart,
``by=None`` pools them. Only valid tokens (``valid_mask``) count.
"""

from __future__ import annotations

from saestore.stats import accessor as _accessor  # noqa: F401  (registers ds.sae)
from saestore.stats._select import Selection, StatsError, make_selection
from saestore.stats.core import (
    activation_count,
    activation_max,
    activation_mean,
    activation_sum,
    dead_features,
    dense_features,
    feature_stats,
    frequency,
    histogram,
    l0,
    l0_histogram,
    l0_summary,
    log_bins,
    n_valid_tokens,
    quantiles,
    quantiles_from_histogram,
)
from saestore.stats.examples import top_examples, top_tokens
from saestore.stats.loss import bits_per_byte, doc_loss
from saestore.stats.quality import loss_recovered, reconstruction_quality
from saestore.stats.relations import (
    author_specificity,
    cooccurrence,
    doc_vectors,
    metric_by_activity,
    top_author_features,
)

__all__ = [
    "Selection", "StatsError", "make_selection",
    "feature_stats", "activation_count", "frequency", "activation_sum", "activation_mean", "activation_max",
    "dead_features", "dense_features", "log_bins", "histogram", "quantiles", "quantiles_from_histogram",
    "l0", "l0_histogram", "l0_summary", "n_valid_tokens",
    "top_examples", "top_tokens", "doc_loss", "bits_per_byte", "reconstruction_quality", "loss_recovered",
    "doc_vectors", "author_specificity", "top_author_features", "cooccurrence", "metric_by_activity",
]
