"""The run-store format's constants, variable table and root-attribute model (PROTOCOL.md).

Everything here is normative through PROTOCOL.md; tests parse PROTOCOL.md and compare its tables
and examples with these definitions and with the JSON Schemas in ``schema/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Final, Literal

from saestore.errors import ProtocolError, ProtocolVersionError

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = "1.1"
LAYOUT: Final = "saestore.run"
ATTRS_KEY: Final = "saestore"  # the root attribute holding RunAttrs
PROGRESS_PATH: Final = "_saestore/progress"
PROGRESS_FIELDS: Final = ("done", "n_valid_tokens", "n_nonzero", "written_at_ns")

LAYER_TYPES: Final = ("res", "mlp", "att")
SAE_DIMS: Final = ("author", "layer", "doc", "tok", "feature")
TOKEN_DIMS: Final = ("author", "doc", "tok")
DOC_DIMS: Final = ("author", "doc")
SAE_TOKEN_DIMS: Final = ("author", "layer", "doc", "tok")
SAE_DOC_DIMS: Final = ("author", "layer", "doc")
#: per-token reconstruction metrics stored for every SAE (PROTOCOL.md §2.6), as ``{layer_type}_{field}``
QUALITY_FIELDS: Final = {
    "sq_error": "squared L2 error ||x - x_hat||^2 of the SAE input x and its reconstruction x_hat",
    "sq_norm": "squared L2 norm ||x||^2 of the SAE input",
    "sq_centered": "||x - mean_doc(x)||^2: squared distance of the SAE input from its document mean",
    "cos": "cosine similarity of x and x_hat",
}
COORDS: Final = ("author", "layer", "doc", "tok", "feature")
STATUSES: Final = ("running", "complete", "failed")
STORAGE_FORMATS: Final = ("sparse", "dense")
VALUE_DTYPES: Final = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class VariableSpec:
    """One array of the run group."""

    name: str
    dims: tuple[str, ...]
    dtype: str  # zarr v3 data type name
    fill_value: Any
    meaning: str


#: Per-token and per-document variables (the SAE variables are built by :func:`sae_variable`).
VARIABLES: Final = (
    VariableSpec(name="valid_mask", dims=TOKEN_DIMS, dtype="bool", fill_value=False,
                 meaning="True where (author, doc, tok) holds a real document token"),
    VariableSpec(name="token_id", dims=TOKEN_DIMS, dtype="int32", fill_value=-1,
                 meaning="tokenizer id of the token; -1 at padding"),
    VariableSpec(name="token", dims=TOKEN_DIMS, dtype="string", fill_value="",
                 meaning="decoded text of the single token; empty at padding"),
    VariableSpec(name="ce_loss", dims=TOKEN_DIMS, dtype="float32", fill_value="NaN",
                 meaning="-log p(token | all earlier tokens incl. BOS and prompt), natural log; NaN at padding"),
    VariableSpec(name="entropy", dims=TOKEN_DIMS, dtype="float32", fill_value="NaN",
                 meaning="entropy (nats) of the next-token distribution computed at this token; NaN at padding"),
    VariableSpec(name="text", dims=DOC_DIMS, dtype="string", fill_value="",
                 meaning="document text without prompt; empty for missing documents"),
    VariableSpec(name="doc_id", dims=DOC_DIMS, dtype="int64", fill_value=-1,
                 meaning="row index of the document in its source dataset; -1 for missing documents"),
    VariableSpec(name="doc_length", dims=DOC_DIMS, dtype="int32", fill_value=0,
                 meaning="number of valid tokens of the document (after truncation)"),
    VariableSpec(name="n_docs", dims=("author",), dtype="int32", fill_value=0,
                 meaning="number of documents of the author (docs >= n_docs are missing: all padding)"),
    VariableSpec(name="n_truncated", dims=DOC_DIMS, dtype="int32", fill_value=0,
                 meaning="document tokens dropped because the document exceeded max_seq_len"),
)


def sae_variable(layer_type: str) -> VariableSpec:
    """The SAE activation variable of one layer type (``res``, ``mlp`` or ``att``)."""
    return VariableSpec(name=layer_type, dims=SAE_DIMS, dtype="float32", fill_value=0.0,
                        meaning=f"{layer_type} SAE feature activations (hook_sae_acts_post)")


def quality_variables(layer_types: tuple[str, ...], loss_recovered: bool) -> tuple[VariableSpec, ...]:
    """Reconstruction-quality variables (always) and loss-recovered variables (``--loss_recovered``)."""
    out = [VariableSpec(name=f"{lt}_{field}", dims=SAE_TOKEN_DIMS, dtype="float32", fill_value="NaN",
                        meaning=f"{lt} SAE: {meaning}; NaN at padding")
           for lt in layer_types for field, meaning in QUALITY_FIELDS.items()]
    if loss_recovered:
        out.append(VariableSpec(name="ce_clean", dims=DOC_DIMS, dtype="float32", fill_value="NaN",
                                meaning="mean CE (nats) over the document's stored tokens, clean model, no SAE"))
        for lt in layer_types:
            out += [VariableSpec(name=f"{lt}_ce_spliced", dims=SAE_DOC_DIMS, dtype="float32", fill_value="NaN",
                                 meaning=f"mean CE with this {lt} SAE alone spliced in (no error term)"),
                    VariableSpec(name=f"{lt}_ce_zero", dims=SAE_DOC_DIMS, dtype="float32", fill_value="NaN",
                                 meaning=f"mean CE with this {lt} site zero-ablated")]
    return tuple(out)


def canonical_json(obj: Any) -> str:
    """The canonical JSON text used for hashing (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(config: dict[str, Any]) -> str:
    """``sha256:`` + hex digest of the canonical JSON of the run configuration."""
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


@dataclass(frozen=True, kw_only=True)
class StorageInfo:
    """How the SAE variables are stored."""

    format: Literal["sparse", "dense"]
    """``sparse``: saestore.sparse_coo → zstd → crc32c; ``dense``: bytes → zstd → crc32c."""
    value_dtype: Literal["float32", "float16", "bfloat16"]
    """dtype of the stored nonzero values (the arrays are always float32)."""
    chunk_docs: int
    """documents per chunk along ``doc``; the progress unit is one (author, doc-chunk)."""


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
    status: Literal["running", "complete", "failed"]
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunAttrs:
        validate_json(data, "run_attributes")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}  # newer minor versions may add keys
        storage_fields = {f.name for f in dataclasses.fields(StorageInfo)}
        kw["storage"] = StorageInfo(**{k: v for k, v in kw["storage"].items() if k in storage_fields})
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
            f"store uses protocol {version}, newer than {PROTOCOL_VERSION}: unknown variables and "
            "attributes are ignored", stacklevel=3)


def _own_version() -> str:
    try:
        return importlib_metadata.version("saestore")
    except importlib_metadata.PackageNotFoundError:
        return "(unknown)"


def read_attrs(raw: dict[str, Any], where: str = "store") -> RunAttrs:
    """Root attributes of a group → RunAttrs, after the layout, version and schema checks."""
    data = raw.get(ATTRS_KEY)
    if not isinstance(data, dict) or data.get("layout") != LAYOUT:
        raise ProtocolError(
            f"{where} is not a saestore run: its root attribute {ATTRS_KEY!r} with layout {LAYOUT!r} is "
            "missing. Open other Zarr stores with xr.open_zarr directly"
        )
    check_version(data.get("protocol_version", "?"))
    return RunAttrs.from_json(data)
