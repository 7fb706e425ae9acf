"""SAE quality at extraction time (PROTOCOL.md §2.6).

Per token, from the SAE's own hooks ``hook_sae_input`` (x) and ``hook_sae_recons`` (x̂), heads
flattened for attention SAEs: ``sq_error = ‖x − x̂‖²``, ``sq_norm = ‖x‖²``, ``sq_centered =
‖x − x̄_doc‖²`` (x̄_doc: mean over the document's valid tokens) and ``cos = cos(x, x̂)``. Sums of
these aggregate over any selection: ``FVU = Σ sq_error / Σ sq_centered`` (variance within documents
left unexplained), ``normalized MSE = Σ sq_error / Σ sq_norm``.

With ``--loss_recovered``, per document, the mean CE over its stored tokens of the clean model, of
the model with one SAE spliced alone (no error term), and with that site zero-ablated;
``loss_recovered = (ce_zero − ce_spliced) / (ce_zero − ce_clean)`` (:func:`saestore.stats.loss_recovered`).

With ``--logit_k K``, per SAE, once: each feature's logit effects (:func:`logit_effects`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from saestore.extract.metrics import token_metrics


def recon_metrics(x_BTD: torch.Tensor, xhat_BTD: torch.Tensor, valid_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sq_error``, ``sq_norm``, ``sq_centered``, ``cos``: each (B, T) float32, NaN at padding."""
    x = x_BTD.flatten(2).float()
    xhat = xhat_BTD.flatten(2).float()
    mask = valid_BT[..., None].float()
    mean = (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    out = {
        "sq_error": (x - xhat).pow(2).sum(-1),
        "sq_norm": x.pow(2).sum(-1),
        "sq_centered": (x - mean).pow(2).sum(-1),
        "cos": torch.nn.functional.cosine_similarity(x, xhat, dim=-1, eps=1e-12),
    }
    nan = torch.tensor(float("nan"), device=x.device)
    return {k: torch.where(valid_BT, v, nan) for k, v in out.items()}


def _doc_mean_ce(logits_BPV: torch.Tensor, input_ids_BP: torch.Tensor, p_len: int, width: int,
                 valid_BT: torch.Tensor) -> torch.Tensor:
    ce, _ = token_metrics(logits_BPV, input_ids_BP, p_len, width)
    ce = torch.where(valid_BT, ce, torch.zeros_like(ce))
    return ce.sum(1) / valid_BT.sum(1).clamp(min=1)


@torch.inference_mode()
def loss_recovered_ce(model: Any, saes: Sequence[Any], hook_names: Sequence[str], input_ids_BP: torch.Tensor,
                      mask_BP: torch.Tensor, p_len: int, width: int, valid_BT: torch.Tensor
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per-document mean CE: clean (B,), and for every SAE (spliced alone, its site zero-ablated)."""
    clean = _doc_mean_ce(model(input_ids_BP, attention_mask=mask_BP), input_ids_BP, p_len, width, valid_BT)

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(act)

    per_sae = []
    for sae, hook_name in zip(saes, hook_names, strict=True):
        spliced = model.run_with_saes(input_ids_BP, saes=[sae], attention_mask=mask_BP, use_error_term=False)
        ablated = model.run_with_hooks(input_ids_BP, attention_mask=mask_BP, fwd_hooks=[(hook_name, zero)])
        per_sae.append((_doc_mean_ce(spliced, input_ids_BP, p_len, width, valid_BT),
                        _doc_mean_ce(ablated, input_ids_BP, p_len, width, valid_BT)))
    return clean, per_sae


@torch.inference_mode()
def logit_effects(model: Any, sae: Any, layer_type: str, layer: int, k: int,
                  chunk_features: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's top and bottom ``k`` output tokens of its decoder direction through the
    unembedding (PROTOCOL.md §2.7): ``W_dec @ W_U`` (an attention SAE's direction, in ``hook_z``
    space, goes through the layer's ``W_O`` first), computed on the model's device in chunks of
    ``chunk_features`` features. Returns ``(token_id, value)``, each ``(n_features, 2k)`` in the
    ``logit_rank`` order: the ``k`` largest (descending), then the ``k`` smallest (ascending)."""
    from saestore.extract import hooks

    W_U = model.W_U
    W_O = None
    if hooks.site(layer_type).reshape == "hook_z":
        W_O = model.blocks[layer].attn.W_O
        W_O = W_O.reshape(-1, W_O.shape[-1])
    ids, values = [], []
    W_dec = sae.W_dec
    for f0 in range(0, int(W_dec.shape[0]), chunk_features):
        d = W_dec[f0 : f0 + chunk_features].to(W_U.device, W_U.dtype)
        if W_O is not None:
            d = d @ W_O
        logits = (d @ W_U).float()
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        ids.append(torch.cat([top.indices, bottom.indices], dim=1).to(torch.int32).cpu())
        values.append(torch.cat([top.values, bottom.values], dim=1).cpu())
    return torch.cat(ids).numpy(), torch.cat(values).numpy()
