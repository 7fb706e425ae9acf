"""Encoded chunk I/O: the one module of saestore that reaches past zarr's public API.

zarr's public API reads and writes decoded arrays. The sparse path needs one level lower: the
writer encodes a chunk straight from its nonzeros and hands zarr only bytes; the reader decodes a
chunk's bytes straight to ``sparse.COO``. Both need, for one chunk coordinate, its store key, the
chunk spec the codecs expect, the codecs after the serializer (zstd, crc32c), and raw reads and
writes of the store. That is everything here, and nothing else in saestore imports ``zarr.core``
(the codec module uses only the buffer and array-spec types that zarr's guide for codec authors
names).

Supported: zarr 3.1.x through the newest 3.x, for unsharded arrays on a regular grid
(:func:`is_direct`). The differences between those lines are in :func:`_chunk_spec` alone (zarr 3.1 builds it with ``ArrayV3Metadata.get_chunk_spec``, which zarr
3.2 removed in favour of a chunk-grid lookup); tests/test_chunkio.py holds it to zarr's own
pipeline on whichever zarr is installed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync

from saestore import sparse_coo
from saestore.errors import CorruptChunkError, ProtocolError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ZARR_VERSION", "byte_codecs", "chunk_key", "chunk_shape", "decode_bytes", "delete_chunk",
    "encode_bytes", "is_direct", "max_decoded_size", "read_chunk", "read_stored", "write_chunk", "write_stored",
    "zstd_content_size",
]

ZARR_VERSION: tuple[int, int] = tuple(int(p) for p in zarr.__version__.split(".")[:2])  # type: ignore[assignment]
_PROTOTYPE = default_buffer_prototype()
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def is_direct(arr: zarr.Array) -> bool:
    """True when chunks of ``arr`` can be read and written here: a zarr format 3 array on a regular
    chunk grid, not sharded, whose codec chain is exactly its serializer and then byte codecs (no
    array->array filters). Everything else goes through zarr's own pipeline."""
    if arr.metadata.zarr_format != 3 or arr.shards is not None or arr.filters:
        return False
    if getattr(arr.metadata.chunk_grid, "chunk_shape", None) is None:  # zarr >= 3.3: rectilinear grids
        return False
    return tuple(arr.metadata.codecs) == (arr.serializer, *arr.compressors)


def _require_direct(arr: zarr.Array) -> None:
    if not is_direct(arr):
        raise ProtocolError(f"{arr.store_path}: chunk I/O needs an unsharded zarr v3 array on a regular grid "
                            f"with no array->array filters (codecs {[c.to_dict()['name'] for c in arr.metadata.codecs]})")


def chunk_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The (regular) chunk shape of ``arr``: the shape every chunk is encoded at, edge chunks too."""
    _require_direct(arr)
    return tuple(int(c) for c in arr.metadata.chunk_grid.chunk_shape)


def chunk_key(arr: zarr.Array, coords: Sequence[int]) -> str:
    """The store key of chunk ``coords`` of ``arr`` (relative to the store root)."""
    prefix = arr.store_path.path
    key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    return f"{prefix}/{key}" if prefix else key


def _chunk_spec(arr: zarr.Array, coords: tuple[int, ...]) -> ArraySpec:
    """The ArraySpec zarr's own pipeline hands the codecs of chunk ``coords`` (the version shim)."""
    config = ArrayConfig.from_dict({})
    if hasattr(arr.metadata, "get_chunk_spec"):  # zarr 3.1
        return arr.metadata.get_chunk_spec(coords, config, _PROTOTYPE)
    # zarr >= 3.2: regular grids share one spec of the full chunk shape (zarr.core.array._get_selection)
    return ArraySpec(shape=chunk_shape(arr), dtype=arr.metadata.dtype, fill_value=arr.metadata.fill_value,
                     config=config, prototype=_PROTOTYPE)


def byte_codecs(arr: zarr.Array) -> tuple[Any, ...]:
    """The bytes→bytes codecs that follow the serializer (e.g. zstd, crc32c), in encoding order.

    Raises ProtocolError for arrays the direct path cannot serve (see :func:`is_direct`).
    """
    _require_direct(arr)
    return tuple(arr.compressors)


def max_decoded_size(arr: zarr.Array) -> int:
    """The largest number of bytes the serializer of ``arr`` can be handed for one chunk.

    For ``saestore.sparse_coo`` it is the format's own bound (:func:`saestore.sparse_coo.max_chunk_size`);
    for fixed-size serializers, the chunk's dense size.
    """
    from saestore.codec import SparseCOOCodec  # here, not at import: the codec module is loaded by zarr's entry point

    shape = chunk_shape(arr)
    if isinstance(arr.serializer, SparseCOOCodec):
        return sparse_coo.max_chunk_size(math.prod(shape[:-1]), shape[-1])
    return math.prod(shape) * np.dtype(arr.metadata.dtype.to_native_dtype()).itemsize


def zstd_content_size(frame: np.ndarray | bytes) -> int | None:
    """Content size a zstd frame header declares (RFC 8878 §3.1.1.1), or None when absent/unparsable."""
    head = bytes(frame[:18])
    if len(head) < 5 or head[:4] != _ZSTD_MAGIC:
        return None
    fhd = head[4]
    fcs_flag, single, did_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def encode_bytes(arr: zarr.Array, coords: Sequence[int], raw: bytes) -> Buffer:
    """Serializer output of chunk ``coords`` -> the bytes stored for it (through every byte codec)."""
    coords = tuple(int(c) for c in coords)
    spec = _chunk_spec(arr, coords)
    buf = _PROTOTYPE.buffer.from_bytes(raw)
    for codec in byte_codecs(arr):
        buf = codec._encode_sync(buf, spec)
    return buf


def decode_bytes(arr: zarr.Array, coords: Sequence[int], stored: Buffer) -> np.ndarray:
    """Stored bytes of chunk ``coords`` -> serializer input (uint8), undoing every byte codec.

    A zstd frame that claims more than :func:`max_decoded_size` is refused with CorruptChunkError
    before numcodecs allocates what the header claims (a crafted chunk could claim 2^62 bytes).
    """
    coords = tuple(int(c) for c in coords)
    spec = _chunk_spec(arr, coords)
    largest = max_decoded_size(arr)
    buf = stored
    for codec in reversed(byte_codecs(arr)):
        if isinstance(codec, ZstdCodec):
            claimed = zstd_content_size(buf.as_numpy_array())
            if claimed is not None and claimed > largest:
                raise CorruptChunkError(
                    f"zstd frame claims {claimed} bytes, more than the largest possible chunk ({largest})")
        buf = codec._decode_sync(buf, spec)
    return buf.as_numpy_array()


def read_stored(arr: zarr.Array, coords: Sequence[int]) -> Buffer | None:
    """The stored bytes of chunk ``coords``, or None when the chunk is absent (all fill value)."""
    return sync(arr.store_path.store.get(chunk_key(arr, coords), prototype=_PROTOTYPE))


def write_stored(arr: zarr.Array, coords: Sequence[int], stored: Buffer | bytes) -> None:
    """Store already-encoded bytes as chunk ``coords`` (one whole-object write)."""
    buf = stored if isinstance(stored, Buffer) else _PROTOTYPE.buffer.from_bytes(stored)
    sync(arr.store_path.store.set(chunk_key(arr, coords), buf))


def delete_chunk(arr: zarr.Array, coords: Sequence[int]) -> None:
    """Remove chunk ``coords`` (it then reads as the fill value); absent chunks are fine."""
    sync(arr.store_path.store.delete(chunk_key(arr, coords)))


def read_chunk(arr: zarr.Array, coords: Sequence[int]) -> np.ndarray | None:
    """The serializer bytes of chunk ``coords`` (uint8, byte codecs undone), or None when absent."""
    stored = read_stored(arr, coords)
    return None if stored is None else decode_bytes(arr, coords, stored)


def write_chunk(arr: zarr.Array, coords: Sequence[int], raw: bytes) -> None:
    """Encode serializer bytes through the byte codecs and store them as chunk ``coords``."""
    write_stored(arr, coords, encode_bytes(arr, coords, raw))
