"""``python -m saestore info RUN``: what a run holds, in one screen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import numpy as np

from saestore import protocol
from saestore.location import is_url
from saestore.reader import open_run
from saestore.writer import read_progress


def run_info(path: str | Path) -> dict[str, Any]:
    """Summary of a run: authors, documents, tokens, SAEs with nonzeros and mean L0, bytes, status."""
    path = str(path)
    ds = open_run(path)
    attrs = protocol.read_attrs(ds.attrs, where=path)
    valid = ds["valid_mask"]
    n_tokens_by_author = valid.sum(("doc", "tok")).values.astype(int)
    n_tokens = int(n_tokens_by_author.sum())
    progress = read_progress(path)
    saes = []
    lazy = {}
    for lt in attrs.saes:
        if lt in ds:
            lazy[lt] = (ds[lt].data != 0).sum(axis=(0, 2, 3, 4), dtype="i8")
    (computed,) = dask.compute(lazy) if lazy else ({},)
    for lt, counts in computed.items():
        counts = np.asarray(counts.todense() if hasattr(counts, "todense") else counts)
        for li, layer in enumerate(ds["layer"].values):
            info = attrs.saes[lt].get(str(int(layer)))
            nnz = int(counts[li])
            saes.append({"layer_type": lt, "layer": int(layer), "width": info.width if info else None,
                         "sae": (info.sae_id or info.path) if info else None, "nonzeros": nnz,
                         "mean_l0": nnz / n_tokens if n_tokens else float("nan"),
                         "expected_l0": info.expected_l0 if info else None})
    local = not is_url(path)
    return {
        "path": path,
        "protocol_version": attrs.protocol_version,
        "status": attrs.status,
        "model": attrs.model,
        "setting": attrs.setting,
        "storage": f"{attrs.storage.format} ({attrs.storage.value_dtype} values, {attrs.storage.chunk_docs} docs/chunk)",
        "authors": {str(a): {"docs": int(n), "tokens": int(t)} for a, n, t in
                    zip(ds["author"].values, ds["n_docs"].values, n_tokens_by_author, strict=True)},
        "documents": int(ds["n_docs"].values.sum()),
        "tokens": n_tokens,
        "n_tok": int(ds.sizes["tok"]),
        "features": int(ds.sizes["feature"]),
        "layers": [int(x) for x in ds["layer"].values],
        "saes": saes,
        "nonzeros": sum(s["nonzeros"] for s in saes),
        "chunks_done": f"{int((progress[..., 0] == 1).sum())} doc-chunks marked done",
        "bytes_on_disk": sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if local else None,
        "failed_authors": attrs.failed_authors,
    }


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"run            {info['path']}",
        f"status         {info['status']}   protocol {info['protocol_version']}",
        f"model          {info['model']}   setting {info['setting']}",
        f"storage        {info['storage']}",
        f"documents      {info['documents']:,} from {len(info['authors'])} authors, {info['tokens']:,} valid tokens "
        f"(up to {info['n_tok']} per document)",
        f"features       {info['features']:,} per SAE; layers {info['layers']}",
        f"nonzeros       {info['nonzeros']:,}",
    ]
    if info["bytes_on_disk"] is not None:
        per = info["bytes_on_disk"] / max(info["nonzeros"], 1)
        lines.append(f"bytes on disk  {info['bytes_on_disk']:,} ({per:.2f} per nonzero, everything included)")
    lines.append(f"progress       {info['chunks_done']}")
    lines.append("SAEs:")
    for s in info["saes"]:
        exp = f" (expected {s['expected_l0']:.1f})" if s["expected_l0"] else ""
        lines.append(f"  {s['layer_type']:>3} layer {s['layer']:>3}  width {s['width']}  mean L0 {s['mean_l0']:.1f}{exp}"
                     f"  nonzeros {s['nonzeros']:,}  [{s['sae']}]")
    lines.append("authors:")
    for a, v in info["authors"].items():
        lines.append(f"  {a!r}: {v['docs']} docs, {v['tokens']:,} tokens")
    if info["failed_authors"]:
        lines.append(f"FAILED authors: {', '.join(info['failed_authors'])}")
    return "\n".join(lines)
