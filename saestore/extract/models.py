"""Models and SAEs for extraction: name validation, SAE resolution, loading.

Everything a run needs is resolved and validated *before* anything heavy is loaded or written:
:func:`validate_model_name` checks a model name without loading it, :func:`resolve_saes` turns
``(model, layer types, layers, width, target L0)`` into one :class:`SAESpec` per SAE, checking
each against the sae_lens pretrained registry (read offline), the tiny bundle, or a local
folder. :func:`load_model` and :func:`load_sae` then load them, and
:func:`check_sae_matches_model` checks that each SAE fits the hook it reads.

Models
    ``tiny`` (the embedded demo model, see :mod:`saestore.extract.tiny`); Gemma 2 models with
    Gemma Scope SAEs — ``google/gemma-2-2b``, ``google/gemma-2-9b``, ``google/gemma-2-9b-it``,
    ``google/gemma-2-27b`` (bare names such as ``gemma-2-2b`` work too); any other
    TransformerLens model name; or a local Hugging Face checkpoint folder of an architecture
    TransformerLens converts. Models other than ``tiny`` and Gemma 2 need ``sae_path``.

Hooks
    ``res`` reads ``blocks.L.hook_resid_post``, ``mlp`` ``blocks.L.hook_mlp_out`` and ``att``
    ``blocks.L.attn.hook_z`` (SAE ``reshape_activations="hook_z"``, d_in = n_heads * d_head).

Local SAEs (``sae_path``)
    For each requested layer type ``T`` and layer ``L`` the first of these folders that exists
    is used::

        {sae_path}/{T}/layer_{L}/width_{W}/     (the tiny bundle's saes/ folder has this layout)
        {sae_path}/{T}/layer_{L}/
        {sae_path}/layer_{L}/width_{W}/         (one layer type only: a Gemma Scope repo snapshot)
        {sae_path}                              (one layer type and one layer only)

    The folder holds either ``cfg.json`` + ``sae_weights.safetensors`` (as written by
    ``sae.save_model``) or Gemma Scope's ``params.npz`` (keys ``w_enc``, ``w_dec``, ``b_enc``,
    ``b_dec``, ``threshold``), or subfolders ``average_l0_N`` holding one of those, of which the
    one with ``N`` closest to ``target_l0`` is taken (``target_l0`` is required when there are
    several). A ``cfg.json`` hook name must match the hook of the requested layer type and layer.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saestore.errors import ExtractionConfigError
from saestore.extract.tiny import (
    TINY_MODEL_NAME,
    TINY_WIDTHS,
    build_tiny_bundle,
    tiny_hook_name,
    tiny_registry,
)

__all__ = [
    "GEMMA_SCOPE_MODELS",
    "LAYER_TYPES",
    "SAESpec",
    "WIDTHS",
    "check_sae_matches_model",
    "hook_name",
    "load_model",
    "load_sae",
    "resolve_saes",
    "tokenize",
    "validate_model_name",
]

logger = logging.getLogger(__name__)

LAYER_TYPES: tuple[str, ...] = ("res", "mlp", "att")
WIDTHS: dict[str, int] = {
    "16k": 16384,
    "32k": 32768,
    "65k": 65536,
    "131k": 131072,
    "262k": 262144,
    "524k": 524288,
    "1m": 1048576,
}
GEMMA_SCOPE_MODELS: dict[str, str] = {
    "google/gemma-2-2b": "gemma-scope-2b-pt",
    "google/gemma-2-9b": "gemma-scope-9b-pt",
    "google/gemma-2-9b-it": "gemma-scope-9b-it",
    "google/gemma-2-27b": "gemma-scope-27b-pt",
}
"""Model name -> Gemma Scope release prefix (``{prefix}-{layer_type}[-canonical]``)."""

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
_SAE_WEIGHTS = "sae_weights.safetensors"
_SAE_CFG = "cfg.json"
_NPZ = "params.npz"
_L0_DIR = re.compile(r"average_l0_(\d+)")
_REGISTRY_ID = re.compile(r"layer_(\d+)/width_([0-9a-z]+)/(canonical|average_l0_(\d+))")


@dataclass(frozen=True, kw_only=True)
class SAESpec:
    """One SAE to attach: where it comes from and which hook it reads."""

    layer_type: str
    """``res``, ``mlp`` or ``att``."""
    layer: int
    """Transformer block index."""
    width: str
    """Width label (``16k``, ``1k``, …)."""
    d_sae: int
    """Number of features."""
    release: str | None
    """sae_lens release for hub SAEs, else None."""
    sae_id: str | None
    """sae_lens SAE id within ``release``, else None."""
    local_path: str | None
    """Folder of a local SAE (tiny bundle or ``sae_path``), else None."""
    hook_name: str
    """TransformerLens hook the SAE reads."""
    expected_l0: float | None
    """Average L0 the SAE's publisher reports (None if unknown)."""

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, as recorded in a run's attributes."""
        return asdict(self)


def hook_name(layer_type: str, layer: int) -> str:
    """The hook an SAE of ``layer_type`` at ``layer`` reads (see the module docstring)."""
    return tiny_hook_name(layer_type, layer)


# ----------------------------------------------------------------------------------------------
# model names


def _fmt_layers(layers: Sequence[int]) -> str:
    """``0-25`` for a contiguous run, else ``9, 20, 31``."""
    s = sorted(set(layers))
    if len(s) > 3 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def _fmt_widths(widths) -> str:
    return ", ".join(sorted(widths, key=lambda w: WIDTHS.get(w, TINY_WIDTHS.get(w, 0))))


def _unknown_model(name: str) -> ExtractionConfigError:
    return ExtractionConfigError(
        f"unknown model {name!r}: choose {TINY_MODEL_NAME}, "
        + ", ".join(GEMMA_SCOPE_MODELS)
        + ", a TransformerLens model name, or a local path (a folder with config.json)"
    )


def _short(name: str) -> str:
    """Model name for messages: ``google/gemma-2-2b`` -> ``gemma-2-2b``."""
    return name.split("/")[-1] if name in GEMMA_SCOPE_MODELS else name


def validate_model_name(name: str) -> str:
    """Check a model name without loading anything; return its canonical form.

    ``tiny`` -> ``tiny``; ``gemma-2-2b`` -> ``google/gemma-2-2b``; a local folder -> its
    absolute path; a TransformerLens name or alias -> the official name. Anything else raises
    :class:`ExtractionConfigError`.
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown_model(str(name))
    name = name.strip()
    if name.lower() == TINY_MODEL_NAME:
        return TINY_MODEL_NAME
    for full in GEMMA_SCOPE_MODELS:
        if name.lower() in (full, full.split("/")[-1]):
            return full
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path.resolve())
    looks_like_path = path.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if not looks_like_path:
        official = _official_tl_name(name)
        if official is not None:
            return official
        raise _unknown_model(name)
    if not path.exists():
        raise ExtractionConfigError(f"local model folder {name!r} does not exist")
    if not path.is_dir():
        raise ExtractionConfigError(f"local model path {name!r} is a file, not a checkpoint folder")
    raise ExtractionConfigError(
        f"local model folder {name!r} has no config.json (expected a Hugging Face checkpoint "
        "written by save_pretrained)"
    )


def _official_tl_name(name: str) -> str | None:
    """The official TransformerLens name of ``name`` (or alias), None if it has none."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return make_model_alias_map().get(name.lower())


# ----------------------------------------------------------------------------------------------
# SAE resolution


@dataclass(frozen=True, kw_only=True)
class _HubEntry:
    canonical_id: str | None
    canonical_l0: float | None
    l0_ids: dict[int, str]
    """N -> ``layer_L/width_W/average_l0_N``."""


@functools.cache
def _gemma_scope_index(prefix: str, layer_type: str) -> dict[tuple[int, str], _HubEntry] | None:
    """``(layer, width) -> _HubEntry`` for one Gemma Scope release pair, None if absent."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    plain, canonical = f"{prefix}-{layer_type}", f"{prefix}-{layer_type}-canonical"
    if plain not in directory and canonical not in directory:
        return None
    l0s: dict[tuple[int, str], dict[int, str]] = {}
    canon: dict[tuple[int, str], tuple[str, float | None]] = {}
    if plain in directory:
        for sae_id in directory[plain].saes_map:
            m = _REGISTRY_ID.fullmatch(sae_id)
            if m and m.group(4) is not None:
                l0s.setdefault((int(m.group(1)), m.group(2)), {})[int(m.group(4))] = sae_id
    if canonical in directory:
        for sae_id, folder in directory[canonical].saes_map.items():
            m = _REGISTRY_ID.fullmatch(sae_id)
            if m and m.group(3) == "canonical":
                l0 = _L0_DIR.search(folder)
                canon[(int(m.group(1)), m.group(2))] = (sae_id, float(l0.group(1)) if l0 else None)
    return {
        key: _HubEntry(
            canonical_id=canon[key][0] if key in canon else None,
            canonical_l0=canon[key][1] if key in canon else None,
            l0_ids=l0s.get(key, {}),
        )
        for key in sorted(set(l0s) | set(canon))
    }


def _closest_l0(l0s: Sequence[int], target: float) -> int:
    return min(l0s, key=lambda n: (abs(n - target), n))


def resolve_saes(
    model: str,
    layer_types: Sequence[str],
    layers: Sequence[int],
    width: str,
    target_l0: float | None = None,
    sae_path: str | None = None,
) -> list[SAESpec]:
    """One :class:`SAESpec` per (layer type, layer), validated before anything is loaded.

    Without ``sae_path``: ``tiny`` resolves against the tiny bundle, Gemma 2 models against the
    Gemma Scope releases in the sae_lens registry (``…-canonical`` SAE ``layer_L/width_W/canonical``
    when ``target_l0`` is None, else ``layer_L/width_W/average_l0_N`` with ``N`` closest to
    ``target_l0``). With ``sae_path``: local folders (module docstring). The result is ordered
    by layer type, then layer, as given. Bad requests raise :class:`ExtractionConfigError` with
    a one-line message naming what exists.
    """
    model = validate_model_name(model)
    layer_types = _check_layer_types(layer_types)
    layers = _check_layers(layers)
    if target_l0 is not None and not (math.isfinite(target_l0) and target_l0 > 0):
        raise ExtractionConfigError(f"target_l0 must be a positive number, got {target_l0!r}")
    if not isinstance(width, str) or not width:
        raise ExtractionConfigError(f"width must be a label such as 16k, got {width!r}")
    if sae_path is not None:
        return _resolve_local(Path(sae_path).expanduser(), layer_types, layers, width, target_l0)
    if model == TINY_MODEL_NAME:
        return _resolve_tiny(layer_types, layers, width)
    if model in GEMMA_SCOPE_MODELS:
        return _resolve_gemma_scope(model, layer_types, layers, width, target_l0)
    raise ExtractionConfigError(
        f"no pretrained SAEs are known for model {model!r} (saestore resolves Gemma Scope for "
        + ", ".join(GEMMA_SCOPE_MODELS)
        + "); pass --sae_path with folders {layer_type}/layer_{L}/width_{W}/"
    )


def _check_layer_types(layer_types: Sequence[str]) -> list[str]:
    if isinstance(layer_types, str):
        layer_types = [layer_types]
    out: list[str] = []
    for lt in layer_types:
        if lt not in LAYER_TYPES:
            raise ExtractionConfigError(
                f"unknown layer type {lt!r}: choose from {', '.join(LAYER_TYPES)}"
            )
        if lt not in out:
            out.append(lt)
    if not out:
        raise ExtractionConfigError("no layer type given: choose from " + ", ".join(LAYER_TYPES))
    return out


def _check_layers(layers: Sequence[int]) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    out: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ExtractionConfigError(f"layers must be non-negative integers, got {layer!r}")
        if int(layer) not in out:
            out.append(int(layer))
    if not out:
        raise ExtractionConfigError("no layer given")
    return out


def _resolve_tiny(layer_types: list[str], layers: list[int], width: str) -> list[SAESpec]:
    if width not in TINY_WIDTHS:
        raise ExtractionConfigError(
            f"{TINY_MODEL_NAME} has no {width} SAEs; widths: {_fmt_widths(TINY_WIDTHS)}"
        )
    registry = tiny_registry()
    specs = []
    for lt in layer_types:
        available = sorted(layer for (t, layer, w) in registry if t == lt and w == width)
        for layer in layers:
            entry = registry.get((lt, layer, width))
            if entry is None:
                raise ExtractionConfigError(
                    f"{TINY_MODEL_NAME} has {lt} SAEs only at layers {_fmt_layers(available)}"
                )
            specs.append(
                SAESpec(
                    layer_type=lt, layer=layer, width=width, d_sae=entry["d_sae"], release=None,
                    sae_id=None, local_path=entry["path"], hook_name=entry["hook_name"],
                    expected_l0=entry["expected_l0"],
                )
            )
    return specs


def _resolve_gemma_scope(
    model: str, layer_types: list[str], layers: list[int], width: str, target_l0: float | None
) -> list[SAESpec]:
    prefix = GEMMA_SCOPE_MODELS[model]
    short = _short(model)
    if width not in WIDTHS:
        raise ExtractionConfigError(f"unknown width {width!r}: choose one of {_fmt_widths(WIDTHS)}")
    with_saes = [lt for lt in LAYER_TYPES if _gemma_scope_index(prefix, lt)]
    specs = []
    for lt in layer_types:
        index = _gemma_scope_index(prefix, lt)
        if not index:
            raise ExtractionConfigError(
                f"{short} has no {lt} SAEs; layer types with SAEs: {', '.join(with_saes)}"
            )
        all_layers = sorted({layer for layer, _ in index})
        for layer in layers:
            widths_here = [w for (l_, w) in index if l_ == layer]
            if not widths_here:
                raise ExtractionConfigError(
                    f"{short} has {lt} SAEs only at layers {_fmt_layers(all_layers)}"
                )
            entry = index.get((layer, width))
            if entry is None:
                raise ExtractionConfigError(
                    f"{short} has no {width} {lt} SAE at layer {layer}; widths there: "
                    f"{_fmt_widths(widths_here)}"
                )
            if target_l0 is None:
                if entry.canonical_id is None:
                    raise ExtractionConfigError(
                        f"{short} has no canonical {width} {lt} SAE at layer {layer}; pass "
                        f"--target_l0 (L0s there: {', '.join(map(str, sorted(entry.l0_ids)))})"
                    )
                release, sae_id, l0 = f"{prefix}-{lt}-canonical", entry.canonical_id, entry.canonical_l0
            else:
                if not entry.l0_ids:
                    raise ExtractionConfigError(
                        f"{short} lists only a canonical {width} {lt} SAE at layer {layer}; "
                        "drop --target_l0"
                    )
                n = _closest_l0(list(entry.l0_ids), target_l0)
                release, sae_id, l0 = f"{prefix}-{lt}", entry.l0_ids[n], float(n)
            specs.append(
                SAESpec(
                    layer_type=lt, layer=layer, width=width, d_sae=WIDTHS[width], release=release,
                    sae_id=sae_id, local_path=None, hook_name=hook_name(lt, layer), expected_l0=l0,
                )
            )
    return specs


def _is_sae_dir(path: Path) -> bool:
    return ((path / _SAE_CFG).is_file() and (path / _SAE_WEIGHTS).is_file()) or (path / _NPZ).is_file()


def _resolve_local(
    root: Path, layer_types: list[str], layers: list[int], width: str, target_l0: float | None
) -> list[SAESpec]:
    if not root.is_dir():
        raise ExtractionConfigError(f"sae_path {str(root)!r} is not a folder")
    specs = []
    for lt in layer_types:
        for layer in layers:
            candidates = [root / lt / f"layer_{layer}" / f"width_{width}", root / lt / f"layer_{layer}"]
            if len(layer_types) == 1:
                candidates.append(root / f"layer_{layer}" / f"width_{width}")
                if len(layers) == 1:
                    candidates.append(root)
            folder = next((c for c in candidates if c.is_dir() and _sae_or_l0_dirs(c)), None)
            if folder is None:
                raise ExtractionConfigError(
                    f"no {lt} SAE for layer {layer} under sae_path {str(root)!r}: expected "
                    f"{lt}/layer_{layer}/width_{width}/ holding cfg.json + {_SAE_WEIGHTS} or {_NPZ}"
                )
            folder, l0 = _pick_l0_dir(folder, target_l0, lt, layer)
            specs.append(_local_spec(folder, lt, layer, width, l0))
    return specs


def _sae_or_l0_dirs(folder: Path) -> bool:
    return _is_sae_dir(folder) or any(_l0_subdirs(folder))


def _l0_subdirs(folder: Path) -> dict[int, Path]:
    out = {}
    for sub in folder.iterdir():
        m = _L0_DIR.fullmatch(sub.name)
        if m and sub.is_dir() and _is_sae_dir(sub):
            out[int(m.group(1))] = sub
    return out


def _pick_l0_dir(
    folder: Path, target_l0: float | None, lt: str, layer: int
) -> tuple[Path, float | None]:
    if _is_sae_dir(folder):
        m = _L0_DIR.fullmatch(folder.name)
        return folder, float(m.group(1)) if m else None
    subs = _l0_subdirs(folder)
    if target_l0 is None and len(subs) > 1:
        raise ExtractionConfigError(
            f"{str(folder)!r} holds {lt} SAEs for layer {layer} at several L0s "
            f"({', '.join(map(str, sorted(subs)))}): pass --target_l0"
        )
    n = _closest_l0(list(subs), target_l0 if target_l0 is not None else 0.0)
    return subs[n], float(n)


def _local_spec(folder: Path, lt: str, layer: int, width: str, l0: float | None) -> SAESpec:
    expected_hook = hook_name(lt, layer)
    if (folder / _SAE_CFG).is_file() and (folder / _SAE_WEIGHTS).is_file():
        try:
            cfg = json.loads((folder / _SAE_CFG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExtractionConfigError(f"cannot read {folder / _SAE_CFG}: {e}") from e
        d_sae = cfg.get("d_sae")
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        found_hook = meta.get("hook_name") or cfg.get("hook_name")
        if found_hook is not None and found_hook != expected_hook:
            raise ExtractionConfigError(
                f"SAE at {str(folder)!r} reads hook {found_hook!r} but {lt} layer {layer} needs "
                f"{expected_hook!r}"
            )
    else:
        d_sae = _npz_shape(folder / _NPZ, "w_enc")[1]
    if not isinstance(d_sae, int) or d_sae <= 0:
        raise ExtractionConfigError(f"SAE at {str(folder)!r} has no valid d_sae (got {d_sae!r})")
    known = WIDTHS.get(width, TINY_WIDTHS.get(width))
    if known is not None and known != d_sae:
        raise ExtractionConfigError(
            f"SAE at {str(folder)!r} has {d_sae} features, not the {known} of width {width}"
        )
    return SAESpec(
        layer_type=lt, layer=layer, width=width, d_sae=d_sae, release=None, sae_id=None,
        local_path=str(folder.resolve()), hook_name=expected_hook, expected_l0=l0,
    )


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an ``.npz`` without reading its data."""
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape = fmt.read_array_header_1_0(f)[0]
            elif version == (2, 0):
                shape = fmt.read_array_header_2_0(f)[0]
            else:  # rare header versions: read the array itself
                with np.load(path, allow_pickle=False) as data:
                    shape = data[key].shape
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ExtractionConfigError(f"cannot read {key!r} from {str(path)!r}: {e}") from e
    if len(shape) != 2:
        raise ExtractionConfigError(f"{key!r} in {str(path)!r} has shape {shape}, expected 2-D")
    return tuple(int(s) for s in shape)


# ----------------------------------------------------------------------------------------------
# loading


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ExtractionConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


def _hub_unreachable(what: str, e: BaseException) -> ExtractionConfigError:
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return ExtractionConfigError(
        f"{what} is not in the local Hugging Face cache (HF_HOME={hf_home}) and could not be "
        f"downloaded ({type(e).__name__}: {detail}): run once with network access (and, for "
        "gated models such as Gemma, an accepted licence and HF_TOKEN) to download it, point "
        "HF_HOME at a cache that has it, or pass a local path; set HF_HUB_OFFLINE=1 to fail fast"
    )


def load_sae(spec: SAESpec, device: str, dtype: str = "float32"):
    """Load the SAE that ``spec`` names (sae_lens ``SAE``) onto ``device`` in ``dtype``."""
    from sae_lens import SAE

    _check_dtype(dtype)
    if spec.local_path is not None:
        folder = Path(spec.local_path)
        if (folder / _SAE_CFG).is_file() and (folder / _SAE_WEIGHTS).is_file():
            sae = SAE.load_from_disk(folder, device=device, dtype=dtype)
        elif (folder / _NPZ).is_file():
            sae = SAE.load_from_disk(
                folder, device=device, dtype=dtype, converter=_gemma_scope_npz_loader(spec)
            )
        else:
            raise ExtractionConfigError(f"no SAE in {spec.local_path!r} (it may have been moved)")
    else:
        try:
            loaded = SAE.from_pretrained(spec.release, spec.sae_id, device=device, dtype=dtype)
        except OSError as e:
            raise _hub_unreachable(f"SAE {spec.release}/{spec.sae_id}", e) from e
        sae = loaded[0] if isinstance(loaded, tuple) else loaded
    found_hook = getattr(sae.cfg.metadata, "hook_name", None)
    if found_hook is not None and found_hook != spec.hook_name:
        raise ExtractionConfigError(
            f"SAE {_describe(spec)} reads hook {found_hook!r}, expected {spec.hook_name!r}"
        )
    if sae.cfg.d_sae != spec.d_sae:
        raise ExtractionConfigError(
            f"SAE {_describe(spec)} has {sae.cfg.d_sae} features, expected {spec.d_sae}"
        )
    sae.eval()
    return sae


def _describe(spec: SAESpec) -> str:
    if spec.local_path is not None:
        return f"{spec.layer_type} layer {spec.layer} ({spec.local_path})"
    return f"{spec.layer_type} layer {spec.layer} ({spec.release}/{spec.sae_id})"


def _gemma_scope_npz_loader(spec: SAESpec):
    """A sae_lens disk converter for Gemma Scope ``params.npz`` (numpy, no pickle)."""

    def load(path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None):
        import torch

        with np.load(Path(path) / _NPZ, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        missing = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} - set(arrays)
        if missing:
            raise ExtractionConfigError(f"{Path(path) / _NPZ} lacks {', '.join(sorted(missing))}")
        state = {
            ("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(
                np.asarray(v, np.float32)
            ).to(device)
            for k, v in arrays.items()
            if k in {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
        }
        d_in, d_sae = state["W_enc"].shape
        cfg = {
            "architecture": "jumprelu",
            "d_in": int(d_in),
            "d_sae": int(d_sae),
            "dtype": "float32",
            "device": device,
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "hook_z" if spec.layer_type == "att" else "none",
            "metadata": {"hook_name": spec.hook_name, "prepend_bos": True},
        }
        cfg.update(cfg_overrides or {})
        return cfg, state

    return load


def _expected_d_in(model, layer_type: str) -> int:
    if layer_type == "att":
        return int(model.cfg.n_heads * model.cfg.d_head)
    return int(model.cfg.d_model)


def check_sae_matches_model(sae, model, spec: SAESpec) -> None:
    """Raise :class:`ExtractionConfigError` unless ``sae`` fits the hook ``spec`` names in ``model``."""
    n_layers = int(model.cfg.n_layers)
    if spec.layer >= n_layers:
        raise ExtractionConfigError(
            f"{spec.layer_type} layer {spec.layer} does not exist: the model has layers "
            f"0-{n_layers - 1}"
        )
    if spec.hook_name not in model.hook_dict:
        raise ExtractionConfigError(f"the model has no hook {spec.hook_name!r}")
    expected = _expected_d_in(model, spec.layer_type)
    if int(sae.cfg.d_in) != expected:
        raise ExtractionConfigError(
            f"SAE {_describe(spec)} has d_in {sae.cfg.d_in} but the model's {spec.hook_name} "
            f"has width {expected}"
        )
    wants_z = spec.layer_type == "att"
    if (sae.cfg.reshape_activations == "hook_z") != wants_z:
        raise ExtractionConfigError(
            f"SAE {_describe(spec)} has reshape_activations={sae.cfg.reshape_activations!r}; "
            f"{spec.hook_name} needs {'hook_z' if wants_z else 'none'}"
        )


def load_model(name: str, device: str, dtype: str = "float32"):
    """Load ``name`` as a ``HookedSAETransformer`` whose tokenizer pads right and adds BOS.

    Hub models load with ``fold_ln=True, center_writing_weights=False, center_unembed=False``
    (the residual stream stays as the SAEs were trained on). Hub failures offline become an
    :class:`ExtractionConfigError` that says how to get the weights.
    """
    _check_dtype(dtype)
    name = validate_model_name(name)
    if name == TINY_MODEL_NAME:
        model = _load_tiny(device, dtype)
    elif Path(name).is_dir():
        model = _load_local_hf(Path(name), device, dtype)
    else:
        from sae_lens import HookedSAETransformer

        try:
            model = HookedSAETransformer.from_pretrained(
                name, fold_ln=True, center_writing_weights=False, center_unembed=False,
                device=device, dtype=dtype, default_padding_side="right",
            )
        except OSError as e:
            raise _hub_unreachable(f"model {name!r}", e) from e
    model.eval()
    if model.tokenizer is None:
        raise ExtractionConfigError(f"model {name!r} has no tokenizer")
    model.tokenizer.padding_side = "right"
    return model


def _load_tiny(device: str, dtype: str):
    from sae_lens import HookedSAETransformer
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from saestore.extract.tiny import TINY_MODEL_CONFIG, make_tiny_config

    bundle = build_tiny_bundle()
    tokenizer = AutoTokenizer.from_pretrained(bundle / "tokenizer", padding_side="right")
    cfg_json = json.loads((bundle / "model" / "config.json").read_text())
    cfg = make_tiny_config(int(cfg_json["d_vocab"]), dtype)
    if {k: cfg_json[k] for k in TINY_MODEL_CONFIG} != TINY_MODEL_CONFIG:
        raise ExtractionConfigError(
            f"tiny bundle at {bundle} was built by another saestore version: delete it to rebuild"
        )
    cfg.init_weights = False
    model = HookedSAETransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    state = load_file(bundle / "model" / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    if unexpected or any(k in params for k in missing):
        raise ExtractionConfigError(
            f"tiny bundle weights at {bundle} do not match the model (missing {missing}, "
            f"unexpected {unexpected}): delete the bundle to rebuild"
        )
    return model.to(device)


def _load_local_hf(path: Path, device: str, dtype: str):
    """Build a ``HookedSAETransformer`` from a local Hugging Face checkpoint folder.

    TransformerLens's ``from_pretrained`` only takes official names; its config and weight
    converters accept a folder, so this mirrors ``from_pretrained`` with them. They also pick
    architectures by substrings of the name ("llama", "gemma", "bert", …), so the folder is
    handed over through a neutrally named symlink and the weights are loaded here.
    """
    import torch
    from sae_lens import HookedSAETransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(prefix="saestore-ckpt-") as tmp:
        link = Path(tmp) / "checkpoint"
        link.symlink_to(path.resolve(), target_is_directory=True)
        try:
            cfg = loading.get_pretrained_model_config(
                str(link), fold_ln=True, device=device, dtype=torch_dtype
            )
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            state = loading.get_pretrained_state_dict(str(link), cfg, hf_model, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
        except (OSError, ValueError, KeyError, NotImplementedError, AttributeError) as e:
            raise ExtractionConfigError(
                f"cannot load the local checkpoint {str(path)!r} with TransformerLens: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
    del hf_model
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=False, center_unembed=False,
        fold_value_biases=True, refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    return model


def tokenize(model, texts: Sequence[str], max_seq_len: int):
    """Right-padded token ids and attention mask, each row starting with exactly one BOS.

    Returns ``(input_ids_BP, attention_mask_BP)`` as int64 / bool tensors of width at most
    ``max_seq_len`` (BOS included); longer texts are truncated.
    """
    import torch

    tok = model.tokenizer
    if max_seq_len < 2:
        raise ExtractionConfigError(
            f"max_seq_len must be at least 2 (BOS + a token), got {max_seq_len}"
        )
    bos = tok.bos_token_id
    probe = tok("a")["input_ids"]
    adds_bos = bool(probe) and probe[0] == bos
    enc = tok(
        list(texts), add_special_tokens=adds_bos, truncation=True,
        max_length=max_seq_len if adds_bos else max_seq_len - 1,
    )["input_ids"]
    rows = [ids if adds_bos else [bos, *ids] for ids in enc]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    ids_BP = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_BP = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids_BP[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask_BP[i, : len(r)] = True
    return ids_BP, mask_BP
