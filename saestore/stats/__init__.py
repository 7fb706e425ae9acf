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

A selection as an array: ``ds.sae.to_csr("res", layer=3, feature=[4, 9])`` (scipy CSR, token rows ×
features) and ``ds.sae.dense("res", doc=0, max_bytes=1 << 30)`` (a dense DataArray), see
:mod:`saestore.stats.arrays`.
"""

from __future__ import annotations

from saestore.stats import accessor as _accessor  # noqa: F401  (registers ds.sae)
from saestore.stats._registry import NAMES as _NAMES
from saestore.stats._select import Selection, StatsError, make_selection
from saestore.stats.arrays import dense, to_csr
from saestore.stats.core import (
    activation_count,  # noqa: F401
    activation_max,  # noqa: F401
    activation_mean,  # noqa: F401
    activation_sum,  # noqa: F401
    dead_features,  # noqa: F401
    dense_features,  # noqa: F401
    feature_stats,  # noqa: F401
    frequency,  # noqa: F401
    histogram,  # noqa: F401
    l0,  # noqa: F401
    l0_histogram,  # noqa: F401
    l0_summary,  # noqa: F401
    log_bins,
    n_valid_tokens,  # noqa: F401
    quantiles,  # noqa: F401
    quantiles_from_histogram,
)
from saestore.stats.examples import top_examples, top_tokens  # noqa: F401
from saestore.stats.loss import bits_per_byte, doc_loss  # noqa: F401
from saestore.stats.quality import logit_effects, loss_recovered, quality_metric, reconstruction_quality  # noqa: F401
from saestore.stats.relations import (
    author_specificity,  # noqa: F401
    cooccurrence,  # noqa: F401
    doc_vectors,  # noqa: F401
    metric_by_activity,  # noqa: F401
    top_author_features,  # noqa: F401
)

# __all__ is generated from the one registry (saestore.stats._registry): the names are re-exported.
__all__ = ["Selection", "StatsError", "make_selection", "to_csr", "dense", "log_bins", "quantiles_from_histogram", "quality_metric", *_NAMES]  # noqa: PLE0604
