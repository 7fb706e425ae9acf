"""The one list of statistics: every public statistic of :mod:`saestore.stats` is registered here
once, and the package's ``__all__``, the ``ds.sae`` accessor's methods and the CLI's ``--stat``
choices are generated from it.

Selection signature: every statistic takes the run Dataset first; the SAE statistics then take
``layer_type`` and the keyword selection ``author``, ``layer``, ``doc``, ``feature`` (see
:func:`saestore.stats._select.make_selection`); ``by`` is accepted where ``Stat.by`` is True. The
token-level ``doc_loss`` / ``bits_per_byte`` take ``author`` only (``Stat.sae`` False).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Stat", "STATISTICS", "NAMES", "RANK_BY", "function", "cli_stats"]


@dataclass(frozen=True)
class Stat:
    """One statistic: its function name, the ``saestore.stats`` module defining it, whether it takes
    ``by``, whether it takes the SAE selection (``layer_type``, ``layer``, ``doc``, ``feature``) and
    its ``--stat`` names (name → variable of the result to keep, or None for all of it)."""

    name: str
    module: str
    by: bool = False
    sae: bool = True
    cli: tuple[tuple[str, str | None], ...] = ()


_FEATURE_VARS = (("count", "count"), ("frequency", "frequency"), ("sum", "sum"), ("mean", "mean"),
                 ("mean_active", "mean_active"), ("max", "max"))

STATISTICS: tuple[Stat, ...] = (
    Stat("feature_stats", "core", by=True, cli=(("feature_stats", None), *_FEATURE_VARS)),
    Stat("activation_count", "core", by=True),
    Stat("frequency", "core", by=True),
    Stat("activation_sum", "core", by=True),
    Stat("activation_mean", "core", by=True),
    Stat("activation_max", "core", by=True),
    Stat("dead_features", "core", by=True, cli=(("dead", None),)),
    Stat("dense_features", "core", by=True, cli=(("dense", None),)),
    Stat("histogram", "core", by=True, cli=(("histogram", None),)),
    Stat("quantiles", "core", by=True, cli=(("quantiles", None),)),
    Stat("l0", "core", cli=(("l0", None),)),
    Stat("l0_histogram", "core", by=True, cli=(("l0_histogram", None),)),
    Stat("l0_summary", "core", by=True, cli=(("l0_summary", None),)),
    Stat("n_valid_tokens", "core", by=True),
    Stat("top_examples", "examples", by=True, cli=(("top_examples", None),)),
    Stat("top_tokens", "examples", by=True, cli=(("top_tokens", None),)),
    Stat("doc_vectors", "relations", cli=(("doc_vectors", None),)),
    Stat("author_specificity", "relations", cli=(("author_specificity", None),)),
    Stat("top_author_features", "relations", cli=(("top_author_features", None),)),
    Stat("cooccurrence", "relations", by=True, cli=(("cooccurrence", None),)),
    Stat("metric_by_activity", "relations", by=True, cli=(("metric_by_activity", None),)),
    Stat("doc_loss", "loss", sae=False, cli=(("doc_loss", None),)),
    Stat("bits_per_byte", "loss", by=True, sae=False, cli=(("bits_per_byte", None),)),
    Stat("reconstruction_quality", "quality", by=True),
    Stat("loss_recovered", "quality", by=True),
    Stat("logit_effects", "quality"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STATISTICS)

#: what ranks the partners of ``cooccurrence(top_k=)`` (the first is the default); here, not in the
#: kernels, so the CLI's choices need no numpy import
RANK_BY: tuple[str, ...] = ("jaccard", "count", "p_given_query", "lift")
BY_NAME: dict[str, Stat] = {s.name: s for s in STATISTICS}


def function(name: str) -> Callable[..., Any]:
    """The function of statistic ``name``."""
    stat = BY_NAME[name]
    return getattr(importlib.import_module(f"saestore.stats.{stat.module}"), name)


def cli_stats() -> dict[str, tuple[str, str | None]]:
    """``--stat`` name → (statistic, variable to keep or None)."""
    return {cli: (s.name, var) for s in STATISTICS for cli, var in s.cli}
