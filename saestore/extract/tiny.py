"""The embedded default model ``tiny``: a small random transformer with JumpReLU SAEs.

``tiny`` lets the whole pipeline run offline and on a CPU in seconds. The bundle is built once
per machine (about 20 s on 2 cores, a third of it importing sae_lens) and cached under
``$SAESTORE_CACHE/tiny-v1`` (default ``~/.cache/saestore/tiny-v1``, about 110 MB). Everything is
seeded, so two builds give the same bytes on the same platform:

* ``tokenizer/`` — byte-level BPE trained with ``tokenizers`` on the demo corpus
  (``<bos>`` prepended by the tokenizer itself, ``<pad>``, right padding);
* ``model/config.json`` + ``model/model.safetensors`` — a ``HookedSAETransformer`` with random
  (seeded) weights: 4 layers, d_model 64, 4 heads of 16, d_mlp 256, n_ctx 256, RMS norm,
  gelu_new;
* ``saes/{layer_type}/layer_{L}/width_{W}/`` — JumpReLU SAEs written by ``sae.save_model`` for
  every layer type (res: ``blocks.L.hook_resid_post``, mlp: ``blocks.L.hook_mlp_out``,
  att: ``blocks.L.attn.hook_z``) and layer, at widths ``1k`` and ``16k``;
* ``registry.json`` — one entry per SAE with its hook, width, measured average L0
  (``expected_l0``) and the L0 it has when all SAEs of its width are spliced in at once
  (``l0_spliced``).

The SAEs are not trained. Their encoder directions are partly random and partly data-derived:
for every single-token distinctive word of a demo author (see
:data:`saestore.extract.corpus.DEMO_AUTHOR_VOCAB`) one feature points along the Fisher
discriminant of that token (inverse covariance times its mean activation minus the global
mean), and one feature per author along that of all its distinctive tokens. Each feature gets
a target firing frequency (log-normal over the random features; a token feature 60% of its
token's frequency) and its threshold is set to the matching quantile of its pre-activation on
the demo corpus, so the mean L0 is realistic (about 32 at 1k and 66 at 16k). Decoder rows are
the encoder directions with one least-squares scale per SAE (fraction of variance unexplained
0.3-0.6). ``expected_l0`` is measured on clean activations (each SAE on the unmodified model),
as Gemma Scope's are. Splicing every SAE in at once (``use_error_term=False``) feeds downstream
SAEs reconstructions they were not calibrated on: their L0 then drifts, mildly at 1k (about
10-60) and strongly at 16k (res layers 1-3 reach 300-800); ``l0_spliced`` records it.
Nothing here is pickled: weights are safetensors, configs JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saestore.extract.corpus import demo_corpus
from saestore.extract.tiny_saes import (
    HELD_OUT_TOKENS,
    SEED,
    TINY_LAYER_TYPES,
    TINY_MODEL_NAME,
    TINY_TARGET_L0,
    collect_activations,
    tiny_hook_name,
    write_saes,
)
from saestore.location import default_cache_dir

__all__ = [
    "TINY_BUNDLE_NAME",
    "TINY_LAYER_TYPES",
    "TINY_MODEL_CONFIG",
    "TINY_MODEL_NAME",
    "TINY_TARGET_L0",
    "TINY_WIDTHS",
    "build_tiny_bundle",
    "default_cache_dir",
    "make_tiny_config",
    "tiny_hook_name",
    "tiny_registry",
    "write_tiny_bundle",
]

logger = logging.getLogger(__name__)

TINY_BUNDLE_NAME = "tiny-v1"
"""Folder name of the bundle in the cache; bump it whenever the built bytes change."""
TINY_WIDTHS: dict[str, int] = {"1k": 1024, "16k": 16384}
TINY_MODEL_CONFIG: dict[str, Any] = {
    "model_name": TINY_MODEL_NAME,
    "n_layers": 4,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "n_ctx": 256,
    "act_fn": "gelu_new",
    "normalization_type": "RMS",
    "positional_embedding_type": "standard",
    "original_architecture": "saestore-tiny",
}
"""``HookedTransformerConfig`` keywords of the tiny model (``d_vocab`` comes from the tokenizer)."""

_VOCAB_SIZE = 1536
_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_TOKENIZER_TRAIN_DOCS_PER_AUTHOR = 96
_TOKENIZER_TRAIN_SEED = 1
_REGISTRY_FILE = "registry.json"
_BUILD_VERSION = 1
"""Bump whenever the builder's output changes; older cached bundles are then rebuilt."""


#: layer type -> the TransformerLens hook (a format string over ``layer``) its SAEs read
def _is_current(bundle: Path) -> bool:
    """Whether ``bundle`` is a finished build of this version of the builder."""
    try:
        registry = json.loads((bundle / _REGISTRY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return registry.get("build_version") == _BUILD_VERSION


def build_tiny_bundle(cache_dir: Path | str | None = None) -> Path:
    """Return the tiny bundle's folder, building it first if it is not in the cache.

    The build writes into a temporary sibling folder and renames it into place, so a reader
    never sees a half-built bundle; if another process finished first, its bundle is used and
    ours is discarded. A bundle left by an older builder (``build_version`` in registry.json)
    is replaced.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / TINY_BUNDLE_NAME
    if _is_current(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_BUNDLE_NAME}.tmp-", dir=root))
    stale = None
    try:
        t0 = time.perf_counter()
        write_tiny_bundle(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if final.exists() and not _is_current(final):
            logger.warning("replacing the tiny bundle at %s, built by another saestore version", final)
            stale = Path(tempfile.mkdtemp(prefix=f".{TINY_BUNDLE_NAME}.stale-", dir=root))
            os.rename(final, stale / "bundle")
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):
                raise
            logger.info("another process built %s first; using it", final)
        else:
            logger.info("built the tiny bundle at %s in %.1f s", final, time.perf_counter() - t0)
    finally:
        for leftover in (tmp, stale):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def tiny_registry(cache_dir: Path | str | None = None) -> dict[tuple[str, int, str], dict[str, Any]]:
    """The tiny SAEs: ``(layer_type, layer, width) -> {"path", "expected_l0", "hook_name", "d_sae"}``.

    Builds the bundle if needed. ``path`` is the absolute folder of the SAE (``cfg.json`` +
    ``sae_weights.safetensors``).
    """
    bundle = build_tiny_bundle(cache_dir)
    registry = json.loads((bundle / _REGISTRY_FILE).read_text())
    return {
        (e["layer_type"], int(e["layer"]), e["width"]): {
            "path": str(bundle / e["path"]),
            "expected_l0": float(e["expected_l0"]),
            "hook_name": e["hook_name"],
            "d_sae": int(e["d_sae"]),
        }
        for e in registry["saes"]
    }


# ----------------------------------------------------------------------------------------------
# building


def write_tiny_bundle(
    dest: Path,
    *,
    widths: Mapping[str, int] | None = None,
    layer_types: Sequence[str] = TINY_LAYER_TYPES,
) -> None:
    """Build the bundle into the (existing, empty) folder ``dest``.

    ``widths`` and ``layer_types`` restrict the SAEs built (tests use them for a cheap
    determinism check: the SAEs built are the same bytes either way, only ``l0_spliced``
    depends on which others are spliced in); the cached bundle always has all of them.
    """
    import torch

    widths = dict(TINY_WIDTHS if widths is None else widths)
    dest = Path(dest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer = _write_tokenizer(dest / "tokenizer")
        model = _write_model(dest / "model", tokenizer)
        acts, token_ids = collect_activations(model, tokenizer)
        entries = write_saes(
            dest / "saes", model, tokenizer, acts, token_ids, widths, tuple(layer_types)
        )
    registry = {
        "model": TINY_MODEL_NAME,
        "bundle": TINY_BUNDLE_NAME,
        "build_version": _BUILD_VERSION,
        "n_calibration_tokens": int(token_ids.numel()),
        "l0_measured_on": (
            f"{HELD_OUT_TOKENS} held-out non-BOS tokens of demo_corpus(), clean activations"
        ),
        "saes": entries,
    }
    (dest / _REGISTRY_FILE).write_text(json.dumps(registry, indent=1, sort_keys=True) + "\n")


def _write_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = [r["text"] for r in demo_corpus(_TOKENIZER_TRAIN_DOCS_PER_AUTHOR, _TOKENIZER_TRAIN_SEED)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=TINY_MODEL_CONFIG["n_ctx"],
    )
    path.mkdir(parents=True)
    hf.save_pretrained(path)
    # TransformerLens reloads tokenizers by name_or_path: hand it the saved copy.
    return AutoTokenizer.from_pretrained(path)


def make_tiny_config(d_vocab: int, dtype: str = "float32"):
    """The tiny model's ``HookedTransformerConfig``."""
    import torch
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**TINY_MODEL_CONFIG, d_vocab=d_vocab, dtype=getattr(torch, dtype))


def _write_model(path: Path, tokenizer):
    from sae_lens import HookedSAETransformer
    from safetensors.torch import save_file

    model = HookedSAETransformer(
        make_tiny_config(len(tokenizer)), tokenizer=tokenizer, default_padding_side="right"
    )
    model.eval()
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({**TINY_MODEL_CONFIG, "d_vocab": len(tokenizer)}, indent=1, sort_keys=True) + "\n"
    )
    state = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return model

