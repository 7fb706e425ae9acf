"""Per-document loss and bits-per-byte, from the stored per-token CE (PROTOCOL.md §2.4).

``bits`` of a document is its summed CE over valid tokens converted to bits (``Σ ce / ln 2``);
``bytes`` is the length of its stored ``text`` in UTF-8; ``bits_per_byte = bits / bytes``. Each
stored token's CE is its loss given everything before it (BOS and prompt included), so the sum is
the model's code length of the document's tokens. A truncated document (``n_truncated > 0``) has CE
for only part of its text: its ``bits_per_byte`` is NaN and it is left out of author aggregates.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from saestore.stats._select import select_labels

__all__ = ["doc_loss", "bits_per_byte"]


def _utf8_bytes(block: np.ndarray) -> np.ndarray:
    flat = [len(str(t).encode("utf-8")) for t in np.asarray(block, dtype=object).ravel()]
    return np.asarray(flat, dtype=np.int64).reshape(np.shape(block))


def doc_loss(ds: xr.Dataset, *, author: Any = None) -> xr.Dataset:
    """Per document: ``n_tokens``, ``mean_ce`` (nats/token), ``bits``, ``bytes``, ``bits_per_byte``
    and ``truncated``; dims ``(author, doc)``; missing documents have ``n_tokens == 0`` and NaN."""
    ds = select_labels(ds, author, None)
    valid = ds["valid_mask"]
    ce = ds["ce_loss"].where(valid, 0.0)
    n_tokens = valid.sum("tok", dtype="i8")
    nats = ce.sum("tok", dtype="f8")
    text = ds["text"].data
    nbytes = (da.map_blocks(_utf8_bytes, text, dtype=np.int64) if isinstance(text, da.Array)
              else _utf8_bytes(text))
    nbytes = xr.DataArray(nbytes, dims=ds["text"].dims, coords=ds["text"].coords)
    truncated = ds["n_truncated"] > 0
    usable = (n_tokens > 0) & ~truncated & (nbytes > 0)
    bits = nats / math.log(2)
    out = xr.Dataset({
        "n_tokens": n_tokens,
        "mean_ce": (nats / n_tokens.where(n_tokens > 0)),
        "bits": bits.where(n_tokens > 0),
        "bytes": nbytes,
        "bits_per_byte": (bits / nbytes.where(nbytes > 0)).where(usable),
        "truncated": truncated,
    })
    out["mean_ce"].attrs["units"] = "nats/token"
    out["bits_per_byte"].attrs["long_name"] = "summed CE in bits / UTF-8 bytes of the stored text"
    return out


def bits_per_byte(ds: xr.Dataset, *, by: str | None = "author", author: Any = None) -> xr.Dataset:
    """Aggregate over documents (``by="author"`` or pooled): ``bits_per_byte = Σ bits / Σ bytes`` and
    ``mean_ce = Σ nats / Σ tokens`` over untruncated documents, with ``n_docs`` and ``n_tokens``."""
    per_doc = doc_loss(ds, author=author)
    usable = per_doc["bits_per_byte"].notnull()
    dims = ("doc",) if by == "author" else ("author", "doc")
    bits = per_doc["bits"].where(usable, 0.0).sum(dims)
    nbytes = per_doc["bytes"].where(usable, 0).sum(dims)
    tokens = per_doc["n_tokens"].where(usable, 0).sum(dims)
    return xr.Dataset({
        "bits_per_byte": bits / nbytes,
        "mean_ce": bits * math.log(2) / tokens,
        "n_docs": usable.sum(dims),
        "n_tokens": tokens,
        "bytes": nbytes,
    })
