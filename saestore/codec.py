"""Zarr v3 and numcodecs wrappers around the :mod:`saestore.sparse_coo` byte format.

Both are registered through entry points (``zarr.codecs`` and ``numcodecs.codecs``, name
``saestore.sparse_coo``), so any process where saestore is installed decodes a run store with
plain ``xr.open_zarr`` without importing saestore.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numcodecs.abc import Codec as _NumcodecsCodec
from numcodecs.compat import ensure_contiguous_ndarray, ensure_ndarray_like
from zarr.abc.codec import ArrayBytesCodec

from saestore import sparse_coo
from saestore.errors import CodecConfigError, CodecEncodeError, CorruptChunkError

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

CODEC_NAME = "saestore.sparse_coo"
ALLOWED_ARRAY_DTYPES = ("float32", "float16")


def _parse_configuration(configuration: dict[str, Any] | None) -> dict[str, Any]:
    configuration = dict(configuration or {})
    value_dtype = configuration.pop("value_dtype", "float32")
    if configuration:
        raise CodecConfigError(f"{CODEC_NAME}: unknown configuration keys {sorted(configuration)}")
    if value_dtype not in sparse_coo.VALUE_DTYPES:
        raise CodecConfigError(
            f"{CODEC_NAME}: value_dtype {value_dtype!r} is not one of {sorted(sparse_coo.VALUE_DTYPES)}"
        )
    return {"value_dtype": value_dtype}


@dataclass(frozen=True)
class SparseCOOCodec(ArrayBytesCodec):
    """Zarr v3 array→bytes codec storing only nonzeros (see PROTOCOL.md, "Codec").

    ``value_dtype`` is how values are stored: ``float32`` (exact), ``float16`` or ``bfloat16``
    (rounded to nearest; PROTOCOL.md gives the error bound). The array itself stays float32.
    """

    is_fixed_size: ClassVar[bool] = False
    value_dtype: str = "float32"

    def __post_init__(self) -> None:
        _parse_configuration({"value_dtype": self.value_dtype})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        name = data.get("name")
        if name != CODEC_NAME:
            raise CodecConfigError(f"expected codec name {CODEC_NAME!r}, got {name!r}")
        return cls(**_parse_configuration(data.get("configuration")))

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"value_dtype": self.value_dtype}}

    def _check_dtype(self, dtype: Any) -> None:
        native = np.dtype(dtype.to_native_dtype())
        if native.name not in ALLOWED_ARRAY_DTYPES:
            raise CodecConfigError(f"{CODEC_NAME} stores float arrays ({ALLOWED_ARRAY_DTYPES}), not {native}")
        if native == np.float16 and self.value_dtype == "bfloat16":
            raise CodecConfigError(
                f"{CODEC_NAME}: value_dtype 'bfloat16' rounds float16 values near 65504 up to 65536, which is inf "
                "in a float16 array; use value_dtype 'float16' or 'float32' for float16 arrays"
            )

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        self._check_dtype(dtype)
        if len(shape) < 1:
            raise CodecConfigError(f"{CODEC_NAME} needs arrays with at least one dimension")

    def evolve_from_array_spec(self, array_spec: ArraySpec) -> Self:
        self._check_dtype(array_spec.dtype)  # before the fill check, which assumes a real float
        fill = array_spec.fill_value
        if fill is None or float(fill) != 0.0 or np.signbit(fill):
            raise CodecConfigError(
                f"{CODEC_NAME} needs fill_value 0.0 (got {fill!r}); pass fill_value=0.0 "
                "(xarray: encoding={'var': {'fill_value': 0.0}})"
            )
        return self

    def resolve_metadata(self, chunk_spec: ArraySpec) -> ArraySpec:
        return chunk_spec

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError(f"{CODEC_NAME} output size depends on the data")

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        raw = sparse_coo.encode_dense(chunk_array.as_numpy_array(), self.value_dtype)
        if sparse_coo.read_header(raw).nnz == 0:
            return None  # nothing stored (-0.0 or underflow only): the chunk is absent, as the writer does
        return chunk_spec.prototype.buffer.from_bytes(raw)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        dtype = np.dtype(chunk_spec.dtype.to_native_dtype())
        dense = sparse_coo.decode_dense(chunk_bytes.as_numpy_array(), tuple(chunk_spec.shape), dtype,
                                        value_dtype=self.value_dtype)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(dense)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def with_value_dtype(self, value_dtype: str) -> Self:
        return replace(self, value_dtype=value_dtype)


class SparseCOONumcodec(_NumcodecsCodec):
    """The same byte format as a numcodecs ``Codec`` (for zarr format 2 and numcodecs users).

    numcodecs passes flat buffers, so the chunk shape travels in the configuration as
    ``n_cols`` (the length of the last axis). ``decode`` returns a flat float32 array, which
    zarr v2 and ``numcodecs`` callers reshape as usual.
    """

    codec_id = CODEC_NAME

    def __init__(self, n_cols: int, value_dtype: str = "float32") -> None:
        self.n_cols = int(n_cols)
        if not 1 <= self.n_cols <= sparse_coo.MAX_COLS:
            raise CodecConfigError(f"{CODEC_NAME}: n_cols must be in [1, {sparse_coo.MAX_COLS}], got {n_cols}")
        self.value_dtype = _parse_configuration({"value_dtype": value_dtype})["value_dtype"]

    def encode(self, buf: Any) -> bytes:
        arr = ensure_ndarray_like(buf)
        if arr.dtype.kind != "f":
            raise CodecEncodeError(f"{CODEC_NAME} encodes float arrays, got {arr.dtype}")
        flat = arr.reshape(-1)
        if flat.size % self.n_cols:
            raise CodecEncodeError(f"buffer of {flat.size} values is not a whole number of {self.n_cols}-wide rows")
        return sparse_coo.encode_dense(flat.reshape(-1, self.n_cols), self.value_dtype)

    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        data = ensure_contiguous_ndarray(buf).view(np.uint8).reshape(-1)
        header = sparse_coo.read_header(data)
        if header.n_cols != self.n_cols:
            raise CorruptChunkError(f"chunk has {header.n_cols} columns, codec configured for {self.n_cols}")
        dense = sparse_coo.decode_dense(data, (header.n_rows, header.n_cols), value_dtype=self.value_dtype).reshape(-1)
        if out is not None:
            out_arr = np.asarray(out).reshape(-1)
            out_arr[...] = dense.astype(out_arr.dtype, copy=False)
            return out
        return dense

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "n_cols": self.n_cols, "value_dtype": self.value_dtype}
