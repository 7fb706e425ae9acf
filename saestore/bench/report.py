"""The benchmark report: machine description, targets, and the markdown tables."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["Target", "machine_info", "evaluate_targets", "render_markdown", "LIBRARIES"]

LIBRARIES = ("saestore", "numpy", "zarr", "numcodecs", "xarray", "dask", "sparse", "scipy", "safetensors", "torch",
             "sae-lens", "transformer-lens")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    """The commit of the checkout saestore is imported from (None outside a git checkout)."""
    import saestore

    checkout = Path(saestore.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, OS, Python and library versions, date, git commit, load average."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "ram_gib": _ram_gib(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "libraries": versions, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "loadavg_start": list(os.getloadavg())}


@dataclass(frozen=True, kw_only=True)
class Target:
    """One target: ``value op threshold`` where value is a measured ratio."""

    name: str
    section: str
    value: float
    op: str  # "<=" or ">="
    threshold: float
    basis: str
    """what the ratio divides, in words."""

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    @property
    def margin(self) -> float:
        """How far from the threshold, as a factor (> 1 passes, < 1 misses)."""
        if self.value <= 0 or not math.isfinite(self.value):
            return 0.0
        return self.threshold / self.value if self.op == "<=" else self.value / self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "section": self.section, "value": self.value, "op": self.op,
                "threshold": self.threshold, "basis": self.basis, "passed": self.passed, "margin": self.margin}


def evaluate_targets(sections: dict[str, Any]) -> list[Target]:
    """The issue's targets, as ratios measured in this run."""
    out: list[Target] = []
    for wl_name, res in sections.get("bytes", {}).items():
        r = res["ratios"]
        tag = f"bytes/{wl_name}"
        out += [
            Target(name=f"sparse f32 vs seed sparse ({wl_name})", section=tag, op="<=", threshold=0.85,
                   value=r["f32_total_vs_seed_sparse_total"],
                   basis="(SAE chunks + the author's per-token/per-doc chunks) / (.sparse.npz + metadata file); "
                         "run-level zarr.json + coordinates excluded (shown as run overhead)"),
            Target(name=f"sparse bf16 vs seed sparse ({wl_name})", section=tag, op="<=", threshold=0.5,
                   value=r["bf16_total_vs_seed_sparse_total"],
                   basis="as above, bfloat16 values"),
            Target(name=f"sparse f32 vs seed dense .npz ({wl_name})", section=tag, op="<=", threshold=0.1,
                   value=r["f32_acts_vs_seed_dense_acts"],
                   basis="saestore SAE chunk files / seed dense .npz (activations only)"),
            Target(name=f"sparse f32 vs delphi-style cache ({wl_name})", section=tag, op="<=", threshold=0.6,
                   value=r["f32_acts_vs_delphi_acts"],
                   basis="saestore SAE chunk files / delphi locations+activations files (activations only)"),
        ]
    w = sections.get("write")
    if w:
        out.append(Target(name="writer vs seed save path", section="write", op=">=", threshold=10.0,
                          value=w["ratios"]["saestore_vs_seed_nnz_per_s"],
                          basis="nonzeros/s of RunWriter.write_chunk / nonzeros/s of cat+CSR+save_npz+metadata"))
    s = sections.get("stats")
    if s:
        big = s["sizes"][-1]["label"]
        out += [
            Target(name=f"stats sparse vs xr.open_zarr dense ({big})", section="stats", op=">=", threshold=5.0,
                   value=s["ratios"][f"dense_over_sparse_time_{big}"], basis="dense seconds / sparse seconds"),
            Target(name=f"stats sparse vs seed ({big})", section="stats", op=">=", threshold=3.0,
                   value=s["ratios"][f"seed_over_sparse_time_{big}"], basis="seed seconds / sparse seconds"),
            Target(name="stats sparse peak RSS flat", section="stats", op="<=", threshold=1.25,
                   value=s["ratios"]["sparse_peak_rss_growth"],
                   basis=f"peak RSS at {big} / at {s['sizes'][0]['label']} (run {s['growth']}x larger)"),
        ]
    a = sections.get("access")
    if a:
        big = "large" if any(x["label"] == "large" for x in a["sizes"]) else a["sizes"][-1]["label"]
        out.append(Target(name=f"one-document read vs seed ({big})", section="access", op=">=", threshold=5.0,
                          value=a["ratios"][f"seed_over_open_run_{big}"],
                          basis="seed median latency / saestore open_run median latency"))
    e = sections.get("extract")
    if e:
        out.append(Target(name="storage share of extraction", section="extract", op="<=", threshold=0.05,
                          value=e["ratios"]["storing_frac_of_loop_largest"],
                          basis="time the forward thread is not in run_batch / the extraction loop (extract_author), "
                                "largest corpus, the larger of default and pinned torch threads"))
    p = sections.get("pipeline")
    if p:
        out.append(Target(name="storage overlaps a simulated device", section="pipeline", op="<=", threshold=1.15,
                          value=p["ratios"]["pipelined_wall_over_max_forward_storage"],
                          basis="pipelined loop wall / max(simulated forward total, storage work in that loop)"))
    lay = sections.get("layout")
    if lay:
        r = lay["ratios"]
        out += [
            Target(name="data files, unsharded / sharded", section="layout", op=">=", threshold=20.0,
                   value=r["files_unsharded_over_sharded"], basis="files other than zarr.json, same run in both layouts"),
            Target(name="bytes per nonzero, sharded / unsharded", section="layout", op="<=", threshold=1.02,
                   value=r["bytes_per_nnz_sharded_over_unsharded"], basis="bytes of all data files / stored nonzeros"),
            Target(name="one-document read, sharded / unsharded", section="layout", op="<=", threshold=1.0,
                   value=r["read_one_doc_sharded_over_unsharded"],
                   basis="median open_run latency of one document of one SAE"),
        ]
    sc = sections.get("scale")
    if sc:
        r, n = sc["ratios"], f"{sc['n_tokens'] / 1e6:.1f}M tokens"
        out += [
            Target(name=f"frequency by author, summaries vs seed ({n})", section="scale", op=">=", threshold=20.0,
                   value=r["seed_over_summary_time"], basis="seed seconds / summary-path seconds (issue 14: on 10M)"),
            Target(name=f"frequency by author, full scan vs seed ({n})", section="scale", op=">=", threshold=2.0,
                   value=r["seed_over_scan_time"], basis="seed seconds / full-scan seconds (issue 14: on 10M)"),
            Target(name=f"top_examples peak RSS ({n})", section="scale", op="<=", threshold=1024.0,
                   value=max(sc["rows"][k]["peak_rss_mb"] for k in sc["rows"] if k.startswith("topk")),
                   basis="MiB, the largest of the pruned and full-scan top-k paths"),
            Target(name=f"top_examples k=16, 1 feature ({n})", section="scale", op="<=", threshold=15.0,
                   value=sc["rows"]["topk_1_pruned"]["seconds"], basis="seconds, pruned by the summaries"),
            Target(name=f"top_examples k=16, 64 features ({n})", section="scale", op="<=", threshold=60.0,
                   value=sc["rows"]["topk_64_pruned"]["seconds"], basis="seconds, pruned by the summaries"),
        ]
        if "rss_growth" in sc:
            out.append(Target(name=f"peak RSS growth, run {sc['growth']}× larger ({n})", section="scale", op="<=",
                              threshold=1.25, value=max(sc["rss_growth"].values()),
                              basis="the largest over every path of peak RSS(N) / peak RSS(N / growth)"))
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1e6:
            return f"{x / 1e6:,.2f} M"
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown (tables and a short description of each section)."""
    m = report["machine"]
    sec = report["sections"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines = [f"# saestore benchmarks ({report['mode']})", "",
             f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['ram_gib']} GiB RAM, "
             f"{m['os']}",
             f"- Python {m['python']}; {libs}",
             f"- date: {m['date']}; commit {m['git_commit']}; load average at start {m['loadavg_start'][0]:.1f}, "
             f"at end {m.get('loadavg_end', [float('nan')])[0]:.1f}",
             f"- runtime: {report['runtime_s']:.0f} s", ""]
    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "target", "result", "basis"],
                    [[t["name"], f"{t['value']:.3g}", f"{t['op']} {t['threshold']:g}",
                      "PASS" if t["passed"] else f"MISS ({t['margin']:.2f}x of target)", t["basis"]]
                     for t in report["targets"]])
    for wl_name, res in sec.get("bytes", {}).items():
        w = res["workload"]
        lines += ["", f"## 1. Bytes per nonzero — {wl_name}", "",
                  f"One (author, layer type, layer) = {w['author']} / {w['layer_type']} / layer {w['layer']}: "
                  f"{w['shape'][0]} docs × {w['shape'][1]} tok × {w['shape'][2]:,} features, {w['nnz']:,} nonzeros, "
                  f"{w['n_valid_tokens']:,} real tokens (padding {w['padding']:.1%}), mean L0 {w['mean_l0']:.1f}.", ""]
        lines += _table(["format", "activations B", "metadata B", "total B", "act B/nnz", "total B/nnz",
                         "index B/nnz", "run overhead B"],
                        [[r["format"], r["acts_bytes"], r["meta_bytes"], r["total_bytes"], r["acts_B_per_nnz"],
                          r["total_B_per_nnz"], r["index_B_per_nnz"], r["run_overhead_bytes"] or None]
                         for r in res["rows"]])
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items())]
        whole = res.get("whole_run")
        if whole:
            o, sd = whole["saestore"], whole["seed"]
            lines += ["", f"Whole run ({whole['authors']} authors × {', '.join(whole['layer_types'])} × layer(s) "
                      f"{', '.join(map(str, whole['layers']))}, {whole['value_dtype']}): saestore {o['total']:,} B "
                      f"(SAE chunks {o['acts']:,}, per-token/per-doc chunks {o['meta']:,}, zarr.json + coordinates "
                      f"{o['overhead']:,}) vs the seed's files {sd['total']:,} B (.sparse.npz {sd['acts']:,}, "
                      f"metadata {sd['meta']:,}): " + ", ".join(f"{k} {v:.3f}" for k, v in whole["ratios"].items())]
    w = sec.get("write")
    if w:
        lines += ["", "## 2. Write throughput and peak RSS", "", w["description"], ""]
        lines += _table(["writer", "nonzeros", "timed s", "M nnz/s", "peak RSS MiB", "RSS after imports MiB"],
                        [[r["name"], r["nnz"], r["seconds"], r["nnz_per_s"] / 1e6, r["peak_rss_mb"], r["base_rss_mb"]]
                         for r in w["rows"]])
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in w["ratios"].items())]
    s = sec.get("stats")
    if s:
        lines += ["", "## 3. Statistics throughput (frequency, mean, max per feature, by author)", "",
                  s["description"], ""]
        rows = []
        for size in s["sizes"]:
            for r in size["rows"]:
                rows.append([size["label"], r["mode"], r["nnz"], r["seconds"], r["nnz_per_s"] / 1e6,
                             r["peak_rss_mb"], r["base_rss_mb"]])
        lines += _table(["run", "path", "nonzeros", "seconds", "M nnz/s", "peak RSS MiB", "RSS before MiB"], rows)
        lines += ["", "Agreement: " + "; ".join(f"{x['label']}: max rel diff {x['check']['max_rel_diff']:.2g}"
                                                  for x in s["sizes"])]
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in s["ratios"].items())]
    a = sec.get("access")
    if a:
        lines += ["", "## 4. Random access: one document, one SAE", "", a["description"], ""]
        rows = []
        for size in a["sizes"]:
            r = size["result"]
            for k, v in r["median_s"].items():
                rows.append([size["label"], k, v * 1e3, r["min_s"][k] * 1e3])
        lines += _table(["run", "reader", "median ms", "min ms"], rows)
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in a["ratios"].items())]
    e = sec.get("extract")
    if e:
        lines += ["", "## 5. Extraction: storage share and peak RSS", "", e["description"], ""]
        lines += _table(["docs/author", "torch threads", "write-ahead", "tokens", "nonzeros", "wall s", "loop s",
                         "forward s", "chunk_data s", "write_chunk s", "storing / loop", "storing / wall",
                         "peak RSS MiB"],
                        [[r["n_docs_per_author"], r["torch_threads"], r["write_ahead"], r["n_tokens"], r["nnz"],
                          r["wall_s"], r["loop_s"], r["run_batch_s"], r["chunk_data_s"], r["write_chunk_s"],
                          r["storing_frac_of_loop"], r["storing_frac_of_wall"], r["peak_rss_mb"]] for r in e["runs"]])
        if e.get("startup"):
            lines += ["", "Start-up of the demo command (medians):", ""]
            lines += _table(["worker processes", "runs", "first batch s", "wall s", "extraction s"],
                            [[r["workers"], r["runs"], r["first_batch_s"], r["wall_s"], r["extract_s"]]
                             for r in e["startup"]])
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in e["ratios"].items())]
    p = sec.get("pipeline")
    if p:
        lines += ["", "## 6. Storage overlapping a simulated device", "", p["description"], ""]
        lines += _table(["loop", "write-ahead", "wall s", "forward s", "storage work s", "nonzeros"],
                        [[r["loop"], r["write_ahead"], r["wall_s"], r["forward_s"], r["storage_s"], int(r["nnz"])]
                         for r in p["rows"]])
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in p["ratios"].items())]
    lay = sec.get("layout")
    if lay:
        w = lay["workload"]
        lines += ["", "## 7. Files and bytes: unsharded (1.1) vs sharded (1.2)", "", lay["description"], "",
                  f"Run: {w['n_authors']} authors × {w['n_docs']} docs × {w['n_tok']} tok "
                  f"({lay['n_tokens_positions']:,} token positions), {w['n_features']:,} features, L0 {w['l0']:g}, "
                  f"chunk_docs {w['chunk_docs']}.", ""]
        lines += _table(["layout", "shard_docs", "data files", "bytes of data", "bytes on disk", "disk / data",
                         "nonzeros", "B/nnz", "write M nnz/s", "one-doc read median ms"],
                        [[name, r["shard_docs"], r["data_files"], r["data_bytes"], r["disk_bytes"], r["disk_over_data"],
                          r["nnz"], r["bytes_per_nnz"], r["write_nnz_per_s"] / 1e6, r["read_one_doc_median_s"] * 1e3]
                         for name, r in lay["layouts"].items()])
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in lay["ratios"].items())]
    sc = sec.get("scale")
    if sc:
        lines += ["", "## 8. Statistics at corpus scale", "", sc["description"], ""]
        small = sc.get("small_rows", {})
        lines += _table(["path", "seconds", "peak RSS MiB", "RSS before MiB", "seconds, run / growth",
                         "peak RSS MiB, run / growth", "peak RSS growth"],
                        [[name, r["seconds"], r["peak_rss_mb"], r["base_rss_mb"], small.get(name, {}).get("seconds"),
                          small.get(name, {}).get("peak_rss_mb"), sc.get("rss_growth", {}).get(name)]
                         for name, r in sc["rows"].items()])
        lines += ["", "Agreement (max rel diff): " + ", ".join(f"{k} {v:.2g}" for k, v in sc["check"].items())]
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in sc["ratios"].items())]
    return "\n".join(lines) + "\n"
