"""Every check of a request that needs the model's shape or tokenizer, made before anything is
loaded or written: the model is available (the tiny bundle, a local folder, or the Hugging Face
cache, else the hub), each SAE fits the hook it reads (layer, ``d_in``, ``reshape_activations``,
hook name, from its ``cfg.json`` or ``params.npz`` header, no weights), and the prompt of every
author leaves room for the documents in the model's context. :func:`check_request` runs them all;
:func:`saestore.extract.launch.plan` calls it, so a failure is one line and no store or registry
row exists yet. The same checks run again on the loaded model and SAEs
(:func:`saestore.extract.models.check_sae_matches_model`), which stay the authority.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saestore.errors import ExtractionConfigError
from saestore.extract import hooks
from saestore.extract.sae_specs import NPZ, SAE_CFG, SAESpec, hub_unreachable, validate_model_name
from saestore.extract.tiny import TINY_MODEL_NAME, build_tiny_bundle


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the checks need of a model, read from its configuration (no weights)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_ctx: int

    def d_in(self, layer_type: str) -> int:
        """The width of the hook an SAE of ``layer_type`` reads."""
        return self.n_heads * self.d_head if hooks.site(layer_type).reshape == "hook_z" else self.d_model


def _shape(cfg: Any) -> ModelShape:
    return ModelShape(n_layers=int(cfg.n_layers), d_model=int(cfg.d_model), n_heads=int(cfg.n_heads),
                      d_head=int(cfg.d_head), n_ctx=int(cfg.n_ctx))


def _in_hf_cache(repo: str) -> None:
    """Raise a one-line error unless ``repo`` is in the local Hugging Face cache or (online) on the hub."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        huggingface_hub.snapshot_download(repo, local_files_only=True)
        return
    except LocalEntryNotFoundError as e:
        missing: BaseException = e
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise hub_unreachable(f"model {repo!r}", missing)
    try:  # online: the loader downloads it; check now that the hub can be reached and has it
        huggingface_hub.HfApi().model_info(repo, timeout=20)
    except Exception as e:  # any hub or network failure (their classes vary by version) is the same advice
        raise hub_unreachable(f"model {repo!r}", e) from None


def model_shape(name: str) -> tuple[ModelShape, Any]:
    """The model's shape and its tokenizer, checking the model is available; loads no weights."""
    from transformers import AutoTokenizer

    name = validate_model_name(name)
    if name == TINY_MODEL_NAME:
        bundle = build_tiny_bundle()
        cfg = json.loads((bundle / "model" / "config.json").read_text(encoding="utf-8"))
        shape = ModelShape(**{k: int(cfg[k]) for k in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx")})
        return shape, AutoTokenizer.from_pretrained(bundle / "tokenizer")
    from transformer_lens import loading_from_pretrained as loading

    try:
        if Path(name).is_dir():
            with tempfile.TemporaryDirectory(prefix="saestore-ckpt-") as tmp:  # as models._load_local_hf
                link = Path(tmp) / "checkpoint"
                link.symlink_to(Path(name).resolve(), target_is_directory=True)
                cfg = loading.get_pretrained_model_config(str(link))
            return _shape(cfg), AutoTokenizer.from_pretrained(name)
        _in_hf_cache(name)
        cfg = loading.get_pretrained_model_config(name)
        return _shape(cfg), AutoTokenizer.from_pretrained(name)
    except ExtractionConfigError:
        raise
    except OSError as e:
        raise hub_unreachable(f"model {name!r}", e) from e
    except (ValueError, KeyError, NotImplementedError, AttributeError) as e:
        raise ExtractionConfigError(f"cannot read the configuration of model {name!r}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _sae_header(spec: SAESpec) -> dict[str, Any] | None:
    """``d_in``, ``reshape_activations`` and ``hook_name`` of a local SAE, from its files (no weights)."""
    if spec.local_path is None:
        return None
    folder = Path(spec.local_path)
    if (folder / SAE_CFG).is_file():
        cfg = json.loads((folder / SAE_CFG).read_text(encoding="utf-8"))
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        return {"d_in": cfg.get("d_in"), "reshape_activations": cfg.get("reshape_activations", "none"),
                "hook_name": meta.get("hook_name", cfg.get("hook_name"))}
    if (folder / NPZ).is_file():
        from saestore.extract.sae_resolve import _npz_shape

        return {"d_in": _npz_shape(folder / NPZ, "w_enc")[0], "reshape_activations": None, "hook_name": None}
    return None


def check_saes(specs: Sequence[SAESpec], shape: ModelShape) -> None:
    """Each SAE fits the hook it reads: the layer exists, and a local SAE's ``d_in``,
    ``reshape_activations`` and hook name are those of its site."""
    for spec in specs:
        where = f"{spec.layer_type} layer {spec.layer}" + (f" ({spec.local_path})" if spec.local_path else "")
        if spec.layer >= shape.n_layers:
            raise ExtractionConfigError(f"{where} does not exist: the model has layers 0-{shape.n_layers - 1}")
        header = _sae_header(spec)
        if header is None:
            continue
        expected = shape.d_in(spec.layer_type)
        if header["d_in"] is not None and int(header["d_in"]) != expected:
            raise ExtractionConfigError(f"SAE {where} has d_in {header['d_in']} but the model's {spec.hook_name} "
                                        f"has width {expected}")
        wants = hooks.site(spec.layer_type).reshape
        if header["reshape_activations"] is not None and (header["reshape_activations"] == "hook_z") != (
                wants == "hook_z"):
            raise ExtractionConfigError(
                f"SAE {where} has reshape_activations={header['reshape_activations']!r}; {spec.hook_name} needs "
                f"{'hook_z' if wants == 'hook_z' else 'none'} (a {spec.layer_type} SAE of another site?)")
        if header["hook_name"] is not None and header["hook_name"] != spec.hook_name:
            raise ExtractionConfigError(f"SAE {where} reads hook {header['hook_name']!r}, expected {spec.hook_name!r}")


def prompt_length(tokenizer: Any, template: str | None, author: str) -> int:
    """Tokens before a document: BOS, plus the prompt of ``author`` in the prompted setting."""
    return 1 + (len(tokenizer(template.format(style=author), add_special_tokens=False)["input_ids"])
                if template is not None else 0)


def check_prompts(tokenizer: Any, template: str | None, authors: Sequence[str], n_tok: int, n_ctx: int) -> None:
    """The prompt of every author plus ``n_tok`` document tokens fits the context ``n_ctx``."""
    if template is not None:
        alone = prompt_length(tokenizer, template, "")
        if alone >= n_ctx:
            raise ExtractionConfigError(
                f"the prompt template alone ({alone} tokens with BOS) fills the model context {n_ctx}: shorten "
                "--prompt_template")
    lengths = {a: prompt_length(tokenizer, template, a) for a in authors}
    worst = max(lengths, key=lengths.__getitem__)
    p_len = lengths[worst]
    if p_len + n_tok <= n_ctx:
        return
    too_long = [a for a, n in lengths.items() if n + n_tok > n_ctx]
    names = ", ".join(repr(a[:40]) for a in too_long[:3]) + (f" and {len(too_long) - 3} more" if len(too_long) > 3
                                                             else "")
    if p_len >= n_ctx:
        raise ExtractionConfigError(
            f"the prompt of author {names} ({p_len} tokens with BOS) fills the model context {n_ctx}: shorten "
            "--prompt_template, or leave the author out with --exclude_authors")
    raise ExtractionConfigError(
        f"the prompt of author {names} ({p_len} tokens with BOS) + max_seq_len - 1 ({n_tok}) exceeds the model "
        f"context {n_ctx}: pass --max_seq_len {n_ctx - p_len + 1}, shorten --prompt_template, or leave the author "
        "out with --exclude_authors")


def check_request(model: str, specs: Sequence[SAESpec], template: str | None, authors: Sequence[str],
                  n_tok: int) -> None:
    """Every check above, for one model."""
    shape, tokenizer = model_shape(model)
    check_saes(specs, shape)
    check_prompts(tokenizer, template, authors, n_tok, shape.n_ctx)
