"""Section 2: write throughput and peak memory, saestore's writer vs the seed's save path.

Both run in their own process over the same synthetic workload, generated chunk by chunk
(generation is never timed):

* **saestore**: ``create_run``, then ``RunWriter.write_chunk`` with :class:`SparseActs` for every
  doc-chunk as it is produced (SAE payloads, per-token and per-document variables, progress
  marker), then ``finalize_run``. Only nonzeros are ever held.
* **seed**: per author, every batch's *dense* activations are kept in RAM as torch tensors (what
  the seed does during extraction); after the author, for each (layer type, layer): ``torch.cat``,
  CSR conversion, ``save_npz`` and the metadata file (the timed "save path").

Throughput is nonzeros / timed seconds; peak RSS is each process's ``VmHWM``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.child import rss_mb
from saestore.bench.workloads import SyntheticWorkload, synthetic_attrs

__all__ = ["child_write_saestore", "child_write_seed"]


def child_write_saestore(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the workload with saestore's sparse writer; time create, every write_chunk, finalize."""
    from saestore.writer import RunWriter, create_run, finalize_run

    wl = SyntheticWorkload.from_json(spec["workload"])
    path = str(spec["path"])
    layout = wl.layout("sparse", spec.get("value_dtype", "float32"))
    base = rss_mb()
    t0 = time.perf_counter()
    create_run(path, layout, synthetic_attrs(layout), mode="overwrite")
    writer = RunWriter(path)
    create_s = time.perf_counter() - t0
    write_s, nnz, n_chunks = 0.0, 0, 0
    for a, c, data in wl.chunks():
        t = time.perf_counter()
        writer.write_chunk(a, c, data)
        write_s += time.perf_counter() - t
        nnz += sum(x.nnz for x in data.acts.values())
        n_chunks += 1
    t = time.perf_counter()
    finalize_run(path)
    finalize_s = time.perf_counter() - t
    return {"nnz": nnz, "n_chunks": n_chunks, "write_s": write_s, "create_s": create_s, "finalize_s": finalize_s,
            "nnz_per_s": nnz / write_s, "nnz_per_s_with_create_finalize": nnz / (write_s + create_s + finalize_s),
            "base_rss_mb": base}


def child_write_seed(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed's path on the workload: dense torch batches held per author, then CSR + save."""
    import scipy.sparse  # noqa: F401  (imported before the baseline RSS and the clock, as the seed's script does)
    import torch

    from saestore.bench import seed

    wl = SyntheticWorkload.from_json(spec["workload"])
    root = Path(spec["path"])
    base = rss_mb()
    keys = [(lt, layer) for lt in wl.layer_types for layer in wl.layers]
    save_s, nnz, held_peak = 0.0, 0, 0

    def flush(author_idx: int, batches: dict, per_tok: dict) -> float:
        t = time.perf_counter()
        valid = np.concatenate(per_tok["valid"])
        tokens = np.concatenate(per_tok["token"])
        for lt, layer in keys:
            meta = seed.make_meta(
                author=wl.authors[author_idx], layer_type=lt, layer=layer,
                shape=(valid.shape[0], wl.n_tok, wl.n_features), texts=per_tok["text"],
                doc_ids=np.concatenate(per_tok["doc_id"]), token_ids_DT=np.concatenate(per_tok["token_id"]),
                tokens=[list(row[m]) for row, m in zip(tokens, valid, strict=True)],
                ce_loss_DT=np.concatenate(per_tok["ce"]), entropy_DT=np.concatenate(per_tok["entropy"]),
                mask_DT=valid)
            seed.save_from_torch(batches[(lt, layer)], meta, seed.seed_stem(root, wl.authors[author_idx], lt, layer))
            batches[(lt, layer)] = []  # the seed frees an author's activations once saved
        return time.perf_counter() - t

    current, batches, per_tok = None, {}, {}
    for a, _, data in wl.chunks():
        if a != current:
            if current is not None:
                save_s += flush(current, batches, per_tok)
            current = a
            batches = {k: [] for k in keys}
            per_tok = {"valid": [], "token": [], "token_id": [], "ce": [], "entropy": [], "doc_id": [], "text": []}
        for key in keys:
            acts = data.acts[key]
            batches[key].append(torch.from_numpy(acts.to_dense()))
            nnz += acts.nnz
        per_tok["valid"].append(data.valid_DT)
        per_tok["token"].append(data.token_DT)
        per_tok["token_id"].append(data.token_id_DT)
        per_tok["ce"].append(data.ce_loss_DT)
        per_tok["entropy"].append(data.entropy_DT)
        per_tok["doc_id"].append(data.doc_id_D)
        per_tok["text"] += list(data.text_D)
        held_peak = max(held_peak, sum(t.numel() * 4 for b in batches.values() for t in b))
    if current is not None:
        save_s += flush(current, batches, per_tok)
    return {"nnz": nnz, "save_s": save_s, "nnz_per_s": nnz / save_s, "base_rss_mb": base,
            "dense_held_mb": held_peak / 2**20}
