"""``python -m saestore.bench --quick``: the report is produced and well-formed.

A smoke test: it checks the files, the JSON keys, the markdown tables and that every ratio is a
finite number; never a timing threshold (the CI machine is shared and noisy). Plus unit checks
of the baselines the benchmark compares against.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saestore.bench import seed
from saestore.bench.baselines import delphi_split_bounds
from saestore.bench.report import LIBRARIES
from saestore.bench.run import SECTIONS

SECTION_KEYS = {"bytes", "write", "stats", "access", "extract", "pipeline", "layout", "scale"}


@pytest.fixture(scope="module")
def quick_report(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "SAESTORE_CACHE": str(tiny_cache)}
    res = subprocess.run([sys.executable, "-m", "saestore.bench", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    return out, report, res.stdout


def _ratios(obj, where=""):
    """Every (path, value) under a "ratios" mapping."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "ratios" and isinstance(v, dict):
                yield from ((f"{where}.{k}.{n}", x) for n, x in v.items())
            else:
                yield from _ratios(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _ratios(v, f"{where}[{i}]")


@pytest.mark.slow
@pytest.mark.extract
def test_report_files_and_keys(quick_report):
    out, report, stdout = quick_report
    assert (out / "bench.md").is_file()
    assert not (out / "work").exists(), "the work folder is removed unless --keep"
    assert report["schema"] == "saestore.bench/1" and report["mode"] == "quick"
    assert set(report["sections"]) == SECTION_KEYS == set(SECTIONS)
    m = report["machine"]
    for key in ("cpu", "cores", "ram_gib", "python", "libraries", "date", "loadavg_start", "loadavg_end"):
        assert key in m, key
    assert set(m["libraries"]) == set(LIBRARIES)
    assert set(report["sections"]["bytes"]) == {"synthetic", "tiny"}
    for res in report["sections"]["bytes"].values():
        keys = {r["key"] for r in res["rows"]}
        assert {"saestore_sparse_float32", "saestore_sparse_bfloat16", "saestore_sparse_float16",
                "saestore_dense_float32", "seed_sparse", "seed_dense", "delphi", "bound"} == keys
        assert res["workload"]["nnz"] > 0 and "whole_run" in res
    assert len(report["sections"]["stats"]["sizes"]) == 2
    assert all(s["check"]["agree"] for s in report["sections"]["stats"]["sizes"]), "the three stats paths disagree"
    assert all(s["result"]["agree"] for s in report["sections"]["access"]["sizes"])
    assert [(r["n_docs_per_author"], r["write_ahead"]) for r in report["sections"]["extract"]["runs"]] == \
        [(1, 2), (2, 2), (2, 0)]  # the largest corpus again with the writer inline
    pipe = report["sections"]["pipeline"]
    assert [r["loop"] for r in pipe["rows"]] == ["storage alone", "sequential", "pipelined"]
    assert pipe["same_markers"], "the pipelined and the sequential loop must store the same doc-chunks"
    lay = report["sections"]["layout"]["layouts"]
    assert lay["unsharded"]["shard_docs"] is None and lay["sharded"]["shard_docs"] == 128
    assert lay["unsharded"]["nnz"] == lay["sharded"]["nnz"] > 0
    assert lay["unsharded"]["data_files"] > lay["sharded"]["data_files"]
    assert "targets met" in stdout


@pytest.mark.slow
@pytest.mark.extract
def test_every_ratio_and_target_is_finite(quick_report):
    _, report, _ = quick_report
    ratios = list(_ratios(report))
    assert len(ratios) > 30
    bad = [(p, v) for p, v in ratios if not (isinstance(v, float) and math.isfinite(v) and v > 0)]
    assert not bad, bad
    assert len(report["targets"]) >= 10
    for t in report["targets"]:
        assert set(t) == {"name", "section", "value", "op", "threshold", "basis", "passed", "margin"}
        assert math.isfinite(t["value"]) and t["value"] > 0 and t["op"] in ("<=", ">=")
        assert t["passed"] == (t["value"] <= t["threshold"] if t["op"] == "<=" else t["value"] >= t["threshold"])


@pytest.mark.slow
@pytest.mark.extract
def test_markdown_tables_are_well_formed(quick_report):
    out, report, _ = quick_report
    md = (out / "bench.md").read_text(encoding="utf-8")
    for heading in ("## Targets", "## 1. Bytes per nonzero — synthetic", "## 1. Bytes per nonzero — tiny",
                    "## 2. Write", "## 3. Statistics", "## 4. Random access", "## 5. Extraction",
                    "## 6. Storage overlapping", "## 8. Statistics at corpus scale"):
        assert heading in md, heading
    tables = [block.splitlines() for block in re.findall(r"(?m)(?:^\|.*\n?)+", md)]
    assert len(tables) >= 7
    for t in tables:
        n = t[0].count("|")
        assert re.fullmatch(r"\|(---\|)+", t[1]), t[1]
        assert all(row.count("|") == n for row in t), t[0]
        assert len(t) > 2
    target_rows = tables[0][2:]
    assert len(target_rows) == len(report["targets"])
    assert all(("PASS" in r) != ("MISS" in r) for r in target_rows)


@pytest.mark.extract
def test_scale_section_quick(tmp_path):
    """``--only scale --quick --tokens N``: the run has about N tokens, the three frequency paths and
    the pruned and full-scan top-k paths agree, every row has a time and a peak RSS, and the section
    renders with its targets."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "saestore.bench", "--quick", "--only", "scale", "--tokens", "120000",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    sc = report["sections"]["scale"]
    assert set(report["sections"]) == {"scale"}
    assert 0.8 * 120000 <= sc["n_tokens"] <= 1.25 * 120000 and sc["requested_tokens"] == 120000
    assert set(sc["rows"]) == {"freq_summary", "freq_scan", "freq_seed", "topk_1_pruned", "topk_1_scan",
                               "topk_64_pruned", "topk_64_scan"}
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in sc["rows"].values())
    assert sc["agree"], sc["check"]
    assert sc["check"]["topk_64_pruned_vs_scan"] == 0.0 and sc["check"]["freq_summary_vs_scan"] <= 1e-12
    assert all(math.isfinite(v) and v > 0 for v in sc["ratios"].values())
    assert set(sc["small_rows"]) == set(sc["rows"]) == set(sc["rss_growth"]) and sc["growth"] == 4
    assert 0.8 * 30000 <= sc["small_n_tokens"] <= 1.25 * 30000
    assert {t["section"] for t in report["targets"]} == {"scale"}
    md = (out / "bench.md").read_text(encoding="utf-8")
    assert "## 8. Statistics at corpus scale" in md and "| topk_64_pruned |" in md


def test_seed_csr_from_nonzeros_equals_the_dense_path(tmp_path):
    """The large baseline files are built from nonzeros; they must be the seed's exact bytes."""
    import scipy.sparse

    rng = np.random.default_rng(0)
    dense = (rng.random((3, 7, 50)) < 0.1) * rng.lognormal(size=(3, 7, 50))
    dense = dense.astype(np.float32)
    a = seed.csr_from_dense(dense)
    rows, cols = np.nonzero(dense.reshape(21, 50))
    b = seed.csr_from_nonzeros(rows, cols, dense.reshape(21, 50)[rows, cols], (21, 50))
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    scipy.sparse.save_npz(buf_a, a)
    scipy.sparse.save_npz(buf_b, b)
    assert buf_a.getvalue() == buf_b.getvalue()


def test_delphi_split_bounds_cover_every_feature_once():
    for width, n in [(16384, 5), (1024, 5), (10, 3), (7, 7)]:
        bounds = delphi_split_bounds(width, n)
        covered = np.concatenate([np.arange(s, e + 1) for s, e in bounds])
        assert np.array_equal(covered, np.arange(width)) and len(bounds) <= n


def test_cli_rejects_an_unknown_section():
    res = subprocess.run([sys.executable, "-m", "saestore.bench", "--only", "nowhere"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_codec_option_measures_the_chain_alone(tmp_path):
    """``--codec`` (what scripts/bench_codec_bytes.py did): the table, codec_bytes.json, no report;
    the workload options size its chunk, and a non-positive size is refused."""
    from saestore.bench.__main__ import main

    assert main(["--codec", "--chunk-docs", "2", "--n-tok", "64", "--features", "512", "--l0", "20", "--repeat", "1",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "codec_bytes.json").read_text(encoding="utf-8"))
    assert doc["workload"]["shape"] == [2, 64, 512] and not (tmp_path / "bench.json").exists()
    assert {r["name"].split(" ")[0] for r in doc["results"]} >= {"sparse_coo", "dense", "naive", "information"}
    with pytest.raises(SystemExit):
        main(["--codec", "--n-tok", "0"])


@pytest.mark.slow
@pytest.mark.extract
def test_gpu_bench_runs_on_small_shapes_on_the_cpu(tmp_path):
    """``--gpu --quick``: the Gemma-2 architecture at small shapes with random SAEs; every loop runs,
    the calibrated SAEs fire about as often as asked, two workers run at once, and one line per
    ratio is printed."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "saestore.bench", "--gpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text(encoding="utf-8"))
    assert set(res["rows"]) == {"forward", "sae_loop", "saestore"}
    assert res["shape"]["small"] and res["shape"]["model"].startswith("google/gemma-2-2b")
    for name, value in res["ratios"].items():
        assert math.isfinite(value) and value > 0, name
        assert f"{name}: {value:.3f}" in proc.stdout
    stored = res["stored"]
    assert stored["n_tokens"] == res["shape"]["n_tokens"]
    assert 0.3 * res["shape"]["l0"] < stored["mean_l0"] < 3 * res["shape"]["l0"], stored
    # several workers at once (two CPU processes here): each stored every token, on the same model
    sc = res["scaling"]
    assert sc["devices"] == ["cpu", "cpu"] and "workers_over_one" in res["ratios"]
    assert [w["n_tokens"] for w in sc["rows"]] == [res["shape"]["n_tokens"]] * 2
    assert {w["nnz"] for w in sc["rows"]} == {stored["nnz"]}  # same seed: the same model, SAEs and nonzeros
    assert not list(out.glob("tmp*")), "the work folder is removed"


@pytest.mark.extract
def test_objstore_bench_writes_and_reads_the_same_run_on_s3_and_disk(tmp_path):
    """``--objstore --quick``: a moto S3 server on 127.0.0.1; the same run written to disk and to
    the bucket, scanned by both with the same result, requests in flight counted on the S3 side."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "saestore.bench", "--objstore", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "objstore.json").read_text(encoding="utf-8"))
    local, s3 = res["stores"]["local"], res["stores"]["s3"]
    assert local["nnz"] == s3["nnz"] > 0
    for name, value in res["ratios"].items():
        assert math.isfinite(value) and value > 0, name
    assert all(s["requests"] == 0 for s in local["scans"].values())  # local reads do not go through fsspec
    many = s3["scans"]["16 threads"]
    assert many["requests"] > 0 and many["peak_in_flight"] >= 2  # dask threads issue reads concurrently
    assert "| s3 |" in proc.stdout and not list(out.glob("tmp*"))
