"""The tiny bundle's SAEs: clean activations of the demo corpus, calibration of each SAE to its
documented L0, and the spliced L0 measurement (called by :func:`saestore.extract.tiny.write_tiny_bundle`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saestore import protocol
from saestore.extract import hooks as sites
from saestore.extract.corpus import DEMO_AUTHOR_VOCAB, demo_corpus

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"
TINY_TARGET_L0: dict[str, float] = {"1k": 32.0, "16k": 60.0}
"""Mean L0 the thresholds are calibrated for (measured values land close; see registry.json)."""
TINY_LAYER_TYPES: tuple[str, ...] = protocol.LAYER_TYPES
SEED = 0
"""torch seed of the whole bundle build."""
CALIBRATION_TOKENS = 4096
"""Calibration tokens (sampled, seeded) that set the thresholds; half that for wide SAEs."""
HELD_OUT_TOKENS = 4096
"""Other demo-corpus tokens on which each SAE's L0 is measured."""
MAX_FEATURE_FREQUENCY = 0.15
SPLICE_DOC_STRIDE = 6
"""Every sixth demo document goes through the pass that measures ``l0_spliced``."""
SPLICE_MAX_LEN = 128

tiny_hook_name = sites.hook_name


def _demo_batch(tokenizer, texts: list[str], max_len: int):
    """Right-padded ids, attention mask and keep mask (valid and not BOS) of ``texts``."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    ids_BP, mask_BP = batch["input_ids"], batch["attention_mask"].bool()
    keep_BP = mask_BP.clone()
    keep_BP[:, 0] = False
    return ids_BP, mask_BP, keep_BP


def collect_activations(model, tokenizer):
    """Clean activations of every SAE hook on the demo corpus (non-BOS, non-pad tokens)."""
    import torch

    texts = [r["text"] for r in demo_corpus()]
    hooks = sites.forward_hooks(model.cfg.n_layers)
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

    mu_d: Any  # mean clean activation
    Xc_Nd: Any  # centred clean activations of all demo-corpus tokens
    data_dirs_Gd: Any  # data-derived directions (author means, then token means), unnormalised
    data_freqs: list[float]  # target firing frequency of each data-derived direction


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


def write_saes(
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
    hooks = sites.forward_hooks(model.cfg.n_layers)
    wanted = {
        tiny_hook_name(lt, layer): lt for lt in layer_types for layer in range(model.cfg.n_layers)
    }
    clean = {h: _clean_stats(acts[h], token_ids, author_ids) for h in hooks if h in wanted}
    texts = [r["text"] for r in demo_corpus()][::SPLICE_DOC_STRIDE]
    ids_BP, mask_BP, keep_BP = _demo_batch(tokenizer, texts, SPLICE_MAX_LEN)
    entries: list[dict] = []
    for width, d_sae in sorted(widths.items(), key=lambda kv: kv[1]):
        target_l0 = TINY_TARGET_L0.get(width, 0.004 * d_sae)
        saes: dict[str, Any] = {}
        l0_clean: dict[str, float] = {}
        for h_idx, hook in enumerate(hooks):
            if hook not in wanted:
                continue
            gen = torch.Generator().manual_seed(SEED + 100 * d_sae + h_idx)
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
        rest = (rest * budget / rest.sum()).clamp(1.0 / n, MAX_FEATURE_FREQUENCY)
    p_F[n_data:] = rest

    # Thresholds: per-feature quantiles on a seeded sample of clean tokens.
    n_cal = min(CALIBRATION_TOKENS if d_sae <= 4096 else CALIBRATION_TOKENS // 2, n // 2)
    perm_N = torch.randperm(n, generator=gen)
    cal_idx, held_idx = perm_N[:n_cal], perm_N[n_cal : n_cal + HELD_OUT_TOKENS]
    pre_CF = clean.Xc_Nd[cal_idx] @ D_Fd.T
    k_F = torch.clamp((p_F * n_cal).round().long(), 1, n_cal - 1)
    top_KF = torch.topk(pre_CF, int(k_F.max()) + 1, dim=0).values
    threshold_F = top_KF.gather(0, k_F[None, :]).squeeze(0).clamp_min(1e-3).float()
    del pre_CF, top_KF

    cfg = JumpReLUSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=False,
        reshape_activations=sites.site(layer_type).reshape,
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

