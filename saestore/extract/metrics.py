"""Per-token CE loss and entropy, aligned with stored tokens exactly as PROTOCOL.md §2.4 says."""

from __future__ import annotations

import torch


def token_metrics(logits_BPV: torch.Tensor, input_ids_BP: torch.Tensor, prompt_len: int,
                  n_tok: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CE loss and entropy (nats, float32) at stored positions ``j = 0 … n_tok-1``.

    With ``k = prompt_len + j``: ``ce[j] = -log softmax(logits[k-1])[x_k]`` and
    ``entropy[j] = H(softmax(logits[k]))``. Returns two (B, n_tok) tensors; positions beyond the
    input are filled with NaN (the caller masks padding too). Computed one document at a time, so the
    float32 log-softmax never holds more than one document's (P, V) block.
    """
    B, P, _ = logits_BPV.shape
    ce = torch.full((B, n_tok), float("nan"), dtype=torch.float32, device=logits_BPV.device)
    ent = torch.full_like(ce, float("nan"))
    stop = min(P, prompt_len + n_tok)
    width = stop - prompt_len
    if width <= 0:
        return ce, ent
    for b in range(B):
        lsm = torch.log_softmax(logits_BPV[b, prompt_len - 1 : stop].float(), dim=-1)  # positions k-1 … stop-1
        target = input_ids_BP[b, prompt_len:stop]
        ce[b, :width] = -lsm[:-1].gather(-1, target[:, None]).squeeze(-1)
        probs = lsm[1:].exp()
        ent[b, :width] = -(probs * lsm[1:]).sum(-1)
    return ce, ent
