"""Encoded chunk I/O: the one module of saestore that reaches past zarr's public API.

zarr's public API reads and writes decoded arrays. The sparse path needs one level lower: the
writer encodes a chunk straight from its nonzeros and hands zarr only bytes; the reader decodes a
chunk's bytes straight to ``sparse.COO``. Both need, for one chunk coordinate, its store key, the
chunk spec the codecs expect, the codecs after the serializer (zstd, crc32c), and raw reads and
writes of the store. That is everything here, and nothing else in saestore imports ``zarr.core``
(the codec module uses only the buffer and array-spec types that zarr's guide for codec authors
names).

Sharded arrays (Zarr v3 ``sharding_indexed``, PROTOCOL.md §2.3) are served at the level of their
inner chunks: :func:`read_chunk` reads one inner chunk with two ranged reads (the shard index at the
end of the shard object, then the chunk's bytes), and :func:`write_shard` builds a whole shard from
its inner chunks' serializer bytes, laid out as zarr's own sharding codec lays them out (inner
chunks in order, absent ones marked in the index, the index after them through its own codecs).

Supported: zarr 3.1.x through the newest 3.x, for arrays on a regular grid, unsharded or sharded
along one axis (:func:`is_direct`). The differences between those lines are in :func:`_chunk_spec` alone (zarr 3.1 builds it with ``ArrayV3Metadata.get_chunk_spec``, which zarr
3.2 removed in favour of a chunk-grid lookup); tests/test_chunkio.py holds it to zarr's own
pipeline on whichever zarr is installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync

from saestore import sparse_coo
from saestore.errors import CorruptChunkError, ProtocolError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ZARR_VERSION", "byte_codecs", "chunk_key", "chunk_shape", "chunks_per_shard", "decode_bytes", "delete_chunk",
    "encode_bytes", "is_direct", "max_decoded_size", "read_chunk", "read_stored", "serializer", "shard_shape",
    "write_chunk", "write_shard", "write_stored", "zstd_content_size",
]

ZARR_VERSION: tuple[int, int] = tuple(int(p) for p in zarr.__version__.split(".")[:2])  # type: ignore[assignment]
_PROTOTYPE = default_buffer_prototype()
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NO_CHUNK = 2**64 - 1  # offset and length of an absent inner chunk in a shard index
_INDEX_ENTRY = 16  # bytes per inner chunk in a shard index: offset and length, uint64 little-endian
_CRC32C = 4


def _sharding(arr: zarr.Array) -> ShardingCodec | None:
    codecs = tuple(arr.metadata.codecs)
    return codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None


def _is_plain_index(codec: ShardingCodec) -> bool:
    """The shard index layout zarr writes by default: at the end, ``bytes`` (little-endian) then ``crc32c``."""
    index = tuple(codec.index_codecs)
    return (str(getattr(codec.index_location, "value", codec.index_location)) == "end" and len(index) == 2
            and isinstance(index[0], BytesCodec) and str(getattr(index[0].endian, "value", index[0].endian)) == "little"
            and isinstance(index[1], Crc32cCodec))


def is_direct(arr: zarr.Array) -> bool:
    """True when chunks of ``arr`` can be read and written here: a zarr format 3 array on a regular
    chunk grid whose codec chain is exactly its serializer and then byte codecs (no array->array
    filters), either unsharded or inside a ``sharding_indexed`` codec that shards along at most one
    axis and keeps zarr's default index (at the end, ``bytes`` then ``crc32c``). Everything else
    goes through zarr's own pipeline."""
    if arr.metadata.zarr_format != 3 or arr.filters:
        return False
    if getattr(arr.metadata.chunk_grid, "chunk_shape", None) is None:  # zarr >= 3.3: rectilinear grids
        return False
    sharding = _sharding(arr)
    if sharding is None:
        return arr.shards is None and tuple(arr.metadata.codecs) == (arr.serializer, *arr.compressors)
    inner = tuple(sharding.codecs)
    per_shard = [s // c for s, c in zip(arr.metadata.chunk_grid.chunk_shape, sharding.chunk_shape, strict=True)]
    return (_is_plain_index(sharding) and inner == (arr.serializer, *arr.compressors)
            and sum(n > 1 for n in per_shard) <= 1)


def _require_direct(arr: zarr.Array) -> None:
    if not is_direct(arr):
        raise ProtocolError(f"{arr.store_path}: chunk I/O needs a zarr v3 array on a regular grid, unsharded or "
                            "sharded along one axis with zarr's default index, with no array->array filters "
                            f"(codecs {[c.to_dict()['name'] for c in arr.metadata.codecs]})")


def chunk_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The (regular) chunk shape of ``arr``, inner chunks of a sharded array: the shape every chunk
    is encoded at, edge chunks too."""
    _require_direct(arr)
    sharding = _sharding(arr)
    grid = arr.metadata.chunk_grid.chunk_shape if sharding is None else sharding.chunk_shape
    return tuple(int(c) for c in grid)


def shard_shape(arr: zarr.Array) -> tuple[int, ...] | None:
    """The shard shape of a sharded ``arr`` (the outer chunk grid), or None when it is unsharded."""
    _require_direct(arr)
    return None if _sharding(arr) is None else tuple(int(c) for c in arr.metadata.chunk_grid.chunk_shape)


def chunks_per_shard(arr: zarr.Array) -> tuple[int, ...]:
    """Inner chunks per shard along each axis (all ones for an unsharded array)."""
    shard = shard_shape(arr)
    inner = chunk_shape(arr)
    return tuple(1 for _ in inner) if shard is None else tuple(s // c for s, c in zip(shard, inner, strict=True))


def chunk_key(arr: zarr.Array, coords: Sequence[int]) -> str:
    """The store key of chunk ``coords`` of ``arr`` (relative to the store root); for a sharded
    array, ``coords`` are shard coordinates (the outer grid)."""
    prefix = arr.store_path.path
    key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    return f"{prefix}/{key}" if prefix else key


def _chunk_spec(arr: zarr.Array, coords: tuple[int, ...]) -> ArraySpec:
    """The ArraySpec zarr's own pipeline hands the codecs of (inner) chunk ``coords`` (the version shim)."""
    config = ArrayConfig.from_dict({})
    if _sharding(arr) is None and hasattr(arr.metadata, "get_chunk_spec"):  # zarr 3.1
        return arr.metadata.get_chunk_spec(coords, config, _PROTOTYPE)
    # zarr >= 3.2, and inner chunks of shards: one spec of the full chunk shape
    return ArraySpec(shape=chunk_shape(arr), dtype=arr.metadata.dtype, fill_value=arr.metadata.fill_value,
                     config=config, prototype=_PROTOTYPE)


def serializer(arr: zarr.Array) -> Any:
    """The array→bytes codec of ``arr``'s (inner) chunks."""
    _require_direct(arr)
    return arr.serializer


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
    if isinstance(serializer(arr), SparseCOOCodec):
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


def _require_unsharded(arr: zarr.Array, what: str) -> None:
    if shard_shape(arr) is not None:
        raise ProtocolError(f"{arr.store_path}: {what} one chunk of a sharded array; write whole shards (write_shard)")


def read_stored(arr: zarr.Array, coords: Sequence[int]) -> Buffer | None:
    """The stored bytes of chunk ``coords`` (inner chunk of a sharded array), or None when the chunk
    is absent (all fill value)."""
    coords = tuple(int(c) for c in coords)
    store = arr.store_path.store
    if _sharding(arr) is None:
        return sync(store.get(chunk_key(arr, coords), prototype=_PROTOTYPE))
    per_shard = chunks_per_shard(arr)
    key = chunk_key(arr, tuple(c // n for c, n in zip(coords, per_shard, strict=True)))
    index = _read_index(arr, key, per_shard)
    if index is None:
        return None
    offset, length = (int(x) for x in index[tuple(c % n for c, n in zip(coords, per_shard, strict=True))])
    if offset == _NO_CHUNK and length == _NO_CHUNK:
        return None
    buf = sync(store.get(key, prototype=_PROTOTYPE, byte_range=RangeByteRequest(offset, offset + length)))
    if buf is None or len(buf) != length:
        raise CorruptChunkError(f"shard {key}: its index places chunk {'/'.join(map(str, coords))} at bytes "
                                f"{offset}…{offset + length}, which the shard does not hold")
    return buf


def _read_index(arr: zarr.Array, key: str, per_shard: tuple[int, ...]) -> np.ndarray | None:
    """The (offset, length) pairs of every inner chunk of shard ``key`` (shape ``per_shard + (2,)``),
    or None when the shard is absent; a damaged index is a CorruptChunkError."""
    n = math.prod(per_shard)
    size = _INDEX_ENTRY * n + _CRC32C
    buf = sync(arr.store_path.store.get(key, prototype=_PROTOTYPE, byte_range=SuffixByteRequest(size)))
    if buf is None:
        return None
    if len(buf) != size:
        raise CorruptChunkError(f"shard {key} is {len(buf)} bytes, shorter than its index ({size} bytes)")
    try:  # crc32c needs a spec only for its buffer prototype
        body = Crc32cCodec()._decode_sync(buf, _chunk_spec(arr, (0,) * len(per_shard)))  # checks the checksum
    except ValueError as e:
        raise CorruptChunkError(f"shard {key}: its index fails its checksum ({e})") from e
    return np.frombuffer(body.as_numpy_array().tobytes(), dtype="<u8").reshape(*per_shard, 2)


def write_stored(arr: zarr.Array, coords: Sequence[int], stored: Buffer | bytes) -> None:
    """Store already-encoded bytes as chunk ``coords`` of an unsharded array (one whole-object write)."""
    _require_unsharded(arr, "cannot store")
    buf = stored if isinstance(stored, Buffer) else _PROTOTYPE.buffer.from_bytes(stored)
    sync(arr.store_path.store.set(chunk_key(arr, coords), buf))


def delete_chunk(arr: zarr.Array, coords: Sequence[int]) -> None:
    """Remove chunk ``coords`` (shard coordinates of a sharded array: the whole shard); it then reads
    as the fill value. Absent chunks are fine."""
    sync(arr.store_path.store.delete(chunk_key(arr, coords)))


def read_chunk(arr: zarr.Array, coords: Sequence[int]) -> np.ndarray | None:
    """The serializer bytes of (inner) chunk ``coords`` (uint8, byte codecs undone), or None when absent."""
    stored = read_stored(arr, coords)
    return None if stored is None else decode_bytes(arr, coords, stored)


def write_chunk(arr: zarr.Array, coords: Sequence[int], raw: bytes) -> None:
    """Encode serializer bytes through the byte codecs and store them as chunk ``coords`` of an
    unsharded array."""
    write_stored(arr, coords, encode_bytes(arr, coords, raw))


def write_shard(arr: zarr.Array, shard_coords: Sequence[int], chunks: Mapping[int, bytes]) -> None:
    """Store one whole shard of a sharded ``arr`` from its inner chunks' serializer bytes.

    ``chunks`` maps an inner chunk's position in the shard (0 … chunks per shard − 1, along the one
    sharded axis) to its serializer output; absent positions are chunks of fill value only. The
    shard's bytes are what zarr's ``sharding_indexed`` codec writes for the same chunks (inner chunks
    in order, then the index through ``bytes`` and ``crc32c``); a shard with no chunk is deleted.
    """
    shard_coords = tuple(int(c) for c in shard_coords)
    per_shard = chunks_per_shard(arr)
    if _sharding(arr) is None:
        raise ProtocolError(f"{arr.store_path}: write_shard needs a sharded array")
    n = math.prod(per_shard)
    bad = sorted(i for i in chunks if not 0 <= i < n)
    if bad:
        raise ProtocolError(f"{arr.store_path}: inner chunk positions {bad} are outside a shard of {n} chunks")
    key = chunk_key(arr, shard_coords)
    if not chunks:
        sync(arr.store_path.store.delete(key))
        return
    index = np.full((n, 2), _NO_CHUNK, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    first = tuple(c * p for c, p in zip(shard_coords, per_shard, strict=True))
    for i in range(n):
        raw = chunks.get(i)
        if raw is None:
            continue
        local = np.unravel_index(i, per_shard)
        coords = tuple(f + int(x) for f, x in zip(first, local, strict=True))
        encoded = encode_bytes(arr, coords, raw).to_bytes()
        index[i] = (offset, len(encoded))
        parts.append(encoded)
        offset += len(encoded)
    index_buf = Crc32cCodec()._encode_sync(_PROTOTYPE.buffer.from_bytes(index.tobytes()), _chunk_spec(arr, first))
    parts.append(index_buf.to_bytes())
    sync(arr.store_path.store.set(key, _PROTOTYPE.buffer.from_bytes(b"".join(parts))))
