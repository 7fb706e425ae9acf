"""saestore: SAE feature activations on disk, as Zarr v3 stores that open with ``xr.open_zarr``.

``saestore.open_run(path)`` opens a run with sparse SAE variables (see :mod:`saestore.reader`).
Submodules are imported lazily so that zarr, when it loads the ``saestore.sparse_coo`` codec through
its entry point, does not pull in xarray, dask or torch.
"""

from __future__ import annotations

from typing import Any

from saestore.errors import SaestoreError

__version__ = "0.1.0"
__all__ = ["SaestoreError", "__version__", "open_run", "stats"]


def __getattr__(name: str) -> Any:
    if name == "open_run":
        from saestore.reader import open_run

        return open_run
    if name == "stats":  # also registers the ``ds.sae`` accessor
        import saestore.stats as stats

        return stats
    raise AttributeError(f"module 'saestore' has no attribute {name!r}")
