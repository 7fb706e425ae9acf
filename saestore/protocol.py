"""The run-store format's constants, variable table and root-attribute model (PROTOCOL.md).

Everything here is normative through PROTOCOL.md; tests parse PROTOCOL.md and compare its tables
and examples with these definitions and with the JSON Schemas in ``schema/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Final, Literal

from saestore.errors import ProtocolError, ProtocolVersionError

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = "1.3"
LAYOUT: Final = "saestore.run"
ATTRS_KEY: Final = "saestore"  # the root attribute holding RunAttrs
PROGRESS_PATH: Final = "_saestore/progress"
PROGRESS_FIELDS: Final = ("done", "n_valid_tokens", "n_nonzero", "written_at_ns")

SAE_DIMS: Final = ("author", "layer", "doc", "tok", "feature")
TOKEN_DIMS: Final = ("author", "doc", "tok")
DOC_DIMS: Final = ("author", "doc")
SAE_DOC_DIMS: Final = ("author", "layer", "doc")
METRIC_DIMS: Final = ("author", "layer", "doc", "tok", "metric")
SUMMARY_DIMS: Final = ("author", "layer", "doc_chunk", "feature", "summary")
SHARD_SUMMARY_DIMS: Final = ("author", "layer", "shard", "feature", "summary")
COORDS: Final = ("author", "layer", "doc", "tok", "feature", "metric", "doc_column", "logit_rank", "summary")
#: the protocol version that added each coordinate (absent: 1.0)
COORDS_SINCE: Final = {"metric": "1.2", "doc_column": "1.2", "logit_rank": "1.2", "summary": "1.2"}
#: optional coordinates: coordinate → the extraction option (the table's ``when``) that adds it with
#: its variables; a run without the option has neither (PROTOCOL.md §2.7, §2.8)
OPTIONAL_COORDS: Final = {"doc_column": "doc_columns", "logit_rank": "logit_effects", "summary": "summaries"}
#: the default documents per shard (a multiple of chunk_docs near it is used; PROTOCOL.md §2.3)
DEFAULT_SHARD_DOCS: Final = 128
Status = Literal["running", "complete", "failed", "interrupted"]
StorageFormat = Literal["sparse", "dense"]
ValueDtype = Literal["float32", "float16", "bfloat16"]
"""a float dtype of stored values (and of the model: ``--dtype``)."""
LayerType = Literal["res", "mlp", "att"]
STATUSES: Final = typing.get_args(Status)
STORAGE_FORMATS: Final = typing.get_args(StorageFormat)
VALUE_DTYPES: Final = typing.get_args(ValueDtype)
LAYER_TYPES: Final = typing.get_args(LayerType)
#: the placeholder for a layer type in the variable table (``T`` is the SAE variable, ``T_cos`` …)
LAYER_TYPE_PLACEHOLDER: Final = "T"
#: zstd levels of the codec chains (PROTOCOL.md §2.4)
SPARSE_ZSTD_LEVEL: Final = 3
DENSE_ZSTD_LEVEL: Final = 1
VARIABLE_ZSTD_LEVEL: Final = 3

Codec = tuple[str, dict[str, Any]]
"""One codec of a chain: its Zarr v3 name and configuration."""


@dataclass(frozen=True, kw_only=True)
class VariableSpec:
    """One array of the run group: a row of schema/variables.json with its layer type filled in.

    It knows everything the writer needs to create it and ``validate`` needs to check it: dims,
    data type, fill value, chunk shape (:meth:`chunk_shape`, §2.3) and codec chain (:meth:`codecs`,
    §2.4), and the padding rule of §2.5 its values follow (``at_padding`` / ``at_missing``).
    """

    name: str
    dims: tuple[str, ...]
    dtype: str  # zarr v3 data type name
    fill_value: Any
    meaning: str
    since: str = "1.0"
    when: str | None = None
    """the extraction option that adds this variable (``loss_recovered``), or None: always stored."""
    at_padding: Literal["exactly", "always"] | None = None
    """per-token variables: the fill value marks padding ``exactly`` (iff padding) or ``always`` (padding
    holds it; a valid token may too)."""
    at_missing: Literal["exactly", "always"] | None = None
    """per-document variables: the same for missing documents (``doc >= n_docs``)."""

    @property
    def is_sae(self) -> bool:
        """True for the SAE activation variables (one per layer type, dims ``SAE_DIMS``)."""
        return self.dims == SAE_DIMS

    @property
    def zarr_fill_value(self) -> Any:
        """The fill value as zarr takes it (``"NaN"`` → float NaN)."""
        return float("nan") if self.fill_value == "NaN" else self.fill_value

    @property
    def per_doc_chunk(self) -> bool:
        """True for variables with a ``doc`` or a ``doc_chunk`` dim: chunked (and sharded) by doc-chunk."""
        return "doc" in self.dims or "doc_chunk" in self.dims

    def chunk_shape(self, shape: tuple[int, ...], chunk_docs: int, doc_chunks: int = 1) -> tuple[int, ...]:
        """§2.3: one chunk per author, layer and doc-chunk (``doc_chunks`` of them along ``doc_chunk``),
        whole along ``tok``, ``feature``, ``metric`` and ``summary``; one chunk per author, layer and
        shard for a variable with a ``shard`` dim (§2.8); a variable without any of them is one chunk."""
        if "shard" in self.dims:  # §2.8: one chunk per author, layer and shard
            return tuple(1 if d in ("author", "layer", "shard") else n for d, n in zip(self.dims, shape, strict=True))
        if not self.per_doc_chunk:
            return tuple(shape)
        per_dim = {"author": 1, "layer": 1, "doc": chunk_docs, "doc_chunk": doc_chunks}
        return tuple(per_dim.get(d, n) for d, n in zip(self.dims, shape, strict=True))

    def shard_shape(self, shape: tuple[int, ...], storage: StorageInfo) -> tuple[int, ...] | None:
        """§2.3: the shard of a variable with a ``doc`` (``doc_chunk``) dim is its chunk with
        ``shard_docs`` documents (``shard_docs / chunk_docs`` doc-chunks); None for variables without
        one and for unsharded (1.1) stores."""
        if not self.per_doc_chunk or storage.shard_docs is None:
            return None
        return self.chunk_shape(shape, storage.shard_docs, storage.chunks_per_shard)

    def data_type(self, storage: StorageInfo) -> str:
        """The array's Zarr data type: dense SAE arrays store their value dtype, the rest as listed."""
        if self.is_sae and storage.format == "dense":
            if storage.value_dtype == "bfloat16":
                raise ProtocolError("bfloat16 values need --storage_format sparse (zarr has no bfloat16 data type)")
            return storage.value_dtype
        return self.dtype

    def codecs(self, storage: StorageInfo) -> tuple[Codec, ...]:
        """§2.4: serializer, then zstd, then crc32c."""
        if self.is_sae and storage.format == "sparse":
            serializer: Codec = ("saestore.sparse_coo", {"value_dtype": storage.value_dtype})
            level = SPARSE_ZSTD_LEVEL
        elif self.is_sae:
            serializer, level = ("bytes", {"endian": "little"}), DENSE_ZSTD_LEVEL
        else:
            return plain_codecs(self.dtype)
        return (serializer, ("zstd", {"level": level, "checksum": False}), ("crc32c", {}))

    def for_layer_type(self, layer_type: str) -> VariableSpec:
        """This table row with its layer-type placeholder ``T`` replaced by ``layer_type``."""
        ph = LAYER_TYPE_PLACEHOLDER
        name = layer_type + self.name[len(ph):]
        return dataclasses.replace(self, name=name, meaning=re.sub(rf"\b{ph}\b", layer_type, self.meaning))

    @property
    def per_layer_type(self) -> bool:
        ph = LAYER_TYPE_PLACEHOLDER
        return self.name == ph or self.name.startswith(ph + "_")


def plain_codecs(dtype: str) -> tuple[Codec, ...]:
    """§5.1: the chain of every array but the SAE variables (per-token and per-document variables,
    coordinates, progress markers): ``bytes`` (little-endian), or ``vlen-utf8`` for strings, then
    zstd, then crc32c."""
    serializer: Codec = ("vlen-utf8", {}) if dtype == "string" else ("bytes", {"endian": "little"})
    return (serializer, ("zstd", {"level": VARIABLE_ZSTD_LEVEL, "checksum": False}), ("crc32c", {}))


def _load_variables_json() -> dict[str, Any]:
    return json.loads((Path(__file__).resolve().parent / "schema" / "variables.json").read_text(encoding="utf-8"))


def _load_table() -> tuple[VariableSpec, ...]:
    return tuple(VariableSpec(**{**v, "dims": tuple(v["dims"])}) for v in _load_variables_json()["variables"])


def _load_metrics(key: str = "metrics") -> dict[str, str]:
    return {m["name"]: m["meaning"] for m in _load_variables_json()[key]}


#: every row of schema/variables.json, in its order (``T`` rows are templates, one per layer type)
VARIABLE_TABLE: Final = _load_table()
#: the always-present variables without a layer type (PROTOCOL.md §2.2)
VARIABLES: Final = tuple(v for v in VARIABLE_TABLE if not v.per_layer_type and v.when is None)
#: per-token reconstruction metrics stored for every SAE (PROTOCOL.md §2.6): the ``metric`` coordinate
#: of the ``{layer_type}_quality`` variables, in order, and what each means
QUALITY_METRICS: Final = _load_metrics()
QUALITY_FIELDS: Final = QUALITY_METRICS  # the name 1.1 code used
#: per-feature summaries of a doc-chunk (PROTOCOL.md §2.8): the ``summary`` coordinate of the
#: ``{layer_type}_summary`` variables, in order, and what each means
SUMMARY_FIELDS: Final = _load_metrics("summaries")


def quality_name(layer_type: str) -> str:
    """The variable holding the §2.6 per-token metrics of one layer type (``res_quality`` …)."""
    return next(v for v in VARIABLE_TABLE if v.dims == METRIC_DIMS).for_layer_type(layer_type).name


def run_variables(layer_types: tuple[str, ...], *, options: tuple[str, ...] = ()) -> tuple[VariableSpec, ...]:
    """Every variable of a run with these layer types and extraction ``options`` (e.g. ``loss_recovered``),
    in table order; a run of consecutive ``T`` rows expands layer type by layer type."""
    bad = [lt for lt in layer_types if lt not in LAYER_TYPES]
    if bad:
        raise ProtocolError(f"unknown layer type(s) {bad}: use {', '.join(LAYER_TYPES)}")
    out: list[VariableSpec] = []
    block: list[VariableSpec] = []

    def flush() -> None:
        out.extend(t.for_layer_type(lt) for lt in layer_types for t in block)
        block.clear()

    for row in VARIABLE_TABLE:
        if row.when is not None and row.when not in options:
            continue
        if row.per_layer_type and not row.is_sae:
            block.append(row)
            continue
        flush()
        out.extend(row.for_layer_type(lt) for lt in layer_types) if row.per_layer_type else out.append(row)
    flush()
    return tuple(out)


#: every extraction option that adds variables (the ``when`` values of the table), in table order
OPTIONS: Final = tuple(dict.fromkeys(v.when for v in VARIABLE_TABLE if v.when is not None))


def stored_options(names: typing.Container[str]) -> tuple[str, ...]:
    """The extraction options a run group holds, from its child nodes (the group itself, or their names;
    only ``in`` is used, so no member's metadata is parsed): an option is
    stored when the first variable without a layer type it adds is there (``loss_recovered``: ``ce_clean``;
    ``char_offsets``: ``char_start``), or, for an option with an optional coordinate, that coordinate
    (``doc_columns``: ``doc_column``; ``logit_effects``: ``logit_rank``; PROTOCOL.md §2.7)."""
    marks = {o: c for c, o in OPTIONAL_COORDS.items()}  # an option with a coordinate: the coordinate
    return tuple(o for o in OPTIONS if (marks.get(o) or next(v.name for v in VARIABLE_TABLE
                                                              if v.when == o and not v.per_layer_type)) in names)


def summary_name(layer_type: str) -> str:
    """The variable holding the §2.8 per-feature doc-chunk summaries of one layer type (``res_summary`` …)."""
    return next(v for v in VARIABLE_TABLE if v.dims == SUMMARY_DIMS).for_layer_type(layer_type).name


def shard_summary_name(layer_type: str) -> str:
    """The variable holding the §2.8 per-feature shard summaries of one layer type (``res_shard_summary`` …)."""
    return next(v for v in VARIABLE_TABLE if v.dims == SHARD_SUMMARY_DIMS).for_layer_type(layer_type).name


def sae_variable(layer_type: str) -> VariableSpec:
    """The SAE activation variable of one layer type (``res``, ``mlp`` or ``att``)."""
    return next(v for v in VARIABLE_TABLE if v.is_sae).for_layer_type(layer_type)


def quality_variables(layer_types: tuple[str, ...], loss_recovered: bool) -> tuple[VariableSpec, ...]:
    """Reconstruction-quality variables (always) and loss-recovered variables (``--loss_recovered``)."""
    options = ("loss_recovered",) if loss_recovered else ()
    return tuple(v for v in run_variables(layer_types, options=options) if not v.is_sae and v not in VARIABLES)


def _check_plain_json(obj: Any, where: str) -> None:
    """Raise ProtocolError unless ``obj`` is plain JSON: str-keyed objects, arrays, strings, finite
    numbers, booleans and null (tuples count as arrays)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(f"config{where} holds a string that is not valid Unicode (a lone surrogate); "
                                    "use well-formed text") from None
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ProtocolError(f"config{where} is {obj}: NaN and infinities have no JSON form; use null or a number")
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_plain_json(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ProtocolError(f"config{where} has the key {key!r} of type {type(key).__name__}; "
                                    "JSON object keys are strings")
            _check_plain_json(key, f"{where} key {key!r}")
            _check_plain_json(value, f"{where}[{key!r}]")
        return
    raise ProtocolError(f"config{where} is a {type(obj).__name__}, not plain JSON; convert it to a JSON type")


def canonical_json(obj: Any) -> str:
    """The canonical JSON text used for hashing (PROTOCOL.md §4.1).

    Object keys sorted by Unicode code point at every level; separators ``,`` and ``:`` and no
    other whitespace; non-ASCII characters written as themselves (not ``\\u`` escapes); floats as
    Python's shortest round-trip ``repr``; integers in decimal. NaN, infinities, non-string keys,
    lone surrogates and non-JSON types raise ProtocolError.
    """
    _check_plain_json(obj, "")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(config: dict[str, Any]) -> str:
    """``sha256:`` + hex SHA-256 of the UTF-8 bytes of the canonical JSON of the run configuration."""
    return "sha256:" + hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


LIBRARIES: Final = ("saestore", "zarr", "numcodecs", "xarray", "numpy", "dask", "sparse", "torch",
                    "transformer-lens", "sae-lens", "transformers", "datasets")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a run (absent ones are left out)."""
    import platform

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def default_shard_docs(chunk_docs: int) -> int:
    """The multiple of ``chunk_docs`` nearest ``DEFAULT_SHARD_DOCS`` (at least ``chunk_docs``)."""
    return chunk_docs * max(1, round(DEFAULT_SHARD_DOCS / chunk_docs))


@dataclass(frozen=True, kw_only=True)
class StorageInfo:
    """How the SAE variables are stored."""

    format: StorageFormat
    """``sparse``: saestore.sparse_coo → zstd → crc32c; ``dense``: bytes → zstd → crc32c."""
    value_dtype: ValueDtype
    """dtype of the stored nonzero values (the arrays are always float32)."""
    chunk_docs: int
    """documents per chunk along ``doc``; the progress unit is one (author, doc-chunk)."""
    shard_docs: int | None | Literal["auto"] = "auto"
    """documents per shard along ``doc``, a multiple of ``chunk_docs``: variables with a ``doc`` dim are
    Zarr ``sharding_indexed`` arrays whose inner chunks are the chunks above (§2.3). ``auto``: the
    multiple of ``chunk_docs`` nearest ``DEFAULT_SHARD_DOCS``; None: unsharded (stores of protocol
    1.1 and earlier)."""

    def __post_init__(self) -> None:
        if self.shard_docs == "auto":
            object.__setattr__(self, "shard_docs", default_shard_docs(self.chunk_docs))

    @property
    def chunks_per_shard(self) -> int:
        """Doc-chunks per shard: the unit a writer stores whole and a rerun redoes (1 when unsharded)."""
        return 1 if self.shard_docs is None else int(self.shard_docs) // self.chunk_docs


@dataclass(frozen=True, kw_only=True)
class SAEInfo:
    """The SAE behind one (layer type, layer)."""

    release: str | None
    sae_id: str | None
    path: str | None
    hook_name: str
    width: int
    expected_l0: float | None
    architecture: str


@dataclass(frozen=True, kw_only=True)
class RunAttrs:
    """The root attribute ``saestore`` of a run group (schema/run_attributes.schema.json)."""

    protocol_version: str
    layout: str
    status: Status
    created_at: str
    finalized_at: str | None
    config: dict[str, Any]
    config_hash: str
    model: str
    setting: Literal["baseline", "prompted"]
    prompt_template: str | None
    use_error_term: bool
    storage: StorageInfo
    saes: dict[str, dict[str, SAEInfo]] = field(default_factory=dict)
    """layer type → str(layer) → SAE."""
    library_versions: dict[str, str] = field(default_factory=dict)
    failed_authors: list[str] = field(default_factory=list)
    run_id: str | None = None
    """the run's own id (``uuid4().hex``), set when the store is created (since 1.2, optional: stores
    written before have none); the registry finds a moved or copied run by it."""
    numerics: dict[str, Any] | None = None
    """what decides the computed values besides ``config`` (device kind, torch threads per CPU
    worker), as the run was started; not hashed (PROTOCOL.md §4; since 1.2, optional)."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["run_id"] is None:  # optional: absent, not null
            del data["run_id"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunAttrs:
        validate_json(data, "run_attributes")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}  # newer minor versions may add keys
        storage_fields = {f.name for f in dataclasses.fields(StorageInfo)}
        # a store without shard_docs (protocol <= 1.1) is unsharded
        kw["storage"] = StorageInfo(**{"shard_docs": None,
                                       **{k: v for k, v in kw["storage"].items() if k in storage_fields}})
        sae_fields = {f.name for f in dataclasses.fields(SAEInfo)}
        kw["saes"] = {lt: {layer: SAEInfo(**{k: v for k, v in info.items() if k in sae_fields})
                           for layer, info in by_layer.items()}
                      for lt, by_layer in kw["saes"].items()}
        return cls(**kw)


SCHEMA_DIR: Final = Path(__file__).resolve().parent / "schema"
SCHEMAS: Final = {"run_attributes": "run_attributes.schema.json",
                  "sparse_coo_codec": "sparse_coo.codec.schema.json",
                  "variables": "variables.schema.json"}


@cache
def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / SCHEMAS[name]).read_text(encoding="utf-8"))


def validate_json(data: Any, schema_name: str) -> None:
    """Validate ``data`` against a schema in schema/; raise ProtocolError naming the first problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise ProtocolError(
            f"{schema_name} JSON is invalid at {where}: {err.message} "
            f"(schema/{SCHEMAS[schema_name]}; {len(errors)} problem(s) in all)"
        )


def check_version(version: str) -> None:
    """Apply the versioning rule: another major → ProtocolVersionError; a newer minor → warning."""
    try:
        major, minor = (int(p) for p in str(version).split("."))
    except ValueError:
        raise ProtocolError(f"protocol_version {version!r} is not MAJOR.MINOR") from None
    my_major, my_minor = (int(p) for p in PROTOCOL_VERSION.split("."))
    if major != my_major:
        raise ProtocolVersionError(
            f"this store uses saestore protocol {version}; this saestore {_own_version()} reads "
            f"major version {my_major} only. Install a saestore release that reads protocol {major}.x"
        )
    if minor > my_minor:
        warnings.warn(
            f"store uses protocol {version}, newer than {PROTOCOL_VERSION} of this saestore: unknown variables "
            "and attributes are ignored; upgrade saestore to read them", stacklevel=3)


def _own_version() -> str:
    try:
        return importlib_metadata.version("saestore")
    except importlib_metadata.PackageNotFoundError:
        return "(unknown)"


def read_attrs(raw: dict[str, Any], where: str = "store") -> RunAttrs:
    """Root attributes of a group → RunAttrs, after the layout, version and schema checks."""
    data = raw.get(ATTRS_KEY)
    if not isinstance(data, dict):
        raise ProtocolError(
            f"{where} is not a saestore run: it has no root attribute {ATTRS_KEY!r} (a JSON object). "
            "Open other Zarr stores with xr.open_zarr directly"
        )
    if data.get("layout") != LAYOUT:
        raise ProtocolError(
            f"{where} is not a saestore run: its root attribute {ATTRS_KEY!r} has layout {data.get('layout')!r}, "
            f"and this saestore reads only {LAYOUT!r}. Open it with xr.open_zarr directly"
        )
    check_version(data.get("protocol_version", "?"))
    return RunAttrs.from_json(data)
