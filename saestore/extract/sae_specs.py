"""Model and SAE names: the widths, Gemma Scope models and dtypes saestore knows, :class:`SAESpec`
(one resolved SAE), hook names, and model-name validation (nothing here loads weights)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from saestore import protocol
from saestore.errors import ExtractionConfigError
from saestore.extract import hooks
from saestore.extract.tiny import (
    TINY_MODEL_NAME,
    TINY_WIDTHS,
)

logger = logging.getLogger(__name__)

LAYER_TYPES = protocol.LAYER_TYPES
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

DTYPES = protocol.VALUE_DTYPES
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
NPZ = "params.npz"
L0_DIR = re.compile(r"average_l0_(\d+)")
REGISTRY_ID = re.compile(r"layer_(\d+)/width_([0-9a-z]+)/(canonical|average_l0_(\d+))")


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


hook_name = hooks.hook_name


# ----------------------------------------------------------------------------------------------
# model names


def fmt_layers(layers: Sequence[int]) -> str:
    """``0-25`` for a contiguous run, else ``9, 20, 31``."""
    s = sorted(set(layers))
    if len(s) > 3 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))


def fmt_widths(widths) -> str:
    return ", ".join(sorted(widths, key=lambda w: WIDTHS.get(w, TINY_WIDTHS.get(w, 0))))


def _unknown_model(name: str) -> ExtractionConfigError:
    return ExtractionConfigError(
        f"unknown model {name!r}: choose {TINY_MODEL_NAME}, "
        + ", ".join(GEMMA_SCOPE_MODELS)
        + ", a TransformerLens model name, or a local path (a folder with config.json)"
    )


def short_name(name: str) -> str:
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



def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ExtractionConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dtype


def hub_unreachable(what: str, e: BaseException) -> ExtractionConfigError:
    hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return ExtractionConfigError(
        f"{what} is not in the local Hugging Face cache (HF_HOME={hf_home}) and could not be "
        f"downloaded ({type(e).__name__}: {detail}): run once with network access (and, for "
        "gated models such as Gemma, an accepted licence and HF_TOKEN) to download it, point "
        "HF_HOME at a cache that has it, or pass a local path; set HF_HUB_OFFLINE=1 to fail fast"
    )


