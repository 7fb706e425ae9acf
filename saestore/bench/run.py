"""The benchmark driver: builds the shared data once, runs every section, writes the report.

Measurements that report a peak RSS run in fresh child processes (:mod:`saestore.bench.child`);
byte counts and read latencies run in this process. Every claim is a ratio of two measurements
taken side by side in the same run, because the machines this runs on are shared and noisy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.baselines import write_seed_sparse
from saestore.bench.child import run_child
from saestore.bench.report import evaluate_targets, machine_info, render_markdown
from saestore.bench.seed import seed_stem
from saestore.bench.sizes import compare_whole_run, measure_sizes, write_seed_for_run
from saestore.bench.stats_speed import compare_results
from saestore.bench.workloads import ActSlice, SyntheticWorkload, read_slice, slice_from_chunks, synthetic_attrs
from saestore.errors import BenchError

__all__ = ["BenchConfig", "FULL", "QUICK", "SECTIONS", "run_benchmarks"]

log = logging.getLogger(__name__)

SECTIONS = ("bytes", "write", "stats", "access", "extract", "pipeline", "layout", "scale")
REPORT_SCHEMA = "saestore.bench/1"


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes of every section (see :data:`FULL` and :data:`QUICK`)."""

    mode: str
    synthetic: SyntheticWorkload
    """the shared synthetic run: section 2 writes it, sections 1, 3 and 4 read it."""
    stats_growth: int = 4
    """the larger run of sections 3 and 4 has this many times the documents per author."""
    stats_layer_type: str = "res"
    n_reads: int = 15
    """one-document reads per format in section 4."""
    extract_docs: tuple[int, ...] = (6, 12, 24)
    """documents per author of the measured extractions (the demo corpus has 24)."""
    extract_layers: tuple[int, ...] = (3,)
    extract_layer_types: tuple[str, ...] = ("res",)
    extract_max_seq_len: int = 128
    extract_pinned_threads: int | None = 1
    """also extract the largest corpus with torch pinned to this many threads (None: skip)."""
    access_growth: int | None = 16
    """section 4 also reads from a run with this many times the documents per author (res only)."""
    startup_repeats: int = 3
    """section 5's start-up runs of the demo command, each way (pool, late spawn); the median is reported."""
    startup_docs: int | None = None
    """documents per author of those runs (None: the whole demo corpus)."""
    child_timeout_s: float = 900.0
    pipeline: SyntheticWorkload = SyntheticWorkload(n_authors=4, n_docs=32, n_tok=511)
    """section 6's run (batches of 8 documents: 16 simulated forward passes)."""
    layout: SyntheticWorkload = SyntheticWorkload(n_authors=40, n_docs=256, n_tok=1023, layer_types=("res",),
                                                  pad_frac=0.0)
    """section 7's run: 10.5M tokens of one 16k SAE, written unsharded (1.1) and sharded (1.2)."""
    scale_tokens: int = 10_000_000
    """section 8's run: about this many token positions (``--tokens``)."""


FULL = BenchConfig(mode="full", synthetic=SyntheticWorkload(n_authors=4, n_docs=8, n_tok=511))
QUICK = BenchConfig(mode="quick",
                    synthetic=SyntheticWorkload(n_authors=2, n_docs=4, n_tok=127, layer_types=("res", "mlp")),
                    n_reads=5, extract_docs=(1, 2), extract_pinned_threads=None, access_growth=None,
                    startup_repeats=1, startup_docs=2,
                    child_timeout_s=300.0,
                    pipeline=SyntheticWorkload(n_authors=2, n_docs=8, n_tok=127, layer_types=("res",)),
                    layout=SyntheticWorkload(n_authors=3, n_docs=40, n_tok=127, n_features=2048, l0=20,
                                             layer_types=("res",)),
                    scale_tokens=200_000)


def write_run_and_seed(wl: SyntheticWorkload, run_path: Path, seed_root: Path, layer_type: str, layer: int) -> None:
    """Untimed setup: the workload as a saestore run, and the seed's files for one (layer type, layer)
    built from the nonzeros (byte-identical to the seed's dense path, without the dense detour)."""
    from saestore.writer import RunWriter, create_run, finalize_run

    layout = wl.layout()
    create_run(str(run_path), layout, synthetic_attrs(layout), mode="overwrite")
    writer = RunWriter(str(run_path))
    pending: list[tuple[int, int, Any]] = []

    def flush() -> None:
        if pending:
            a = pending[0][0]
            sl = slice_from_chunks(iter(pending), a, wl.authors[a], layer_type, layer, wl.n_tok, wl.n_features,
                                   wl.chunk_docs)
            write_seed_sparse(sl, seed_stem(seed_root, sl.author, layer_type, layer))
            pending.clear()

    for a, c, data in wl.chunks():
        writer.write_chunk(a, c, data)
        if pending and pending[0][0] != a:
            flush()
        pending.append((a, c, data))
    flush()
    finalize_run(str(run_path))


def _section_write(cfg: BenchConfig, work: Path) -> tuple[dict[str, Any], Path, Path]:
    wl = cfg.synthetic
    run_path, seed_root = work / "runs" / "small.zarr", work / "seed" / "small"
    spec = {"workload": wl.to_json()}
    sae = run_child("write_saestore", {**spec, "path": str(run_path)}, timeout=cfg.child_timeout_s)
    seed = run_child("write_seed", {**spec, "path": str(seed_root)}, timeout=cfg.child_timeout_s)
    if sae["nnz"] != seed["nnz"]:
        raise BenchError(f"the two writers saw different data: {sae['nnz']} vs {seed['nnz']} nonzeros")
    rows = [
        {"name": "saestore RunWriter.write_chunk (SparseActs)", "nnz": sae["nnz"], "seconds": sae["write_s"],
         "nnz_per_s": sae["nnz_per_s"], "peak_rss_mb": sae["peak_rss_mb"], "base_rss_mb": sae["base_rss_mb"]},
        {"name": "saestore incl. create_run + finalize_run", "nnz": sae["nnz"],
         "seconds": sae["write_s"] + sae["create_s"] + sae["finalize_s"],
         "nnz_per_s": sae["nnz_per_s_with_create_finalize"], "peak_rss_mb": sae["peak_rss_mb"],
         "base_rss_mb": sae["base_rss_mb"]},
        {"name": "seed: dense torch in RAM → cat → CSR → save_npz + metadata", "nnz": seed["nnz"],
         "seconds": seed["save_s"], "nnz_per_s": seed["nnz_per_s"], "peak_rss_mb": seed["peak_rss_mb"],
         "base_rss_mb": seed["base_rss_mb"]},
    ]
    ratios = {"saestore_vs_seed_nnz_per_s": sae["nnz_per_s"] / seed["nnz_per_s"],
              "saestore_incl_create_finalize_vs_seed_nnz_per_s":
                  sae["nnz_per_s_with_create_finalize"] / seed["nnz_per_s"],
              "seed_over_saestore_peak_rss": seed["peak_rss_mb"] / sae["peak_rss_mb"],
              "seed_over_saestore_peak_rss_above_imports": (seed["peak_rss_mb"] - seed["base_rss_mb"])
              / max(sae["peak_rss_mb"] - sae["base_rss_mb"], 1.0)}
    desc = (f"Synthetic run: {wl.n_authors} authors × {wl.n_docs} docs × {wl.n_tok} tok, layer types "
            f"{', '.join(wl.layer_types)} at layer(s) {', '.join(map(str, wl.layers))}, {wl.n_features:,} features, "
            f"L0 {wl.l0:g}, padding {wl.pad_frac:.0%}, chunk_docs {wl.chunk_docs}. Each writer runs in its own "
            "process; generating the data is not timed. The seed holds one author's dense activations "
            f"({seed['dense_held_mb']:,.0f} MiB here) before saving them.")
    section = {"description": desc, "rows": rows, "ratios": ratios, "raw": {"saestore": sae, "seed": seed}}
    return section, run_path, seed_root


def _section_stats(cfg: BenchConfig, work: Path, sizes: list[dict[str, Any]]) -> dict[str, Any]:
    wl = cfg.synthetic
    lt, layer = cfg.stats_layer_type, wl.layers[0]
    out_sizes = []
    for size in sizes:
        rows, results = [], {}
        stems = [str(seed_stem(size["seed_root"], a, lt, layer)) for a in wl.authors]
        for mode in ("sparse", "dense", "seed"):
            out = work / f"stats-{size['label']}-{mode}.npz"
            spec = {"mode": mode, "layer_type": lt, "layer": layer, "path": str(size["run"]), "stems": stems,
                    "out": str(out)}
            rows.append(run_child("stats", spec, timeout=cfg.child_timeout_s))
            results[mode] = out
        out_sizes.append({"label": size["label"], "n_docs_per_author": size["n_docs"], "rows": rows,
                          "check": compare_results(results)})
    ratios: dict[str, float] = {}
    for s in out_sizes:
        t = {r["mode"]: r for r in s["rows"]}
        ratios[f"dense_over_sparse_time_{s['label']}"] = t["dense"]["seconds"] / t["sparse"]["seconds"]
        ratios[f"seed_over_sparse_time_{s['label']}"] = t["seed"]["seconds"] / t["sparse"]["seconds"]
    first, last = ({r["mode"]: r for r in s["rows"]} for s in (out_sizes[0], out_sizes[-1]))
    for mode in ("sparse", "dense", "seed"):
        ratios[f"{mode}_peak_rss_growth"] = last[mode]["peak_rss_mb"] / first[mode]["peak_rss_mb"]
        ratios[f"{mode}_time_growth"] = last[mode]["seconds"] / first[mode]["seconds"]
    desc = (f"Layer type {lt}, layer {layer}, {wl.n_authors} authors; runs of "
            + " and ".join(f"{s['n_docs_per_author']} docs/author ({s['label']})" for s in out_sizes)
            + ". Each path runs in a fresh process: a warm-up on part of the first doc-chunk (imports, numba "
            "compilation), then the peak-RSS counter is reset and the full computation is timed; 'RSS before' is the "
            "resident set after the warm-up, 'peak RSS' the high-water mark during the computation. Default dask "
            "scheduler (threads); the three results agree to the stated relative difference.")
    return {"description": desc, "sizes": out_sizes, "ratios": ratios, "growth": cfg.stats_growth}


def _section_access(cfg: BenchConfig, sizes: list[dict[str, Any]]) -> dict[str, Any]:
    from saestore.bench.access import __doc__ as access_doc
    from saestore.bench.access import measure_access

    out_sizes, ratios = [], {}
    for size in sizes:
        res = measure_access(size["run"], size["seed_root"], layer_type=cfg.stats_layer_type,
                             layer=cfg.synthetic.layers[0], n_reads=cfg.n_reads)
        out_sizes.append({"label": size["label"], "n_docs_per_author": size["n_docs"], "result": res})
        med = res["median_s"]
        ratios[f"seed_over_open_run_{size['label']}"] = med["seed"] / med["saestore_open_run"]
        ratios[f"seed_over_zarr_{size['label']}"] = med["seed"] / med["saestore_zarr"]
    desc = _doc_body(access_doc)
    return {"description": desc, "sizes": out_sizes, "ratios": ratios}


def _section_extract(cfg: BenchConfig, work: Path) -> tuple[dict[str, Any], str]:
    from saestore.bench.extraction import __doc__ as extract_doc
    from saestore.bench.extraction import demo_argv, extract_argv

    prep = run_child("prepare_tiny", {}, timeout=cfg.child_timeout_s)
    runs = []
    for n in cfg.extract_docs:
        argv = extract_argv(n_docs_per_author=n, output_dir=str(work / "extract"), run_name=f"docs{n}",
                            layers=cfg.extract_layers, layer_types=cfg.extract_layer_types,
                            max_seq_len=cfg.extract_max_seq_len)
        res = run_child("extract", {"argv": argv}, timeout=cfg.child_timeout_s)
        res["n_docs_per_author"] = n
        runs.append(res)
    scaling = list(runs)
    if cfg.extract_pinned_threads:
        n = cfg.extract_docs[-1]
        argv = extract_argv(n_docs_per_author=n, output_dir=str(work / "extract"), run_name=f"docs{n}-pinned",
                            layers=cfg.extract_layers, layer_types=cfg.extract_layer_types,
                            max_seq_len=cfg.extract_max_seq_len)
        res = run_child("extract", {"argv": argv, "torch_threads": cfg.extract_pinned_threads},
                        timeout=cfg.child_timeout_s)
        res["n_docs_per_author"] = n
        runs.append(res)
    n = cfg.extract_docs[-1]
    argv = extract_argv(n_docs_per_author=n, output_dir=str(work / "extract"), run_name=f"docs{n}-inline",
                        layers=cfg.extract_layers, layer_types=cfg.extract_layer_types,
                        max_seq_len=cfg.extract_max_seq_len)
    inline = run_child("extract", {"argv": argv, "write_ahead": 0}, timeout=cfg.child_timeout_s)
    inline["n_docs_per_author"] = n
    runs.append(inline)
    ratios = {f"peak_rss_{r['n_docs_per_author']}_over_{scaling[0]['n_docs_per_author']}_docs":
              r["peak_rss_mb"] / scaling[0]["peak_rss_mb"] for r in scaling[1:]}
    largest = [r for r in runs if r["n_docs_per_author"] == cfg.extract_docs[-1] and r["write_ahead"] > 0]
    ratios["inline_loop_over_pipelined_loop_largest"] = inline["loop_s"] / largest[0]["loop_s"]
    ratios["storing_frac_of_loop_largest"] = max(r["storing_frac_of_loop"] for r in largest)
    ratios["storing_frac_of_wall_largest"] = max(r["storing_frac_of_wall"] for r in largest)
    if len(largest) > 1:
        ratios["forward_default_over_pinned_threads"] = largest[0]["run_batch_s"] / largest[-1]["run_batch_s"]
    startup = []
    for _ in range(cfg.startup_repeats):
        for late in (False, True):
            argv = demo_argv(output_dir=str(work / "startup"), run_name="late" if late else "pool",
                             n_docs_per_author=cfg.startup_docs)
            startup.append(run_child("startup", {"argv": argv, "late": late}, timeout=cfg.child_timeout_s))
    median = {(late, key): statistics.median(r[key] for r in startup if r["late"] == late)
              for late in (False, True) for key in ("first_batch_s", "wall_s", "extract_s")}
    ratios["startup_first_batch_late_over_pool"] = median[True, "first_batch_s"] / median[False, "first_batch_s"]
    ratios["startup_wall_late_over_pool"] = median[True, "wall_s"] / median[False, "wall_s"]
    startup_rows = [{"workers": "spawned once the store exists (before)" if late else "started before planning",
                     **{key: median[late, key] for key in ("first_batch_s", "wall_s", "extract_s")},
                     "runs": sum(r["late"] == late for r in startup)} for late in (False, True)]
    head = _doc_body(extract_doc)
    desc = (f"Tiny model, {', '.join(cfg.extract_layer_types)} SAE(s) of width 16,384 at layer(s) "
            f"{', '.join(map(str, cfg.extract_layers))}, max_seq_len {cfg.extract_max_seq_len}, one CPU worker, "
            f"batch 8, chunk_docs 4, 5 authors (the demo corpus). The tiny bundle was ready in {prep['seconds']:.1f} s "
            f"before the first measured run.\n\n{head}")
    return ({"description": desc, "runs": runs, "ratios": ratios, "prepare": prep, "startup": startup_rows},
            scaling[-1]["path"])


@contextmanager
def _timed(timings: dict[str, float], key: str, message: str, *args: Any) -> Iterator[None]:
    """Log ``message`` and record the block's wall time as ``timings[key]``."""
    log.info(message, *args)
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - t


def _section_pipeline(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    from saestore.bench.pipeline import __doc__ as pipeline_doc
    from saestore.bench.pipeline import measure_overlap

    folder = work / "pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    res = measure_overlap(cfg.pipeline, folder)
    res["description"] = f"{res['description']}\n\n{_doc_body(pipeline_doc)}"
    return res


def _section_layout(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    from saestore.bench.layout import __doc__ as layout_doc
    from saestore.bench.layout import measure_layout

    res = measure_layout(cfg.layout, work, n_reads=cfg.n_reads)
    res["description"] = _doc_body(layout_doc)
    return res


def _doc_body(doc: str | None) -> str:
    """A module docstring without its title line, as markdown (bullets kept on their own lines)."""
    paragraphs = []
    for para in (doc or "").strip().split("\n\n")[1:]:
        items: list[str] = []
        for line in para.splitlines():
            line = line.strip()
            if line.startswith("* ") or not items:
                items.append(line)
            else:
                items[-1] += " " + line
        paragraphs.append("\n".join(items))
    return "\n\n".join(paragraphs)


def _finite_ratios(obj: Any, where: str = "") -> list[str]:
    """Paths of ratio values that are not finite numbers (the report must have none)."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "ratios" and isinstance(v, dict):
                bad += [f"{where}.{k}.{n}" for n, x in v.items() if not (isinstance(x, float) and math.isfinite(x))]
            else:
                bad += _finite_ratios(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_ratios(v, f"{where}[{i}]")
    return bad


def run_benchmarks(cfg: BenchConfig, out_dir: Path, *, sections: tuple[str, ...] = SECTIONS,
                   keep: bool = False) -> dict[str, Any]:
    """Run the selected sections, write ``bench.json`` and ``bench.md`` to ``out_dir``, return the report."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    machine = machine_info()
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    wl = cfg.synthetic
    need_store = any(s in sections for s in ("bytes", "write", "stats", "access"))
    try:
        sizes: list[dict[str, Any]] = []
        if need_store:
            with _timed(timings, "write", "section 2: write throughput (%d authors × %d docs)", wl.n_authors,
                        wl.n_docs):
                write, run_small, seed_small = _section_write(cfg, work)
                if "write" in sections:
                    results["write"] = write
                sizes.append({"label": "small", "n_docs": wl.n_docs, "run": run_small, "seed_root": seed_small})
        if "bytes" in sections:
            with _timed(timings, "bytes_synthetic", "section 1: bytes per nonzero (synthetic)"):
                sl = read_slice(sizes[0]["run"], 0, wl.layer_types[0], wl.layers[0])
                results.setdefault("bytes", {})["synthetic"] = measure_sizes(sl, work / "bytes-synthetic")
                results["bytes"]["synthetic"]["whole_run"] = compare_whole_run(sizes[0]["run"], sizes[0]["seed_root"])
        if "stats" in sections or "access" in sections:
            big = wl.scaled(cfg.stats_growth)
            with _timed(timings, "setup_large", "setup: larger run (%d docs/author)", big.n_docs):
                run_big, seed_big = work / "runs" / "large.zarr", work / "seed" / "large"
                write_run_and_seed(big, run_big, seed_big, cfg.stats_layer_type, wl.layers[0])
                sizes.append({"label": "large", "n_docs": big.n_docs, "run": run_big, "seed_root": seed_big})
        access_sizes = list(sizes)
        if "access" in sections and cfg.access_growth:
            huge = dataclasses.replace(wl.scaled(cfg.access_growth), layer_types=(cfg.stats_layer_type,))
            with _timed(timings, "setup_xlarge", "setup: run for random access (%d docs/author, %s only)",
                        huge.n_docs, cfg.stats_layer_type):
                run_huge, seed_huge = work / "runs" / "xlarge.zarr", work / "seed" / "xlarge"
                write_run_and_seed(huge, run_huge, seed_huge, cfg.stats_layer_type, wl.layers[0])
                access_sizes.append({"label": "xlarge", "n_docs": huge.n_docs, "run": run_huge,
                                     "seed_root": seed_huge})
        if "stats" in sections:
            with _timed(timings, "stats", "section 3: statistics"):
                results["stats"] = _section_stats(cfg, work, sizes)
        if "access" in sections:
            with _timed(timings, "access", "section 4: random access"):
                results["access"] = _section_access(cfg, access_sizes)
        if "extract" in sections:
            with _timed(timings, "extract", "section 5: extraction (%s docs/author)",
                        ", ".join(map(str, cfg.extract_docs))):
                results["extract"], tiny_run = _section_extract(cfg, work)
            if "bytes" in sections:
                with _timed(timings, "bytes_tiny", "section 1: bytes per nonzero (tiny model run)"):
                    sl: ActSlice = read_slice(tiny_run, 0, cfg.extract_layer_types[0], cfg.extract_layers[0])
                    results.setdefault("bytes", {})["tiny"] = measure_sizes(sl, work / "bytes-tiny")
                    write_seed_for_run(Path(tiny_run), work / "seed" / "tiny")
                    results["bytes"]["tiny"]["whole_run"] = compare_whole_run(Path(tiny_run), work / "seed" / "tiny")
        if "pipeline" in sections:
            with _timed(timings, "pipeline", "section 6: storage overlapping a simulated device"):
                results["pipeline"] = _section_pipeline(cfg, work)
        if "layout" in sections:
            lw = cfg.layout
            with _timed(timings, "layout", "section 7: files of an unsharded and a sharded run (%d authors × %d docs "
                        "× %d tok)", lw.n_authors, lw.n_docs, lw.n_tok):
                results["layout"] = _section_layout(cfg, work)
        if "scale" in sections:
            from saestore.bench.scale import section_scale

            with _timed(timings, "scale", "section 8: statistics at corpus scale (%d tokens)", cfg.scale_tokens):
                results["scale"] = section_scale(cfg.scale_tokens, cfg.mode == "quick", work, cfg.child_timeout_s,
                                                 write_run_and_seed)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg())
    targets = evaluate_targets(results)
    report = {"schema": REPORT_SCHEMA, "mode": cfg.mode, "machine": machine,
              "config": {**{k: v for k, v in dataclasses.asdict(cfg).items()
                            if k not in ("synthetic", "pipeline", "layout")},
                         "synthetic": wl.to_json(), "pipeline": cfg.pipeline.to_json(), "layout": cfg.layout.to_json()},
              "sections": results, "targets": [t.to_json() for t in targets], "section_seconds": timings,
              "runtime_s": time.perf_counter() - t_start}
    bad = _finite_ratios(report)
    if bad:
        log.warning("non-finite ratios: %s", ", ".join(bad))
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    (out_dir / "bench.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
