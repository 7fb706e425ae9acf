"""Names to positions: the one rule the statistics and the torch readers use to turn what a user
asks for (layer types, authors by name, layers by number, documents by position, features by id)
into positions in a run, with the same one-line errors.

A selection given as a scalar (``author="ada"``, ``layer=3``) is marked ``scalar`` so a caller can
drop that dimension from its result, like ``Dataset.sel``. Documents are always taken in stored
order, whatever order they were named in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from saestore import protocol
from saestore.errors import SaestoreError

__all__ = ["as_list", "positions", "doc_positions", "layer_types"]

_SHOWN = 20


def as_list(value: Any) -> tuple[list[Any], bool]:
    """``(items, scalar)``: a string, bytes or integer is one item and marks the selection scalar."""
    if isinstance(value, (str, bytes, int, np.integer)):
        return [value], True
    return list(value), False


def _shown(available: Sequence[Any]) -> str:
    items = list(available)
    return ", ".join(map(repr, items[:_SHOWN])) + (" …" if len(items) > _SHOWN else "")


def positions(name: str, wanted: Any, available: Sequence[Any] | np.ndarray, convert: Callable[[Any], Any], *,
              error: type[SaestoreError]) -> tuple[np.ndarray, bool]:
    """Positions in ``available`` of the ``wanted`` labels (None = all, in stored order), compared
    after ``convert`` (``str`` for authors, ``int`` for layers and features), and whether ``wanted``
    was a scalar. Unknown, repeated or no labels raise ``error`` naming them."""
    available = list(np.asarray(available).tolist()) if isinstance(available, np.ndarray) else list(available)
    if wanted is None:
        return np.arange(len(available), dtype=np.int64), False
    items, scalar = as_list(wanted)
    lookup = {convert(v): i for i, v in enumerate(available)}
    out = []
    for item in items:
        key = convert(item)
        if key not in lookup:
            raise error(f"{name} {item!r} is not in this run; it has {name}s {_shown(available)}")
        out.append(lookup[key])
    if len(set(out)) != len(out):
        raise error(f"{name} selection {items!r} names a {name} twice")
    if not out:
        raise error(f"the {name} selection is empty")
    return np.asarray(out, dtype=np.int64), scalar


def doc_positions(doc: int | slice | Sequence[int] | None, n_docs: int, *, error: type[SaestoreError]) -> np.ndarray:
    """Document positions (``int``, ``slice``, list, negative from the end; None = all) in stored order."""
    if doc is None:
        d_idx = np.arange(n_docs, dtype=np.int64)
    elif isinstance(doc, slice):
        d_idx = np.sort(np.arange(n_docs, dtype=np.int64)[doc])
    else:
        items, _ = as_list(doc)
        d_idx = np.asarray(items, dtype=np.int64)
        if d_idx.size and (d_idx.min() < -n_docs or d_idx.max() >= n_docs):
            raise error(f"doc positions {items!r} are out of range 0…{n_docs - 1}")
        d_idx = np.where(d_idx < 0, d_idx + n_docs, d_idx)
        if np.unique(d_idx).size != d_idx.size:
            raise error(f"doc selection {items!r} names a document twice")
        d_idx = np.sort(d_idx)
    if d_idx.size == 0:
        raise error("the doc selection is empty")
    return d_idx


def layer_types(wanted: str | Sequence[str] | None, present: Sequence[str], *,
                error: type[SaestoreError]) -> tuple[list[str], bool]:
    """The selected layer types (None = every one the run has) and whether one was named as a string."""
    if not present:
        raise error(f"the run holds no SAE variable ({', '.join(protocol.LAYER_TYPES)}); is it a saestore run?")
    if wanted is None:
        return list(present), False
    lts, scalar = as_list(wanted)
    for lt in lts:
        if lt not in present:
            raise error(f"layer type {lt!r} is not in this run; it has {', '.join(present)}")
    if not lts:
        raise error("the layer type selection is empty")
    return [str(lt) for lt in lts], scalar
