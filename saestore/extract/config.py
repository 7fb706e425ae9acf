"""Extraction configuration: one frozen dataclass, its command line, and the run path."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from saestore import location, protocol
from saestore.errors import ExtractionConfigError
from saestore.extract.data import resolve_dataset_name

DEFAULT_PROMPT = "The text in style of {style}: \n"


class _RunOption:
    """Marks a field as a run option: it changes how a run is made or where it goes, never what it
    stores, so it stays out of the config hash (resuming with another value is allowed). Every other
    field is content and is hashed: a new field is hashed unless its type says ``RunOption``."""

    def __repr__(self) -> str:
        return "RUN_OPTION"


RUN_OPTION: Final = _RunOption()
ONLINE_DEFAULTS_MODEL: Final = "google/gemma-2-9b-it"
ONLINE_DEFAULTS_DATASET: Final = "AuthorMix"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """Everything ``python -m saestore.extract`` needs. Field docstrings are the ``--help`` texts."""

    layers: tuple[int, ...]
    """model layers to extract (e.g. ``--layers 9 20 31`` or ``--layers 9,20,31``)."""
    model: str = ONLINE_DEFAULTS_MODEL
    """model: tiny (built-in, offline), google/gemma-2-2b, google/gemma-2-9b, google/gemma-2-9b-it,
    another TransformerLens model name, or a local path."""
    layer_types: tuple[str, ...] | None = None
    """SAE sites to extract, a subset of res mlp att (default: every type the model has SAEs for)."""
    sae_features_width: str = "16k"
    """SAE width: 16k, 32k, 65k, 131k, 262k, 524k, 1m (tiny: 1k, 16k)."""
    target_l0: float | None = None
    """pick the SAE whose average L0 is closest to this (default: the canonical SAE)."""
    sae_path: str | None = None
    """folder of local SAEs (see README: {layer_type}/layer_{L}/ with cfg.json + sae_weights.safetensors)."""
    dataset_name: str = ONLINE_DEFAULTS_DATASET
    """demo (built-in corpus), AuthorMix, news (matched case-insensitively), or, with --dataset_path, a name of
    your own for that file (the run's dataset folder: letters, digits, '.', '_', '+', '-')."""
    dataset_path: str | None = None
    """local parquet/json/jsonl/csv file (or news folder) instead of the hub."""
    category_name: str | None = None
    """news category (the run path gets a category level)."""
    author_column: str = "style"
    """column holding the author."""
    text_column: str = "text"
    """column holding the text."""
    n_docs: int | None = None
    """cap on the total number of documents."""
    n_docs_per_author: int | None = None
    """cap on documents per author (first N in source order)."""
    min_length_doc: int = 0
    """drop documents with fewer words than this."""
    min_docs_per_author: int = 1
    """drop authors with fewer documents than this (after the other filters)."""
    exclude_authors: tuple[str, ...] = ()
    """authors to leave out."""
    batch_size: Annotated[int, RUN_OPTION] = 8
    """documents per forward pass."""
    setting: Literal["baseline", "prompted"] = "baseline"
    """baseline: BOS + text; prompted: BOS + the style prompt + text."""
    prompt_template: str = DEFAULT_PROMPT
    """prompt of the prompted setting; {style} becomes the author name."""
    storage_format: protocol.StorageFormat = "sparse"
    """sparse: saestore.sparse_coo codec; dense: plain zarr bytes + zstd."""
    value_dtype: protocol.ValueDtype = "float32"
    """dtype of stored activation values (bfloat16 halves the size, rel. error <= 2^-8)."""
    dtype: protocol.ValueDtype = "float32"
    """dtype of the model and SAEs (a 9b model needs 36 GB in float32)."""
    max_seq_len: int | None = None
    """tokens per document input including BOS; n_tok = max_seq_len - 1 tokens are stored, longer
    documents are truncated (recorded in n_truncated). Default: 512, or half the context of models with
    a shorter one (tiny: 128)."""
    chunk_docs: int = 4
    """documents per stored chunk (the unit of reading and of progress markers)."""
    shard_docs: int | None = None
    """documents per shard: every variable is one file per shard of an author (and layer), written
    whole, and a killed run redoes at most its unfinished shards. A multiple of chunk_docs; default:
    the multiple nearest 128 (about 40 MB per shard and SAE at 1023 tokens and L0 70)."""
    use_error_term: bool = False
    """splice SAEs with the error term (clean-model activations and logits, ~2x SAE cost). The seed
    splices every SAE without it (false)."""
    loss_recovered: bool = False
    """also compute, per document, CE of the clean model, with each SAE spliced alone and with its site
    zero-ablated (1 + 2 x SAEs extra forward passes), for the loss-recovered fraction."""
    devices: Annotated[str | None, RUN_OPTION] = None
    """cuda:0,cuda:1 | cpu | cpu:2 (two CPU workers); default: every visible GPU, else one CPU worker."""
    output_dir: Annotated[str, RUN_OPTION] = "runs"
    """root folder of runs: {output_dir}/{dataset}/{category}/{model}/{run_name}.zarr."""
    run_name: Annotated[str | None, RUN_OPTION] = None
    """name of the run (default: derived from setting, layer types, layers and width)."""
    resume: Annotated[bool, RUN_OPTION] = False
    """require an existing run with the same configuration and finish it."""
    overwrite: Annotated[bool, RUN_OPTION] = False
    """replace an existing run at the path (it is deleted only once the new run is created)."""
    registry: Annotated[str | None, RUN_OPTION] = None
    """SQLite run registry (default: {output_dir}/saestore_runs.sqlite)."""
    quiet: Annotated[bool, RUN_OPTION] = False
    """no progress bars."""

    def __post_init__(self) -> None:
        # one spelling per dataset (``authormix`` is ``AuthorMix``); a name of your own is a path component
        object.__setattr__(self, "dataset_name", resolve_dataset_name(self.dataset_name, self.dataset_path))
        _component(self.dataset_name, "--dataset_name")
        if not self.layers:
            raise ExtractionConfigError("--layers needs at least one layer")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ExtractionConfigError(f"--layers must be distinct non-negative integers, got {list(self.layers)}")
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in protocol.LAYER_TYPES]
            if bad or not self.layer_types:
                raise ExtractionConfigError(f"--layer_types must be a subset of {' '.join(protocol.LAYER_TYPES)}, "
                                            f"got {list(self.layer_types)}")
        for name in ("batch_size", "chunk_docs", "min_docs_per_author"):
            if getattr(self, name) < 1:
                raise ExtractionConfigError(f"--{name} must be >= 1")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ExtractionConfigError("--max_seq_len must be >= 2 (BOS plus one token)")
        if self.resume and self.overwrite:
            raise ExtractionConfigError("--resume and --overwrite exclude each other")
        if self.setting == "prompted" and "{style}" not in self.prompt_template:
            raise ExtractionConfigError("--prompt_template must contain {style}")
        if self.setting == "prompted":  # formatted as the worker will (str.format with style= only)
            try:
                self.prompt_template.format(style="author")
            except (IndexError, KeyError, ValueError) as e:
                raise ExtractionConfigError(
                    f"--prompt_template {self.prompt_template!r} cannot be filled in with the author alone "
                    f"({type(e).__name__}: {e}): {{style}} is the only field; write other braces doubled, "
                    "{{ and }}") from None
        if self.shard_docs is not None and (self.shard_docs < self.chunk_docs or self.shard_docs % self.chunk_docs):
            lo = max(self.chunk_docs, self.shard_docs // self.chunk_docs * self.chunk_docs)
            raise ExtractionConfigError(f"--shard_docs {self.shard_docs} is not a multiple of --chunk_docs "
                                        f"{self.chunk_docs}: use {lo} or {lo + self.chunk_docs}")
        if self.storage_format == "dense" and self.value_dtype == "bfloat16":
            raise ExtractionConfigError("--value_dtype bfloat16 needs --storage_format sparse")

    @property
    def n_tok(self) -> int:
        if self.max_seq_len is None:
            raise ExtractionConfigError("max_seq_len is not resolved yet: call resolve_defaults(cfg)")
        return self.max_seq_len - 1

    @classmethod
    def run_options(cls) -> tuple[str, ...]:
        """The fields typed ``Annotated[..., RUN_OPTION]``: not part of the config hash."""
        return tuple(name for name, hint in _hints(cls).items() if RUN_OPTION in getattr(hint, "__metadata__", ()))

    def semantic(self) -> dict[str, Any]:
        """The configuration that defines the stored content (hashed into config_hash), normalized
        (:func:`normalize_config`): two commands that store the same thing hash the same."""
        options = self.run_options()
        return normalize_config({k: v for k, v in self.to_json().items() if k not in options})

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    def default_run_name(self, *, as_typed: bool = False) -> str:
        """``{setting}_{types}_L{layers}_w{width}``, layers sorted (one name per set; ``as_typed``: in the
        order given, the name of runs made before names were sorted)."""
        types = "-".join(self.layer_types or ("all",))
        layers = "-".join(str(x) for x in (self.layers if as_typed else sorted(self.layers)))
        return f"{self.setting}_{types}_L{layers}_w{self.sae_features_width}"

    def run_path(self) -> str:
        """``{output_dir}/{dataset_name}/{category_name}/{model}/{run_name}.zarr`` (no category for AuthorMix)."""
        parts = [_component(self.dataset_name, "--dataset_name")]
        if self.category_name and self.dataset_name.lower() != "authormix":
            parts.append(_component(self.category_name, "--category_name"))
        model = self.model
        if Path(model).expanduser().exists():  # a local model folder: use its name only
            model = Path(model).expanduser().resolve().name
        parts += [_component(p, "--model") for p in model.strip("/").split("/")]
        path = location.join(self.output_dir, *parts,
                             _component(self.run_name or self.default_run_name(), "--run_name") + ".zarr")
        typed = location.join(self.output_dir, *parts, self.default_run_name(as_typed=True) + ".zarr")
        if not self.run_name and typed != path and not location.is_url(path) and Path(typed).exists() \
                and not Path(path).exists():
            return typed  # a run made before default names sorted the layers: resume it where it is
        return path

    def registry_path(self) -> Path:
        from saestore.registry import default_registry

        return Path(self.registry) if self.registry else default_registry(self.output_dir)


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (plain JSON, as stored) in the one form that is hashed: sets in one order (``layers``
    sorted, as the store sorts them; ``layer_types`` in protocol order; ``exclude_authors`` sorted) and
    options the chosen setting does not use left out (``prompt_template`` outside ``prompted``).
    Idempotent; applies to a stored config as well (runs made before normalization, see
    :func:`stored_identity`).

    >>> normalize_config({"layers": [3, 1], "setting": "baseline", "prompt_template": "x"})
    {'layers': [1, 3], 'setting': 'baseline'}
    """
    out = dict(config)
    if isinstance(out.get("layers"), list):
        out["layers"] = sorted(set(out["layers"]))
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = [t for t in protocol.LAYER_TYPES if t in out["layer_types"]]
    if isinstance(out.get("exclude_authors"), list):
        out["exclude_authors"] = sorted(set(out["exclude_authors"]))
    if out.get("setting", "baseline") != "prompted":
        out.pop("prompt_template", None)
    return out


def stored_identity(path: str | Path, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The ``(config, config_hash)`` to record for a run of ``config`` at ``path``: those of the run
    already there when it is the same run made before normalization (its stored config normalizes to
    ``config`` but was hashed as typed), so it stays resumable; else ``config`` and its hash. Reads
    only; anything unreadable is left to the writer, which refuses it with the reason."""
    import zarr

    new = (config, protocol.config_hash(config))
    try:
        stored = zarr.open_group(str(path), mode="r", use_consolidated=False).attrs.get(protocol.ATTRS_KEY)
    except (OSError, ValueError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return new
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        return new
    old_config, old_hash = stored["config"], stored.get("config_hash")
    if old_hash != new[1] and normalize_config(old_config) == config and old_hash == protocol.config_hash(old_config):
        return old_config, old_hash
    return new


#: context lengths known without loading anything (prefix of the model name → tokens)
KNOWN_CONTEXT = {"tiny": 256, "google/gemma-2-": 8192, "gemma-2-": 8192}


def model_context(model: str) -> int | None:
    """The model's context length when known offline, else None (checked later, per batch)."""
    for prefix, n_ctx in KNOWN_CONTEXT.items():
        if model == prefix or model.startswith(prefix):
            return n_ctx
    return None


def resolve_defaults(cfg: ExtractConfig) -> ExtractConfig:
    """Fill model-dependent defaults (``max_seq_len``) and check them against the model's context."""
    ctx = model_context(cfg.model)
    if cfg.max_seq_len is None:
        return dataclasses.replace(cfg, max_seq_len=min(512, ctx // 2) if ctx else 512)
    if ctx and cfg.max_seq_len > ctx:
        raise ExtractionConfigError(
            f"--max_seq_len {cfg.max_seq_len} exceeds the context of {cfg.model} ({ctx} tokens); "
            f"pass --max_seq_len {ctx // 2} (leave room for the prompt in the prompted setting)")
    return cfg


def _component(value: str, flag: str) -> str:
    if not _SAFE.match(value) or value in (".", ".."):
        raise ExtractionConfigError(
            f"{flag} {value!r} cannot be part of a path: use letters, digits, '.', '_', '+' and '-' only"
        )
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _doc(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the text after each field), for --help."""
    from simple_parsing.docstring import get_attribute_docstring

    out = {}
    for f in dataclasses.fields(cls):
        text = get_attribute_docstring(cls, f.name).docstring_below
        if text:
            out[f.name] = " ".join(text.split())
    return out


def _arg_type(hint: Any) -> type:
    """The argparse ``type`` of a field: int or float where the (optional) field type is one, else str."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Annotated, types.UnionType) else ()
    if typing.get_origin(hint) is typing.Annotated:
        return _arg_type(args[0])
    for t in (*args, hint):
        if t in (int, float):
            return t
    return str


def _int_list(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(x) for v in values for x in v.replace(",", " ").split())
    except ValueError:
        raise ExtractionConfigError(f"--layers takes integers, got {' '.join(values)}") from None


#: what a bare command uses that needs the Hugging Face hub (the seed script's defaults), and the
#: built-in offline equivalent that errors about them name
ONLINE_DEFAULTS: Final = {"model": ONLINE_DEFAULTS_MODEL, "dataset_name": ONLINE_DEFAULTS_DATASET}
OFFLINE_DEFAULTS: Final = "--model tiny --dataset_name demo"


def _help(text: str, default: Any) -> str:
    """``text`` with its default said once: appended unless the text already says it (``default:``) or
    there is none to say (None, a flag, an empty list); strings with edge whitespace shown with repr.
    ``%`` is escaped for argparse."""
    if not (default is None or isinstance(default, bool) or default in ([], ())) and "default" not in text.lower():
        shown = repr(default) if isinstance(default, str) and default != default.strip() else str(default)
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def make_parser() -> argparse.ArgumentParser:
    helps = _doc(ExtractConfig)
    p = argparse.ArgumentParser(
        prog="python -m saestore.extract",
        description="Extract SAE feature activations of an author-labelled corpus into a saestore run "
                    "(a Zarr v3 store that opens with xr.open_zarr). The default model and dataset come from "
                    f"the Hugging Face hub; the built-in offline ones: {OFFLINE_DEFAULTS} (e.g. "
                    f"{OFFLINE_DEFAULTS} --layers 1 3 --sae_features_width 1k).",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(ExtractConfig)}
    p.add_argument("--layers", nargs="+", required=True, help=_help(helps["layers"], None))
    p.add_argument("--model", nargs="+", default=[defaults["model"]],
                   help=_help(helps["model"] + " Several models (or a .txt file listing one per line) make one run "
                              "each, on the same documents; one model's failure is reported and the others go on.",
                              defaults["model"]))
    p.add_argument("--layer_types", nargs="+", choices=list(protocol.LAYER_TYPES),
                   help=_help(helps["layer_types"], None))
    p.add_argument("--exclude_authors", nargs="*", default=[], help=_help(helps["exclude_authors"], None))
    hints = _hints(ExtractConfig)
    for f in dataclasses.fields(ExtractConfig):
        if f.name in ("layers", "layer_types", "exclude_authors", "model"):
            continue
        default = defaults[f.name]
        if isinstance(default, bool):
            p.add_argument(f"--{f.name}", action="store_true", help=_help(helps.get(f.name, ""), None))
            continue
        literal = list(typing.get_args(hints[f.name])) if typing.get_origin(hints[f.name]) is Literal else None
        p.add_argument(f"--{f.name}", type=_arg_type(hints[f.name]), default=default, choices=literal,
                       help=_help(helps.get(f.name, ""), default))
    return p


def offline_hint(configs: list[ExtractConfig], message: str) -> str:
    """A sentence to append to ``message`` (an error) when it is about a default that needs the hub
    (the default model or dataset, named in it): the built-in offline defaults; else ``""``."""
    hub = [f"--{k} {v}" for cfg in configs[:1] for k, v in ONLINE_DEFAULTS.items()
           if getattr(cfg, k) == v and v.rsplit("/", 1)[-1] in message
           and not (k == "dataset_name" and cfg.dataset_path)]
    if not hub:
        return ""
    return f" ({' and '.join(hub)} {'are' if len(hub) > 1 else 'is'} the default, from the Hugging Face hub; " \
           f"the built-in offline model and corpus: {OFFLINE_DEFAULTS})"


def _models(values: list[str]) -> list[str]:
    """Model names from ``--model``: names, local folders, or ``.txt`` files listing one per line."""
    out: list[str] = []
    for v in values:
        path = Path(v).expanduser()
        if path.is_file() and path.suffix in (".txt", ".list"):
            lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            out += [ln for ln in lines if ln]
        else:
            out.append(v)
    if not out:
        raise ExtractionConfigError("--model names no model")
    if len(set(out)) != len(out):
        raise ExtractionConfigError(f"--model lists a model twice: {out}")
    return out


def parse_all(argv: list[str] | None = None) -> list[ExtractConfig]:
    """One configuration per model named by ``--model``."""
    kw = vars(make_parser().parse_args(argv))
    kw["layers"] = _int_list(kw["layers"])
    kw["layer_types"] = tuple(kw["layer_types"]) if kw["layer_types"] else None
    kw["exclude_authors"] = tuple(kw["exclude_authors"] or ())
    models = _models(kw.pop("model"))
    return [ExtractConfig(model=m, **kw) for m in models]


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    """The configuration of a one-model command line."""
    configs = parse_all(argv)
    if len(configs) != 1:
        raise ExtractionConfigError(f"expected one model, got {len(configs)}")
    return configs[0]


__all__ = ["ExtractConfig", "DEFAULT_PROMPT", "make_parser", "normalize_config", "offline_hint", "stored_identity", "parse_args", "parse_all", "resolve_defaults", "model_context"]
