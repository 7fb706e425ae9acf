"""Optional parts of saestore and the pip extra that brings each one.

``pip install saestore`` is the analyst's install: read a run, compute statistics, ``info``,
``validate``, the ``stats`` CLI. Everything heavier is an extra. :data:`EXTRAS` is the one table of
which importable module each extra provides (pyproject.toml lists the distributions; a test holds
the two together), and :func:`require` turns a missing one into a one-line error naming the extra.
"""

from __future__ import annotations

import importlib.util
from typing import Final

from saestore.errors import MissingExtraError

__all__ = ["EXTRAS", "MissingExtraError", "missing", "require"]

#: extra -> (what it is for, modules it makes importable)
EXTRAS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "extract": ("the model side (python -m saestore.extract)",
                ("torch", "transformer_lens", "sae_lens", "datasets", "transformers", "tokenizers", "safetensors",
                 "simple_parsing", "huggingface_hub")),
    "torch": ("the PyTorch training readers (saestore.torch)", ("torch",)),
    "plots": ("figures (saestore.plots)", ("matplotlib",)),
    "distributed": ("statistics on a dask.distributed cluster (--scheduler)", ("distributed",)),
    "io": ("Parquet and netCDF outputs of the stats CLI", ("pyarrow", "h5netcdf")),
    "s3": ("runs on S3 or an S3-compatible store (s3://…), with the writer lease", ("s3fs",)),
    "scipy": ("scipy.sparse matrices of a selection (ds.sae.to_csr)", ("scipy",)),
    "export": ("the delphi export (python -m saestore export delphi)", ("safetensors",)),
    "bench": ("the benchmarks (python -m saestore.bench)",
              ("torch", "transformer_lens", "sae_lens", "datasets", "transformers", "tokenizers", "safetensors",
               "simple_parsing", "scipy")),
}


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of ``extra`` (or just ``modules`` of it) that cannot be imported here."""
    wanted = EXTRAS[extra][1] if modules is None else modules
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def require(extra: str, *modules: str, what: str | None = None) -> None:
    """Raise MissingExtraError, in one line, when ``modules`` (default: all of the extra's) are absent."""
    absent = missing(extra, modules or None)
    if absent:
        purpose = what or EXTRAS[extra][0]
        raise MissingExtraError(
            f"{purpose} needs the '{extra}' extra ({', '.join(absent)} not installed): "
            f"pip install 'saestore[{extra}]'")
