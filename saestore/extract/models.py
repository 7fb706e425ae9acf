"""Models and SAEs for extraction: loading and tokenization (names: `sae_specs`; resolution: `sae_resolve`).

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

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saestore.errors import ExtractionConfigError
from saestore.extract import hooks
from saestore.extract.sae_resolve import resolve_saes
from saestore.extract.sae_specs import (
    GEMMA_SCOPE_MODELS,
    LAYER_TYPES,
    NPZ,
    SAE_CFG,
    SAE_WEIGHTS,
    WIDTHS,
    SAESpec,
    check_dtype,
    hook_name,
    hub_unreachable,
    validate_model_name,
)
from saestore.extract.tiny import (
    TINY_MODEL_NAME,
    build_tiny_bundle,
)

__all__ = [
    "GEMMA_SCOPE_MODELS",
    "LAYER_TYPES",
    "SAESpec",
    "WIDTHS",
    "check_sae_matches_model",
    "encode_documents",
    "encode_with_spans",
    "hook_name",
    "load_model",
    "load_sae",
    "resolve_saes",
    "tokenize",
    "validate_model_name",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# loading

def load_sae(spec: SAESpec, device: str, dtype: str = "float32"):
    """Load the SAE that ``spec`` names (sae_lens ``SAE``) onto ``device`` in ``dtype``."""
    from sae_lens import SAE

    check_dtype(dtype)
    if spec.local_path is not None:
        folder = Path(spec.local_path)
        if (folder / SAE_CFG).is_file() and (folder / SAE_WEIGHTS).is_file():
            sae = SAE.load_from_disk(folder, device=device, dtype=dtype)
        elif (folder / NPZ).is_file():
            sae = SAE.load_from_disk(
                folder, device=device, dtype=dtype, converter=_gemma_scope_npz_loader(spec)
            )
        else:
            raise ExtractionConfigError(f"no SAE in {spec.local_path!r} (it may have been moved)")
    else:
        try:
            loaded = SAE.from_pretrained(spec.release, spec.sae_id, device=device, dtype=dtype)
        except OSError as e:
            raise hub_unreachable(f"SAE {spec.release}/{spec.sae_id}", e) from e
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

        with np.load(Path(path) / NPZ, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        missing = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} - set(arrays)
        if missing:
            raise ExtractionConfigError(f"{Path(path) / NPZ} lacks {', '.join(sorted(missing))}")
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
            "reshape_activations": hooks.site(spec.layer_type).reshape,
            "metadata": {"hook_name": spec.hook_name, "prepend_bos": True},
        }
        cfg.update(cfg_overrides or {})
        return cfg, state

    return load


def _expected_d_in(model, layer_type: str) -> int:
    if hooks.site(layer_type).reshape == "hook_z":
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
    wants_z = hooks.site(spec.layer_type).reshape == "hook_z"
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
    check_dtype(dtype)
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
            raise hub_unreachable(f"model {name!r}", e) from e
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


def encode_documents(tokenizer, texts: Sequence[str], n_tok: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each document (no special tokens), truncated to ``n_tok``, and the number of
    tokens each lost: what a run stores at ``tok = 0 … n_tok - 1`` (PROTOCOL.md §2.4). One batch
    call to the tokenizer for all texts."""
    if not texts:
        return [], []
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [ids[:n_tok] for ids in enc], [max(0, len(ids) - n_tok) for ids in enc]


def encode_with_spans(tokenizer, texts: Sequence[str], n_tok: int
                      ) -> tuple[list[list[int]], list[int], list[np.ndarray]]:
    """:func:`encode_documents` plus each stored token's character span ``(n, 2)`` in its text
    (``char_start``/``char_end``, PROTOCOL.md §2.2): ``text[start:end]`` is the token's piece of the
    document and the pieces tile it (each starts where the one before ended).

    A fast tokenizer's ``offset_mapping`` gives the spans in one call (:func:`tile_spans`); other
    tokenizers fall back to :func:`decoded_spans`. Documents are tokenized alone, without the prompt
    or BOS, so the spans are offsets into ``text`` whatever the setting."""
    if not texts:
        return [], [], []
    if not getattr(tokenizer, "is_fast", False):
        ids, truncated = encode_documents(tokenizer, texts, n_tok)
        return ids, truncated, [decoded_spans(tokenizer, t, i) for t, i in zip(texts, ids, strict=True)]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids = [row[:n_tok] for row in enc["input_ids"]]
    spans = [tile_spans(offsets[:n_tok]) for offsets in enc["offset_mapping"]]
    return ids, [max(0, len(row) - n_tok) for row in enc["input_ids"]], spans


def tile_spans(offsets: Sequence[Sequence[int]]) -> np.ndarray:
    """A fast tokenizer's ``(start, end)`` character offsets made into spans that tile the text:
    each span starts where the one before ended (text the tokenizer left between tokens, such as
    trimmed spaces, goes to the token after it) and ends no earlier. Tokens that share a character
    (byte-level BPE splits a multi-byte character over several tokens, each with the character's
    offsets) give it to the first of them; the others get the empty span there.

    >>> tile_spans([(0, 1), (0, 1), (1, 2), (3, 4)]).tolist()
    [[0, 1], [1, 1], [1, 2], [2, 4]]
    """
    out = np.zeros((len(offsets), 2), np.int32)
    end = 0
    for t, (s, e) in enumerate(offsets):
        start = int(s) if t == 0 else end
        end = max(int(e), start)
        out[t] = start, end
    return out


def decoded_spans(tokenizer, text: str, ids: Sequence[int]) -> np.ndarray:
    """The fallback of :func:`encode_with_spans` for tokenizers without offsets: token ``t`` ends
    where the decoding of tokens ``0 … t`` stops agreeing with ``text`` (so a character split over
    several tokens goes to the token that completes it). Where a tokenizer's decoding does not
    reproduce the text (a normalizing tokenizer), the spans stop at the first difference."""
    out = np.zeros((len(ids), 2), np.int32)
    end = 0
    for t in range(len(ids)):
        decoded = tokenizer.decode(list(ids[: t + 1]))
        n = 0
        for a, b in zip(decoded, text, strict=False):
            if a != b:
                break
            n += 1
        out[t] = end, max(end, n)
        end = out[t, 1]
    return out


def tokenize(model, texts: Sequence[str], max_seq_len: int):
    """Right-padded token ids and attention mask, each row starting with exactly one BOS.

    Returns ``(input_ids_BP, attention_mask_BP)`` as int64 / bool tensors of width at most
    ``max_seq_len`` (BOS included); longer texts are truncated. The rows are BOS followed by
    :func:`encode_documents`, the encoding extraction stores.
    """
    import torch

    tok = model.tokenizer
    if max_seq_len < 2:
        raise ExtractionConfigError(
            f"max_seq_len must be at least 2 (BOS + a token), got {max_seq_len}"
        )
    bos = tok.bos_token_id
    docs, _ = encode_documents(tok, texts, max_seq_len - 1)
    rows = [[bos, *ids] for ids in docs]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    ids_BP = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_BP = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids_BP[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask_BP[i, : len(r)] = True
    return ids_BP, mask_BP
