"""saestore: SAE feature activations on disk, as Zarr v3 stores that open with ``xr.open_zarr``."""

from saestore.errors import SaestoreError

__version__ = "0.1.0"
__all__ = ["SaestoreError", "__version__"]
