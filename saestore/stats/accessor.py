"""The ``ds.sae`` accessor: every statistic of :mod:`saestore.stats` as a method of a run Dataset.

``ds.sae.frequency(layer_type="res", by="author")`` is ``saestore.stats.frequency(ds, "res",
by="author")``; the arguments and results are the functions' (see their docstrings). Besides the
statistics, ``ds.sae.to_csr(var, **sel)`` and ``ds.sae.dense(var, max_bytes=..., **sel)``
(:mod:`saestore.stats.arrays`) give a selection as a scipy CSR matrix or a dense DataArray, since
sparse-backed variables refuse ``.values``. Registered when :mod:`saestore.stats` is imported.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable
from typing import Any

import xarray as xr

from saestore.stats import arrays
from saestore.stats._registry import NAMES, function

__all__ = ["SaeAccessor", "METHODS"]

METHODS: tuple[str, ...] = NAMES


def _method(name: str) -> Callable[..., Any]:
    fn = function(name)

    @functools.wraps(fn)
    def call(self: SaeAccessor, *args: Any, **kwargs: Any) -> Any:
        return fn(self._ds, *args, **kwargs)

    call.__qualname__ = f"SaeAccessor.{name}"
    return call


@xr.register_dataset_accessor("sae")
class SaeAccessor:
    """``ds.sae.<statistic>(...)``: lazy SAE feature statistics of a saestore run Dataset (the
    methods are generated from :mod:`saestore.stats._registry`; listed below)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(METHODS))

    @functools.wraps(arrays.to_csr)
    def to_csr(self, var: str, **kwargs: Any) -> Any:
        return arrays.to_csr(self._ds, var, **kwargs)

    @functools.wraps(arrays.dense)
    def dense(self, var: str, **kwargs: Any) -> xr.DataArray:
        return arrays.dense(self._ds, var, **kwargs)


for _name in METHODS:
    setattr(SaeAccessor, _name, _method(_name))
SaeAccessor.__doc__ = (SaeAccessor.__doc__ or "") + "\n" + textwrap.fill(
    "Methods: " + ", ".join(METHODS) + "; to_csr, dense.", width=100, initial_indent="    ", subsequent_indent="    ") + "\n"
