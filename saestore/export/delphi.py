"""A run as EleutherAI delphi's latent cache (``delphi/latents/cache.py``: ``save_splits``,
``save_config``; read by ``delphi.latents.loader.LatentDataset``)::

    OUT/latents/{hookpoint}/{start}_{end}.safetensors   # latents start … end (inclusive)
    OUT/latents/{hookpoint}/config.json                 # delphi's CacheConfig fields + model_name
    OUT/sequences.json                                  # sequence i → author, doc, doc_id (saestore's)

Each split holds ``locations`` int64 ``[N, 3]`` (sequence, position, latent − start; sorted),
``activations`` float16 ``[N]`` and ``tokens`` int64 ``[n_seq, n_tok]``, as delphi's writer does
(delphi narrows ``locations`` to uint16/uint32 when the values fit; its loader takes int64 too, and
saestore keeps one dtype). A sequence is one document (author by author, then by document), its
positions the run's ``tok`` (the first token after BOS, or after the prompt); padding tokens are
``pad_token_id``. Latent ranges follow delphi's ``linspace(0, width, n_splits + 1)``, with at least
enough splits for 65,536 latents per split. Memory: one split's nonzeros and one chunk at a time.
delphi's ``log/hookpoint_firing_counts.pt`` is a torch pickle, which saestore never writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saestore.errors import StatsError
from saestore.protocol import ATTRS_KEY

__all__ = ["export_delphi", "split_bounds", "hookpoint", "MAX_SPLIT_LATENTS", "HOOKPOINTS"]

MAX_SPLIT_LATENTS = 65_536

#: layer type → delphi hookpoint (a Hugging Face module path) of the TransformerLens hook it reads;
#: Gemma 2's ``hook_mlp_out`` is the output of its post-feed-forward layer norm
HOOKPOINTS: dict[str, str] = {"res": "layers.{layer}", "mlp": "layers.{layer}.mlp", "att": "layers.{layer}.self_attn"}
GEMMA2_HOOKPOINTS: dict[str, str] = {**HOOKPOINTS, "mlp": "layers.{layer}.post_feedforward_layernorm"}


def hookpoint(layer_type: str, layer: int, model: str = "") -> str:
    """delphi's hookpoint for the ``layer_type`` SAE at ``layer`` of ``model``."""
    table = GEMMA2_HOOKPOINTS if "gemma-2" in model.lower() else HOOKPOINTS
    return table[layer_type].format(layer=int(layer))


def split_bounds(width: int, n_splits: int) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` latent ranges: delphi's ``linspace(0, width, n + 1)`` with ``n`` the
    larger of ``n_splits`` and the splits needed for at most 65,536 latents each."""
    if n_splits < 1:
        raise StatsError(f"--n_splits must be >= 1, got {n_splits}")
    n = min(max(n_splits, math.ceil(width / MAX_SPLIT_LATENTS)), width)
    edges = np.linspace(0, width, n + 1).astype(np.int64)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def export_delphi(run: str, out: str | Path, *, layer_type: list[str] | None = None, layer: list[int] | None = None,
                  n_splits: int = 5, model_name: str | None = None, pad_token_id: int = 0,
                  show_progress: bool | None = None) -> list[Path]:
    """Write the SAEs of ``run`` (all, or the ``layer_type`` × ``layer`` ones) into ``out`` in
    delphi's latent-cache layout; returns the hookpoint folders."""
    from safetensors.numpy import save_file

    from saestore.reader import open_run
    from saestore.stats import kernels
    from saestore.stats._select import make_selection, sae_array, token_array

    out = Path(out)
    if not out.parent.expanduser().resolve().is_dir():
        raise StatsError(f"cannot write {out}: the folder {out.parent} does not exist; create it or choose another OUT")
    ds = open_run(run)
    sel = make_selection(ds, layer_type, layer=layer)
    attrs = ds.attrs.get(ATTRS_KEY, {})
    model = model_name or str(attrs.get("model", ""))
    n_docs = np.asarray(ds["n_docs"].values, dtype=np.int64)[sel.author_idx]
    seq_start = np.concatenate([[0], np.cumsum(n_docs)])
    n_tok = ds.sizes["tok"]
    tok_ids = []
    sequences = []
    for i, a in enumerate(sel.author_idx):
        ids = np.asarray(ds["token_id"].isel(author=int(a), doc=slice(0, int(n_docs[i]))).values, dtype=np.int64)
        tok_ids.append(np.where(ids < 0, pad_token_id, ids))
        doc_id = np.asarray(ds["doc_id"].isel(author=int(a), doc=slice(0, int(n_docs[i]))).values)
        sequences += [{"author": str(sel.authors[i]), "doc": d, "doc_id": int(doc_id[d])} for d in range(int(n_docs[i]))]
    tokens = np.concatenate(tok_ids) if tok_ids else np.zeros((0, n_tok), np.int64)
    width = sel.n_features
    splits = split_bounds(width, n_splits)
    folders = []
    jobs = [(lt, L) for lt in sel.layer_types for L in sel.layers]
    bar = tqdm(total=len(jobs) * len(splits), desc="delphi splits", unit="split",
               disable=None if show_progress is None else not show_progress)
    for lt, L in jobs:
        folder = out / "latents" / hookpoint(lt, int(L), model)
        folder.mkdir(parents=True, exist_ok=True)
        one = make_selection(ds, lt, author=[str(a) for a in sel.authors], layer=[int(L)])
        acts = sae_array(ds, one, lt)
        valid = token_array(ds, one, "valid_mask", acts)
        doc_starts = np.concatenate([[0], np.cumsum(acts.chunks[2])])
        for start, end in splits:
            locs, vals = [], []
            for a in range(acts.numblocks[0]):
                for c in range(acts.numblocks[2]):
                    d0 = int(doc_starts[c])
                    if d0 >= n_docs[a]:
                        continue
                    block = acts.blocks[a, 0, c].compute(scheduler="sync")
                    nz, _ = kernels.block_nonzeros(block, valid.blocks[a, c].compute(scheduler="sync"))
                    keep = (nz.cols >= start) & (nz.cols <= end) & (np.abs(nz.values) > 0)
                    d_local, t = np.divmod(nz.rows[keep], nz.n_tok)
                    seq = seq_start[a] + d0 + d_local
                    locs.append(np.column_stack([seq, t, nz.cols[keep] - start]).astype(np.int64))
                    vals.append(nz.values[keep])
            loc = np.concatenate(locs) if locs else np.zeros((0, 3), np.int64)
            val = np.concatenate(vals) if vals else np.zeros(0, np.float32)
            order = np.lexsort((loc[:, 2], loc[:, 1], loc[:, 0]))
            save_file({"locations": np.ascontiguousarray(loc[order]),
                       "activations": np.ascontiguousarray(val[order].astype(np.float16)),
                       "tokens": np.ascontiguousarray(tokens)}, str(folder / f"{start}_{end}.safetensors"))
            bar.update(1)
        config: dict[str, Any] = {
            "dataset_repo": "", "dataset_split": "", "dataset_name": str(attrs.get("config", {}).get("dataset_name") or ""),
            "dataset_column": "text", "batch_size": 1, "cache_ctx_len": int(n_tok), "n_tokens": int(tokens.size),
            "n_splits": len(splits), "model_name": model,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
        folders.append(folder)
    bar.close()
    (out / "sequences.json").write_text(json.dumps(sequences, ensure_ascii=False), encoding="utf-8")
    return folders
