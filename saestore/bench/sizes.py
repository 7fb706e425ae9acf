"""Section 1: bytes per nonzero of one (author, layer type, layer) worth of activations.

Every format stores the same :class:`~saestore.bench.workloads.ActSlice`; each row splits its
bytes into *activations* (what holds the SAE values and their positions) and *metadata* (tokens,
token ids, texts, document ids, per-token CE and entropy, valid mask):

* saestore sparse (float32 / bfloat16 / float16 values) and dense: a one-author run written with
  :class:`saestore.writer.RunWriter`; activations = the SAE variable's chunk files, metadata = the
  chunk files of the per-token and per-document variables and the progress markers (in a real
  run they are stored once per author, shared by all its SAEs; here all of it is charged to the
  one slice), *run overhead* = the zarr.json files and coordinate arrays (fixed per run, reported
  separately: ~70 KB, of which the int64 ``feature`` coordinate is ~32 KB);
* the seed's sparse pair (``.sparse.npz`` CSR + metadata file) and its dense ``.npz``
  (``np.savez_compressed``) with the same metadata file;
* a delphi-style cache: 5 feature-range files of uint16 ``locations`` + float16 ``activations``
  (+ ``tokens`` in every file, delphi's default, counted as metadata).

*Index bytes* are what the positions cost: the format re-encoded with every value set to 1.0
(the values then compress to almost nothing), next to the information bound
``Σ_tokens log2 C(F, k_token) / 8`` bytes, which any code needs if each token's active set were
a uniform k-subset of the F features.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench import seed
from saestore.bench.baselines import (
    seed_csr,
    write_delphi,
    write_seed_dense,
    write_seed_sparse,
)
from saestore.bench.workloads import ActSlice, read_slice, write_slice
from saestore.errors import BenchError

__all__ = ["measure_sizes", "store_bytes", "compare_whole_run", "write_seed_for_run"]


def _log2_binomial_sum(n_features: int, k: np.ndarray) -> float:
    from saestore.bench.synthetic import _log2_binomial

    return float(_log2_binomial(n_features, k).sum())


def _saestore_index_bytes(sl: ActSlice) -> int:
    """The sparse chain's bytes with every value 1.0: counts + deltas (values compress to ~0)."""
    from numcodecs import Zstd

    from saestore import sparse_coo
    from saestore.writer import SPARSE_ZSTD_LEVEL

    zstd = Zstd(level=SPARSE_ZSTD_LEVEL)
    total = 0
    for data in sl.chunks:
        a = data.acts[sl.key]
        if a.nnz == 0:
            continue
        raw = sparse_coo.encode_rows(sl.chunk_docs * sl.n_tok, sl.n_features, np.asarray(a.doc) * sl.n_tok + a.tok,
                                     a.feature, np.ones(a.nnz, np.float32))
        total += len(zstd.encode(raw)) + 4  # + crc32c
    return total


def _seed_index_bytes(sl: ActSlice, folder: Path) -> int:
    import scipy.sparse

    csr = seed_csr(sl, values=np.ones(sl.nnz, np.float32))
    path = folder / "index_only.npz"
    scipy.sparse.save_npz(path, csr, compressed=True)
    return path.stat().st_size


def _row(name: str, acts: int, meta: int, nnz: int, index: int | None = None, overhead: int = 0,
         **extra: Any) -> dict[str, Any]:
    return {"format": name, "acts_bytes": int(acts), "meta_bytes": int(meta), "total_bytes": int(acts + meta),
            "run_overhead_bytes": int(overhead), "acts_B_per_nnz": acts / nnz, "total_B_per_nnz": (acts + meta) / nnz,
            "index_B_per_nnz": None if index is None else index / nnz, **extra}


def store_bytes(path: Path, layer_types: tuple[str, ...]) -> dict[str, int]:
    """A saestore run's file bytes split into SAE chunk files (``acts``), chunk files of the per-token
    and per-document variables and progress markers (``meta``: they grow with the authors and
    documents) and everything else (``overhead``: zarr.json files and coordinates, fixed per run)."""
    from saestore import protocol

    per_author = {v.name for v in protocol.VARIABLES} | {protocol.PROGRESS_PATH.split("/")[0]}
    out = {"acts": 0, "meta": 0, "overhead": 0}
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(path).parts
        is_chunk = "c" in rel[1:]
        if rel[0] in layer_types and is_chunk:
            out["acts"] += f.stat().st_size
        elif rel[0] in per_author and is_chunk:
            out["meta"] += f.stat().st_size
        else:
            out["overhead"] += f.stat().st_size
    return out


def measure_sizes(sl: ActSlice, work_dir: Path, *, include_dense: bool = True) -> dict[str, Any]:
    """Write ``sl`` in every format under ``work_dir`` and return rows, ratios and the bound."""
    work_dir.mkdir(parents=True, exist_ok=True)
    nnz = sl.nnz
    if nnz == 0:
        raise BenchError("the slice has no nonzero activation")
    k = sl.active_per_token()
    n_valid = sl.n_valid
    bound_bytes = _log2_binomial_sum(sl.n_features, k) / 8
    rows: list[dict[str, Any]] = []

    index_saestore = _saestore_index_bytes(sl)
    variants = [("sparse", "float32"), ("sparse", "bfloat16"), ("sparse", "float16")]
    if include_dense:
        variants.append(("dense", "float32"))
    for fmt, vd in variants:
        path = write_slice(sl, work_dir / f"saestore-{fmt}-{vd}.zarr", fmt, vd)
        b = store_bytes(path, (sl.layer_type,))
        rows.append(_row(f"saestore {fmt} {vd}", b["acts"], b["meta"], nnz, index_saestore if fmt == "sparse" else None,
                         overhead=b["overhead"], key=f"saestore_{fmt}_{vd}"))
        shutil.rmtree(path)

    seed_dir = work_dir / "seed"
    stem = seed.seed_stem(seed_dir, sl.author, sl.layer_type, sl.layer)
    sp = write_seed_sparse(sl, stem)
    rows.append(_row("seed sparse (.sparse.npz + metadata)", sp["acts"], sp["meta"], nnz,
                     _seed_index_bytes(sl, seed_dir), key="seed_sparse"))
    if include_dense:
        dn = write_seed_dense(sl, stem)
        rows.append(_row("seed dense (.npz savez_compressed + metadata)", dn["acts"], dn["meta"], nnz,
                         key="seed_dense"))
    delphi_acts = write_delphi(sl, work_dir / "delphi-acts", save_tokens=False)
    delphi_total = write_delphi(sl, work_dir / "delphi", save_tokens=True)
    rows.append(_row("delphi-style (uint16 locations + f16 values, safetensors)", delphi_acts,
                     delphi_total - delphi_acts, nnz, 6 * nnz, key="delphi"))
    rows.append({"format": "information bound of the index (Σ log2 C(F, k) per token)", "key": "bound",
                 "acts_bytes": round(bound_bytes), "meta_bytes": 0, "total_bytes": round(bound_bytes),
                 "run_overhead_bytes": 0,
                 "acts_B_per_nnz": None, "total_B_per_nnz": None, "index_B_per_nnz": bound_bytes / nnz})
    shutil.rmtree(seed_dir, ignore_errors=True)
    shutil.rmtree(work_dir / "delphi-acts", ignore_errors=True)
    shutil.rmtree(work_dir / "delphi", ignore_errors=True)

    by = {r["key"]: r for r in rows}
    ratios: dict[str, float] = {}
    for vd, short in (("float32", "f32"), ("bfloat16", "bf16"), ("float16", "f16")):
        s = by[f"saestore_sparse_{vd}"]
        ratios[f"{short}_total_vs_seed_sparse_total"] = s["total_bytes"] / by["seed_sparse"]["total_bytes"]
        ratios[f"{short}_acts_vs_seed_sparse_acts"] = s["acts_bytes"] / by["seed_sparse"]["acts_bytes"]
        ratios[f"{short}_acts_vs_delphi_acts"] = s["acts_bytes"] / by["delphi"]["acts_bytes"]
        ratios[f"{short}_total_vs_delphi_total"] = s["total_bytes"] / by["delphi"]["total_bytes"]
        if include_dense:
            ratios[f"{short}_acts_vs_seed_dense_acts"] = s["acts_bytes"] / by["seed_dense"]["acts_bytes"]
            ratios[f"{short}_total_vs_seed_dense_total"] = s["total_bytes"] / by["seed_dense"]["total_bytes"]
    if include_dense:
        ratios["saestore_dense_acts_vs_seed_dense_acts"] = (by["saestore_dense_float32"]["acts_bytes"]
                                                            / by["seed_dense"]["acts_bytes"])
    ratios["saestore_index_vs_bound"] = index_saestore / bound_bytes
    workload = {"author": sl.author, "layer_type": sl.layer_type, "layer": sl.layer,
                "shape": [sl.n_docs, sl.n_tok, sl.n_features], "nnz": nnz, "n_valid_tokens": n_valid,
                "padding": 1 - n_valid / (sl.n_docs * sl.n_tok), "mean_l0": nnz / max(n_valid, 1),
                "chunk_docs": sl.chunk_docs}
    return {"workload": workload, "rows": rows, "ratios": ratios}


def write_seed_for_run(run_path: Path, seed_root: Path) -> None:
    """The seed's sparse files for every (author, layer type, layer) of a stored run."""
    import zarr

    from saestore.writer import read_layout

    layout = read_layout(zarr.open_group(str(run_path), mode="r"))
    for a, author in enumerate(layout.authors):
        for lt in layout.layer_types:
            for layer in layout.layers:
                sl = read_slice(run_path, a, lt, layer)
                write_seed_sparse(sl, seed.seed_stem(seed_root, author, lt, layer))


def compare_whole_run(run_path: Path, seed_root: Path) -> dict[str, Any]:
    """A whole saestore run (every author and SAE, all its files) against the seed's files for it."""
    import zarr

    from saestore.writer import read_layout

    layout = read_layout(zarr.open_group(str(run_path), mode="r"))
    ours = store_bytes(run_path, layout.layer_types)
    seed_acts = sum(p.stat().st_size for p in seed_root.rglob("*" + seed.SPARSE_SUFFIX))
    seed_meta = sum(p.stat().st_size for p in seed_root.rglob("*" + seed.META_SUFFIX))
    ours_total = ours["acts"] + ours["meta"] + ours["overhead"]
    return {"authors": len(layout.authors), "layer_types": list(layout.layer_types), "layers": list(layout.layers),
            "value_dtype": layout.storage.value_dtype, "saestore": {**ours, "total": ours_total},
            "seed": {"acts": seed_acts, "meta": seed_meta, "total": seed_acts + seed_meta},
            "ratios": {"run_total_vs_seed_run_total": ours_total / (seed_acts + seed_meta),
                       "run_acts_vs_seed_run_acts": ours["acts"] / seed_acts,
                       "run_meta_and_overhead_vs_seed_run_meta": (ours["meta"] + ours["overhead"]) / seed_meta}}
