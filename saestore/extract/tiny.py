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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saestore.errors import ExtractionConfigError
from saestore.extract.corpus import DEMO_AUTHOR_VOCAB, demo_corpus

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

TINY_MODEL_NAME = "tiny"
TINY_BUNDLE_NAME = "tiny-v1"
"""Folder name of the bundle in the cache; bump it whenever the built bytes change."""
TINY_WIDTHS: dict[str, int] = {"1k": 1024, "16k": 16384}
TINY_TARGET_L0: dict[str, float] = {"1k": 32.0, "16k": 60.0}
"""Mean L0 the thresholds are calibrated for (measured values land close; see registry.json)."""
TINY_LAYER_TYPES: tuple[str, ...] = ("res", "mlp", "att")
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

_SEED = 0
_VOCAB_SIZE = 1536
_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_TOKENIZER_TRAIN_DOCS_PER_AUTHOR = 96
_TOKENIZER_TRAIN_SEED = 1
_CALIBRATION_TOKENS = 4096
"""Calibration tokens (sampled, seeded) that set the thresholds; half that for wide SAEs."""
_HELD_OUT_TOKENS = 4096
"""Other demo-corpus tokens on which each SAE's L0 is measured."""
_MAX_FEATURE_FREQUENCY = 0.15
_SPLICE_DOC_STRIDE = 6
"""Every sixth demo document goes through the pass that measures ``l0_spliced``."""
_SPLICE_MAX_LEN = 128
_REGISTRY_FILE = "registry.json"
_BUILD_VERSION = 1
"""Bump whenever the builder's output changes; older cached bundles are then rebuilt."""


def default_cache_dir() -> Path:
    """``$SAESTORE_CACHE`` if set, else ``~/.cache/saestore``."""
    env = os.environ.get("SAESTORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saestore"


#: layer type -> the TransformerLens hook (a format string over ``layer``) its SAEs read
_HOOKS = {"res": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
          "att": "blocks.{layer}.attn.hook_z"}


def tiny_hook_name(layer_type: str, layer: int) -> str:
    """The TransformerLens hook an SAE of ``layer_type`` at ``layer`` reads."""
    if layer_type not in _HOOKS:
        raise ExtractionConfigError(f"unknown layer type {layer_type!r}: choose res, mlp or att")
    return _HOOKS[layer_type].format(layer=layer)


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
        torch.manual_seed(_SEED)
        tokenizer = _write_tokenizer(dest / "tokenizer")
        model = _write_model(dest / "model", tokenizer)
        acts, token_ids = _collect_activations(model, tokenizer)
        entries = _write_saes(
            dest / "saes", model, tokenizer, acts, token_ids, widths, tuple(layer_types)
        )
    registry = {
        "model": TINY_MODEL_NAME,
        "bundle": TINY_BUNDLE_NAME,
        "build_version": _BUILD_VERSION,
        "n_calibration_tokens": int(token_ids.numel()),
        "l0_measured_on": (
            f"{_HELD_OUT_TOKENS} held-out non-BOS tokens of demo_corpus(), clean activations"
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


def _demo_batch(tokenizer, texts: list[str], max_len: int):
    """Right-padded ids, attention mask and keep mask (valid and not BOS) of ``texts``."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    ids_BP, mask_BP = batch["input_ids"], batch["attention_mask"].bool()
    keep_BP = mask_BP.clone()
    keep_BP[:, 0] = False
    return ids_BP, mask_BP, keep_BP


def _forward_hooks(n_layers: int) -> list[str]:
    """Every SAE hook in the order the forward pass reaches them."""
    return [tiny_hook_name(lt, layer) for layer in range(n_layers) for lt in ("att", "mlp", "res")]


def _collect_activations(model, tokenizer):
    """Clean activations of every SAE hook on the demo corpus (non-BOS, non-pad tokens)."""
    import torch

    texts = [r["text"] for r in demo_corpus()]
    hooks = _forward_hooks(model.cfg.n_layers)
    acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    ids_all: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = texts[start : start + 32]
            ids_BP, mask_BP, keep_BP = _demo_batch(tokenizer, batch, model.cfg.n_ctx)
            _, cache = model.run_with_cache(
                ids_BP, attention_mask=mask_BP, names_filter=hooks, return_type=None
            )
            ids_all.append(ids_BP[keep_BP])
            for h in hooks:
                a = cache[h]
                acts[h].append(a.reshape(*a.shape[:2], -1)[keep_BP].float())
    return {h: torch.cat(v) for h, v in acts.items()}, torch.cat(ids_all)


def _author_token_ids(tokenizer) -> dict[str, list[int]]:
    """Single-token (space-prefixed) distinctive words of every demo author."""
    out: dict[str, list[int]] = {}
    for author, words in DEMO_AUTHOR_VOCAB.items():
        ids = []
        for w in words:
            enc = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(enc[0])
        out[author] = ids
    return out


@dataclass(frozen=True, kw_only=True)
class _CleanStats:
    """What every width's SAE at one hook derives from clean activations."""

    mu_d: Any
    Xc_Nd: Any
    """Centred clean activations of all demo-corpus tokens."""
    data_dirs_Gd: Any
    """Data-derived directions (author means, then token means), unnormalised."""
    data_freqs: list[float]
    """Target firing frequency of each data-derived direction."""


def _clean_stats(X_Nd, token_ids_N, author_ids: dict[str, list[int]]) -> _CleanStats:
    """Centre the clean activations and derive the author and token directions.

    Directions are Fisher discriminants, ``Σ⁻¹ (mean of the group − global mean)``: far more
    selective for their token than the raw mean difference once attention has mixed contexts.
    Token features aim at 60% of their token's frequency, author features at half of the
    author's distinctive-token frequency, trading recall for precision.
    """
    import torch

    mu_d = X_Nd.mean(0)
    Xc_Nd = X_Nd - mu_d
    cov_dd = Xc_Nd.T @ Xc_Nd / len(Xc_Nd)
    cov_inv_dd = torch.linalg.inv(cov_dd + 1e-3 * cov_dd.diagonal().mean() * torch.eye(len(mu_d)))
    dirs, freqs = [], []
    for author in sorted(author_ids):
        author_mask = torch.isin(token_ids_N, torch.tensor(author_ids[author], dtype=token_ids_N.dtype))
        if author_mask.sum() >= 2:
            dirs.append(cov_inv_dd @ Xc_Nd[author_mask].mean(0))
            freqs.append(0.5 * float(author_mask.float().mean()))
    for author in sorted(author_ids):
        for t in author_ids[author]:
            m = token_ids_N == t
            if m.sum() >= 2:
                dirs.append(cov_inv_dd @ Xc_Nd[m].mean(0))
                freqs.append(0.6 * float(m.float().mean()))
    return _CleanStats(mu_d=mu_d, Xc_Nd=Xc_Nd, data_dirs_Gd=torch.stack(dirs), data_freqs=freqs)


def _write_saes(
    root: Path, model, tokenizer, acts, token_ids, widths: Mapping[str, int],
    layer_types: tuple[str, ...],
) -> list[dict]:
    """Calibrate and save every SAE on clean activations; return the registry entries.

    Each entry also records ``l0_spliced``: the mean L0 when all SAEs of that width are spliced
    into the forward pass at once (``use_error_term=False``), measured on a sixth of the demo
    corpus. Downstream SAEs then see upstream reconstructions, which shifts their L0.
    """
    import torch

    author_ids = _author_token_ids(tokenizer)
    hooks = _forward_hooks(model.cfg.n_layers)
    wanted = {
        tiny_hook_name(lt, layer): lt for lt in layer_types for layer in range(model.cfg.n_layers)
    }
    clean = {h: _clean_stats(acts[h], token_ids, author_ids) for h in hooks if h in wanted}
    texts = [r["text"] for r in demo_corpus()][::_SPLICE_DOC_STRIDE]
    ids_BP, mask_BP, keep_BP = _demo_batch(tokenizer, texts, _SPLICE_MAX_LEN)
    entries: list[dict] = []
    for width, d_sae in sorted(widths.items(), key=lambda kv: kv[1]):
        target_l0 = TINY_TARGET_L0.get(width, 0.004 * d_sae)
        saes: dict[str, Any] = {}
        l0_clean: dict[str, float] = {}
        for h_idx, hook in enumerate(hooks):
            if hook not in wanted:
                continue
            gen = torch.Generator().manual_seed(_SEED + 100 * d_sae + h_idx)
            saes[hook], l0_clean[hook] = _make_sae(
                clean[hook], d_sae, target_l0, gen, wanted[hook], hook
            )
        l0_spliced: dict[str, float] = {}

        def splice(act, hook, saes=saes, l0_spliced=l0_spliced):
            flat_BPd = act.reshape(*act.shape[:2], -1)
            recon_BPd, l0_spliced[hook.name] = _apply_sae(saes[hook.name], flat_BPd, keep_BP)
            return recon_BPd.reshape(act.shape).to(act.dtype)

        with torch.no_grad():
            model.run_with_hooks(
                ids_BP, attention_mask=mask_BP, return_type=None,
                fwd_hooks=[(h, splice) for h in hooks if h in saes],
            )
        for layer_type in (lt for lt in TINY_LAYER_TYPES if lt in layer_types):
            for layer in range(model.cfg.n_layers):
                hook = tiny_hook_name(layer_type, layer)
                rel = Path("saes") / layer_type / f"layer_{layer}" / f"width_{width}"
                saes[hook].save_model(root.parent / rel)
                entries.append(
                    {
                        "layer_type": layer_type,
                        "layer": layer,
                        "width": width,
                        "d_sae": d_sae,
                        "hook_name": hook,
                        "path": rel.as_posix(),
                        "expected_l0": round(l0_clean[hook], 3),
                        "l0_spliced": round(l0_spliced[hook], 3),
                    }
                )
    return entries


def _make_sae(clean: _CleanStats, d_sae: int, target_l0: float, gen, layer_type: str, hook: str):
    """A calibrated JumpReLU SAE and its mean L0 on held-out clean tokens."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    n, d_in = clean.Xc_Nd.shape
    n_data = min(len(clean.data_freqs), d_sae // 4)
    D_Fd = torch.empty(d_sae, d_in)
    D_Fd[:n_data] = clean.data_dirs_Gd[:n_data]
    D_Fd[n_data:] = torch.randn(d_sae - n_data, d_in, generator=gen)
    D_Fd = D_Fd / D_Fd.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # Target firing frequencies: token features fire on their token, the rest log-normal.
    p_F = torch.empty(d_sae, dtype=torch.float64)
    p_F[:n_data] = torch.tensor(clean.data_freqs[:n_data], dtype=torch.float64)
    rest = torch.exp(torch.randn(d_sae - n_data, generator=gen, dtype=torch.float64))
    budget = max(target_l0 - float(p_F[:n_data].sum()), 0.1 * target_l0)
    for _ in range(20):  # rescale, clip, repeat: sum of clipped frequencies -> budget
        rest = (rest * budget / rest.sum()).clamp(1.0 / n, _MAX_FEATURE_FREQUENCY)
    p_F[n_data:] = rest

    # Thresholds: per-feature quantiles on a seeded sample of clean tokens.
    n_cal = min(_CALIBRATION_TOKENS if d_sae <= 4096 else _CALIBRATION_TOKENS // 2, n // 2)
    perm_N = torch.randperm(n, generator=gen)
    cal_idx, held_idx = perm_N[:n_cal], perm_N[n_cal : n_cal + _HELD_OUT_TOKENS]
    pre_CF = clean.Xc_Nd[cal_idx] @ D_Fd.T
    k_F = torch.clamp((p_F * n_cal).round().long(), 1, n_cal - 1)
    top_KF = torch.topk(pre_CF, int(k_F.max()) + 1, dim=0).values
    threshold_F = top_KF.gather(0, k_F[None, :]).squeeze(0).clamp_min(1e-3).float()
    del pre_CF, top_KF

    cfg = JumpReLUSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=False,
        reshape_activations="hook_z" if layer_type == "att" else "none",
        metadata=SAEMetadata(
            hook_name=hook, model_name=TINY_MODEL_NAME, prepend_bos=True, context_size=256
        ),
    )
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(D_Fd.T)
        sae.b_enc.copy_(-(clean.mu_d @ D_Fd.T))
        sae.threshold.copy_(threshold_F)
        sae.b_dec.zero_()
        sae.W_dec.copy_(D_Fd)
        # Decoder: encoder directions times one least-squares scale, on held-out clean tokens.
        target_Hd = clean.Xc_Nd[held_idx]
        recon_Hd, counts_H = _encode_decode(sae, target_Hd + clean.mu_d)
        scale = float((recon_Hd * target_Hd).sum() / (recon_Hd * recon_Hd).sum().clamp_min(1e-12))
        sae.W_dec.mul_(scale)
        sae.b_dec.copy_(clean.mu_d)
        l0 = float(counts_H.float().mean())
        fvu = float(((scale * recon_Hd - target_Hd) ** 2).sum() / (target_Hd**2).sum())
    logger.debug("tiny SAE %s d_sae=%d: clean L0 %.1f, FVU %.3f", hook, d_sae, l0, fvu)
    return sae, l0


def _encode_decode(sae, X_Nd):
    """JumpReLU reconstruction of flat activations and the number of active features per row.

    Computed in blocks: the dense (tokens, features) matrix of a 16k SAE would not fit.
    Thresholds are positive, so ``pre > threshold`` already implies the ReLU.
    """
    import torch

    counts, recon = [], []
    for start in range(0, X_Nd.shape[0], 1024):
        pre = torch.addmm(sae.b_enc, X_Nd[start : start + 1024], sae.W_enc)
        active = pre > sae.threshold
        counts.append(active.sum(1))
        recon.append(torch.addmm(sae.b_dec, pre.mul_(active), sae.W_dec))
    return torch.cat(recon), torch.cat(counts)


def _apply_sae(sae, flat_BPd, keep_BP):
    """Splice ``sae`` into flat activations; also return its mean L0 over the kept positions."""
    B, P, d = flat_BPd.shape
    recon_Nd, counts_N = _encode_decode(sae, flat_BPd.reshape(B * P, d).float())
    keep_N = keep_BP.reshape(-1)
    return recon_Nd.reshape(B, P, d), float(counts_N[keep_N].float().mean())
