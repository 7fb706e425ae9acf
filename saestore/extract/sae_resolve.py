"""SAE resolution: ``(model, layer types, layers, width, target L0)`` → one :class:`SAESpec` per SAE,
checked against the sae_lens pretrained registry (read offline), the tiny bundle or a local folder
(the folder layouts are in :mod:`saestore.extract.models`)."""

from __future__ import annotations

import functools
import json
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saestore.errors import ExtractionConfigError
from saestore.extract.sae_specs import (
    GEMMA_SCOPE_MODELS,
    L0_DIR,
    LAYER_TYPES,
    NPZ,
    REGISTRY_ID,
    SAE_CFG,
    SAE_WEIGHTS,
    WIDTHS,
    SAESpec,
    fmt_layers,
    fmt_widths,
    hook_name,
    short_name,
    validate_model_name,
)
from saestore.extract.tiny import (
    TINY_MODEL_NAME,
    TINY_WIDTHS,
    tiny_registry,
)

logger = logging.getLogger(__name__)

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
            m = REGISTRY_ID.fullmatch(sae_id)
            if m and m.group(4) is not None:
                l0s.setdefault((int(m.group(1)), m.group(2)), {})[int(m.group(4))] = sae_id
    if canonical in directory:
        for sae_id, folder in directory[canonical].saes_map.items():
            m = REGISTRY_ID.fullmatch(sae_id)
            if m and m.group(3) == "canonical":
                l0 = L0_DIR.search(folder)
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
            f"{TINY_MODEL_NAME} has no {width} SAEs; widths: {fmt_widths(TINY_WIDTHS)}"
        )
    registry = tiny_registry()
    specs = []
    for lt in layer_types:
        available = sorted(layer for (t, layer, w) in registry if t == lt and w == width)
        for layer in layers:
            entry = registry.get((lt, layer, width))
            if entry is None:
                raise ExtractionConfigError(
                    f"{TINY_MODEL_NAME} has {lt} SAEs only at layers {fmt_layers(available)}"
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
    short = short_name(model)
    if width not in WIDTHS:
        raise ExtractionConfigError(f"unknown width {width!r}: choose one of {fmt_widths(WIDTHS)}")
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
                    f"{short} has {lt} SAEs only at layers {fmt_layers(all_layers)}"
                )
            entry = index.get((layer, width))
            if entry is None:
                raise ExtractionConfigError(
                    f"{short} has no {width} {lt} SAE at layer {layer}; widths there: "
                    f"{fmt_widths(widths_here)}"
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
    return ((path / SAE_CFG).is_file() and (path / SAE_WEIGHTS).is_file()) or (path / NPZ).is_file()


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
                    f"{lt}/layer_{layer}/width_{width}/ holding cfg.json + {SAE_WEIGHTS} or {NPZ}"
                )
            folder, l0 = _pick_l0_dir(folder, target_l0, lt, layer)
            specs.append(_local_spec(folder, lt, layer, width, l0))
    return specs


def _sae_or_l0_dirs(folder: Path) -> bool:
    return _is_sae_dir(folder) or any(_l0_subdirs(folder))


def _l0_subdirs(folder: Path) -> dict[int, Path]:
    out = {}
    for sub in folder.iterdir():
        m = L0_DIR.fullmatch(sub.name)
        if m and sub.is_dir() and _is_sae_dir(sub):
            out[int(m.group(1))] = sub
    return out


def _pick_l0_dir(
    folder: Path, target_l0: float | None, lt: str, layer: int
) -> tuple[Path, float | None]:
    if _is_sae_dir(folder):
        m = L0_DIR.fullmatch(folder.name)
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
    if (folder / SAE_CFG).is_file() and (folder / SAE_WEIGHTS).is_file():
        try:
            cfg = json.loads((folder / SAE_CFG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExtractionConfigError(f"cannot read {folder / SAE_CFG}: {e}") from e
        d_sae = cfg.get("d_sae")
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        found_hook = meta.get("hook_name") or cfg.get("hook_name")
        if found_hook is not None and found_hook != expected_hook:
            raise ExtractionConfigError(
                f"SAE at {str(folder)!r} reads hook {found_hook!r} but {lt} layer {layer} needs "
                f"{expected_hook!r}"
            )
    else:
        d_sae = _npz_shape(folder / NPZ, "w_enc")[1]
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

