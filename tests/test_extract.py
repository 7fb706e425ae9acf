"""End to end: `python -m saestore.extract` on the tiny model and the built-in corpus."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.needs import module_needs

module_needs("extract")

import torch
import xarray as xr

from saestore.extract.config import DEFAULT_PROMPT
from saestore.extract.launch import main
from saestore.reader import open_run
from saestore.writer import read_progress

BASE = ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3", "--sae_features_width", "1k",
        "--max_seq_len", "48", "--n_docs_per_author", "6", "--chunk_docs", "4", "--batch_size", "4", "--quiet"]


def _extract(tmp: Path, *args: str) -> int:
    return main([*BASE, "--output_dir", str(tmp), *args])


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """Two runs on two CPU workers: baseline + sparse (res, att) and prompted + dense (res, mlp)."""
    out = tmp_path_factory.mktemp("extract")
    assert _extract(out, "--devices", "cpu:2", "--layer_types", "res", "att", "--run_name", "sparse") == 0
    assert _extract(out, "--devices", "cpu:2", "--layer_types", "res", "mlp", "--setting", "prompted",
                    "--storage_format", "dense", "--use_error_term", "--run_name", "dense") == 0
    return {"sparse": out / "demo" / "tiny" / "sparse.zarr", "dense": out / "demo" / "tiny" / "dense.zarr",
            "root": out}


@pytest.fixture(scope="module")
def model_and_saes(tiny_cache):
    from saestore.extract.models import load_model, load_sae, resolve_saes

    model = load_model("tiny", "cpu")
    specs = resolve_saes("tiny", ("res", "mlp", "att"), (1, 3), "1k")
    return model, {(s.layer_type, s.layer): (s, load_sae(s, "cpu")) for s in specs}


@torch.inference_mode()
def _reference(model, saes, prompt: list[int], doc_ids: list[int], use_error_term: bool):
    """Direct run_with_cache_with_saes on one document: (acts by (type, layer), ce, entropy)."""
    ids = torch.tensor([prompt + doc_ids])
    logits, cache = model.run_with_cache_with_saes(ids, saes=[s for _, s in saes.values()],
                                                   use_error_term=use_error_term)
    p = len(prompt)
    acts = {key: cache[f"{spec.hook_name}.hook_sae_acts_post"][0, p:].numpy() for key, (spec, _) in saes.items()}
    quality = {}
    for (lt, layer), (spec, _) in saes.items():  # PROTOCOL.md §2.6, computed here in float64
        x = cache[f"{spec.hook_name}.hook_sae_input"][0, p:].flatten(1).double()
        xhat = cache[f"{spec.hook_name}.hook_sae_recons"][0, p:].flatten(1).double()
        quality[(f"{lt}_quality", "sq_error", layer)] = ((x - xhat) ** 2).sum(-1).numpy()
        quality[(f"{lt}_quality", "sq_norm", layer)] = (x**2).sum(-1).numpy()
        quality[(f"{lt}_quality", "sq_centered", layer)] = ((x - x.mean(0)) ** 2).sum(-1).numpy()
        quality[(f"{lt}_quality", "cos", layer)] = ((x * xhat).sum(-1) / (x.norm(dim=-1) * xhat.norm(dim=-1))).numpy()
    acts["quality"] = quality
    # entropy through torch.distributions, CE by log-softmax in float64 (the worker uses float32)
    lsm = torch.log_softmax(logits[0].double(), -1)
    ce = -lsm[p - 1 : -1].gather(-1, ids[0, p:, None]).squeeze(-1).numpy()
    ent = torch.distributions.Categorical(logits=logits[0, p:].double()).entropy().numpy()
    return acts, ce, ent


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_values_match_direct_run_with_cache_with_saes(runs, model_and_saes, kind):
    model, all_saes = model_and_saes
    path = runs[kind]
    ds = open_run(path) if kind == "sparse" else xr.open_zarr(path)
    attrs = ds.attrs["saestore"]
    types = [lt for lt in ("res", "mlp", "att") if lt in ds]
    saes = {k: v for k, v in all_saes.items() if k[0] in types}
    tok = model.tokenizer
    for a, author in enumerate(ds.author.values):
        prompt = [tok.bos_token_id]
        if attrs["setting"] == "prompted":
            prompt += tok(DEFAULT_PROMPT.format(style=str(author)), add_special_tokens=False)["input_ids"]
        for d in (0, int(ds.n_docs[a]) - 1):
            text = str(ds.text.values[a, d])
            n = int(ds.doc_length.values[a, d])
            doc_ids = tok(text, add_special_tokens=False)["input_ids"][:n]
            assert n == min(len(tok(text, add_special_tokens=False)["input_ids"]), 47)
            np.testing.assert_array_equal(ds.token_id.values[a, d, :n], doc_ids)
            assert ds.valid_mask.values[a, d, :n].all() and not ds.valid_mask.values[a, d, n:].any()
            acts, ce, ent = _reference(model, saes, prompt, doc_ids, attrs["use_error_term"])
            for (name, metric, layer), want in acts.pop("quality").items():
                got = ds[name].sel(layer=layer, metric=metric).values[a, d]
                np.testing.assert_allclose(got[:n], want, rtol=2e-4, atol=2e-4, err_msg=f"{name} {metric} {layer}")
                assert np.isnan(got[n:]).all()
            for (lt, layer), want in acts.items():
                got = ds[lt].sel(layer=layer).isel(author=a, doc=d).data
                got = got.compute().todense() if kind == "sparse" else np.asarray(got)
                np.testing.assert_allclose(got[:n], want, rtol=1e-4, atol=1e-5, err_msg=f"{lt} {layer}")
                assert not got[n:].any()
            np.testing.assert_allclose(ds.ce_loss.values[a, d, :n], ce, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(ds.entropy.values[a, d, :n], ent, rtol=1e-4, atol=1e-4)
            assert np.isnan(ds.ce_loss.values[a, d, n:]).all()
            assert [str(t) for t in ds.token.values[a, d, :n]] == [tok.decode([i]) for i in doc_ids]


def test_ce_matches_transformer_lens_loss_per_token(model_and_saes, runs):
    """CE with no SAEs spliced equals TransformerLens' own loss_per_token (independent code path)."""
    model, _ = model_and_saes
    ids = torch.tensor([[model.tokenizer.bos_token_id, 5, 17, 42, 99, 7]])
    from saestore.extract.metrics import token_metrics

    with torch.inference_mode():
        logits = model(ids)
        tl = model(ids, return_type="loss", loss_per_token=True)
    ce, ent = token_metrics(logits, ids, prompt_len=1, n_tok=5)
    np.testing.assert_allclose(ce.numpy()[0], tl.numpy()[0], rtol=1e-5, atol=1e-6)
    probs = torch.softmax(logits[0, 1:].double(), -1)
    np.testing.assert_allclose(ent.numpy()[0], -(probs * probs.log()).sum(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_run_layout_attrs_and_registry(runs):
    ds = xr.open_zarr(runs["sparse"])
    attrs = ds.attrs["saestore"]
    assert attrs["status"] == "complete" and attrs["failed_authors"] == []
    assert attrs["model"] == "tiny" and attrs["storage"]["format"] == "sparse"
    assert set(attrs["saes"]) == {"res", "att"} and set(attrs["saes"]["res"]) == {"1", "3"}
    assert ds.sizes["tok"] == 47 and list(ds.layer.values) == [1, 3]
    assert list(ds.author.values) == sorted(ds.author.values)
    assert (ds.n_docs.values == 6).all()
    assert (read_progress(runs["sparse"])[..., 0] == 1).all()
    db = sqlite3.connect(runs["root"] / "saestore_runs.sqlite")
    rows = dict(db.execute("SELECT run_name, status FROM runs").fetchall())
    assert rows == {"sparse": "complete", "dense": "complete"}
    res = subprocess.run([sys.executable, "-m", "saestore", "runs", "list", "--output_dir", str(runs["root"])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "sparse.zarr" in res.stdout and "complete" in res.stdout
    res = subprocess.run([sys.executable, "-m", "saestore", "runs", "show", "dense", "--output_dir", str(runs["root"])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["config"]["setting"] == "prompted"


def test_prompt_and_bos_never_stored(runs, model_and_saes):
    ds = xr.open_zarr(runs["dense"])
    assert not (ds.token_id.values == model_and_saes[0].tokenizer.bos_token_id).any()
    first = ds.token_id.values[:, 0, 0]
    texts = ds.text.values[:, 0]
    assert all(not str(t).startswith("The text in style") for t in texts)
    assert (first >= 0).all()


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--layers", "9"], "layer"),
    (["--sae_features_width", "65k"], "65k"),
    (["--min_docs_per_author", "1000"], "author"),
])
def test_bad_requests_exit_nonzero_and_leave_nothing(tmp_path, tiny_cache, capsys, args, message):
    argv = [*BASE, "--output_dir", str(tmp_path), "--run_name", "bad"]
    for flag in ("--model", "--layers", "--sae_features_width"):
        if flag in args:
            i = argv.index(flag)
            argv[i : i + (3 if flag == "--layers" else 2)] = []
    code = main([*argv, *args])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.rglob("*.zarr")) and not (tmp_path / "saestore_runs.sqlite").exists()


def test_missing_dataset_column(tmp_path, tiny_cache, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("writer,text\nann,hello there world\n")
    code = main([*BASE, "--dataset_name", "AuthorMix", "--dataset_path", str(csv), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "style" in err and "writer" in err
    assert not any(tmp_path.rglob("*.zarr"))


def test_different_config_refused_and_store_untouched(runs, capsys):
    path = runs["sparse"]
    before = read_progress(path).copy()
    code = main([*BASE, "--output_dir", str(runs["root"]), "--layer_types", "res", "att", "--run_name", "sparse",
                 "--setting", "prompted"])
    assert code == 2 and "different configuration" in capsys.readouterr().err
    np.testing.assert_array_equal(read_progress(path), before)
    assert xr.open_zarr(path).attrs["saestore"]["status"] == "complete"


def test_same_content_in_another_spelling_resumes_and_runs_hashed_as_typed_stay_resumable(runs, capsys):
    """The config hash is of the normalized config: ``--layers 3 1`` after ``--layers 1 3`` and a
    --prompt_template in the baseline setting (unused there) resume the same run. A run made before
    normalization (its config and hash as typed, e.g. layers [3, 1] and a prompt_template) stays
    resumable with its command: its stored config and hash are kept."""
    import shutil

    import zarr

    from saestore import protocol
    from saestore.extract.config import DEFAULT_PROMPT

    argv = [*BASE, "--output_dir", str(runs["root"]), "--layer_types", "res", "att"]
    stored = xr.open_zarr(runs["sparse"]).attrs["saestore"]
    assert stored["config"]["layers"] == [1, 3] and "prompt_template" not in stored["config"]
    assert main([*argv, "--run_name", "sparse", "--layers", "3", "1", "--prompt_template", "unused {style}"]) == 0
    assert xr.open_zarr(runs["sparse"]).attrs["saestore"]["config_hash"] == stored["config_hash"]
    # a run hashed as typed: config {layers: [3, 1], prompt_template: DEFAULT_PROMPT, ...}
    legacy = runs["root"] / "demo" / "tiny" / "legacy.zarr"
    shutil.copytree(runs["sparse"], legacy)
    old = {**stored["config"], "layers": [3, 1], "prompt_template": DEFAULT_PROMPT}
    group = zarr.open_group(str(legacy), mode="r+", use_consolidated=False)
    group.attrs[protocol.ATTRS_KEY] = {**stored, "config": old, "config_hash": protocol.config_hash(old)}
    zarr.consolidate_metadata(str(legacy))
    before = read_progress(legacy).copy()
    assert main([*argv, "--run_name", "legacy", "--layers", "3", "1"]) == 0, capsys.readouterr().err
    after = xr.open_zarr(legacy).attrs["saestore"]
    assert after["config"] == old and after["config_hash"] == protocol.config_hash(old)
    np.testing.assert_array_equal(read_progress(legacy), before)
    # another content is still refused
    assert main([*argv, "--run_name", "legacy", "--layers", "1"]) == 2
    assert re.search(r"different configuration \(differs in: layers\b", capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_l0_warning_names_the_missing_error_term_as_the_likely_cause(runs, kind, caplog):
    """A measured L0 far from the SAE's expected one: on a run without the error term (the default)
    the warning says that splicing every SAE without it is the likely cause; with it, the other causes."""
    import dataclasses
    import logging

    from saestore import protocol
    from saestore.extract.coordinator import Coordinator
    from saestore.extract.worker import WorkerStats

    attrs = protocol.read_attrs(xr.open_zarr(runs[kind]).attrs)
    res = {k: dataclasses.replace(v, expected_l0=5.0) for k, v in attrs.saes["res"].items()}
    attrs = dataclasses.replace(attrs, saes={**attrs.saes, "res": res})
    with caplog.at_level(logging.WARNING, logger="saestore.extract"):
        Coordinator._check_l0(WorkerStats(n_tokens=100, nnz={"res/1": 100 * 60, "res/3": 100 * 5}), attrs)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "res layer 1: measured mean L0 60.0 is far from the SAE's expected 5.0" in warned[0]
    assert attrs.use_error_term == (kind == "dense")
    if attrs.use_error_term:
        assert "prompt/BOS handling, dtype or the wrong SAE" in warned[0]
    else:
        assert "likely cause: every SAE is spliced without the error term" in warned[0]
        assert "--use_error_term" in warned[0] and "wrong SAE" not in warned[0]


def test_second_writer_is_refused(runs, capsys):
    from saestore.lock import RunLock

    with RunLock(runs["sparse"]):
        code = main([*BASE, "--output_dir", str(runs["root"]), "--layer_types", "res", "att", "--run_name", "sparse"])
    assert code == 2 and "being written by pid" in capsys.readouterr().err


def _cmd(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "saestore.extract", *BASE, "--output_dir", str(out), "--layer_types", "res",
            "--devices", "cpu", "--chunk_docs", "2", "--batch_size", "2", "--run_name", name]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tiny_cache, tmp_path):
    env = {**os.environ, "SAESTORE_CACHE": str(tiny_cache)}
    ref = subprocess.run(_cmd(tmp_path, "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    path = tmp_path / "demo" / "tiny" / "killed.zarr"
    proc = subprocess.Popen(_cmd(tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int((read_progress(path)[..., 0] == 1).sum())
        except Exception:
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marked = int((read_progress(path)[..., 0] == 1).sum())
    assert 0 < marked < read_progress(path).shape[0] * 3
    assert Path(str(path) + ".lock").exists()  # left by the killed process; the rerun takes it over
    res = subprocess.run(_cmd(tmp_path, "killed"), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    a, b = xr.open_zarr(tmp_path / "demo" / "tiny" / "ref.zarr"), xr.open_zarr(path)
    assert b.attrs["saestore"]["status"] == "complete"
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if x.dtype.kind in "OUT":
            assert x.tolist() == y.tolist(), name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)
    db = sqlite3.connect(tmp_path / "saestore_runs.sqlite")
    assert db.execute("SELECT status FROM runs WHERE run_name = 'killed'").fetchone()[0] == "complete"
    # the summary splits extraction from start-up; a rerun of the complete run says so in one line, loading no model
    assert re.search(r"wall time: [\d.]+s = extraction [\d.]+s \([\d,]+ tokens/s this session\) \+ start-up", ref.stdout)
    again = subprocess.run(_cmd(tmp_path, "killed"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "is already complete" in again.stdout and "Moving model" not in again.stdout + again.stderr, \
        again.stdout


def test_several_models_are_all_checked_first_then_each_gets_a_run(tmp_path, tiny_cache, capsys):
    models = tmp_path / "models.txt"
    models.write_text("# one model per line\nno-such-model\ntiny\n")
    argv = [a for a in BASE if a not in ("--model", "tiny")]
    argv = [*argv, "--model", str(models), "--layer_types", "res", "--devices", "cpu", "--output_dir", str(tmp_path),
            "--run_name", "multi", "--n_docs_per_author", "2"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2 and "no-such-model" in captured.err and "nothing extracted" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.txt"]
    models.write_text("# one model per line\ntiny\n")
    code = main(argv)
    assert code == 0 and "status: complete" in capsys.readouterr().out
    assert xr.open_zarr(tmp_path / "demo" / "tiny" / "multi.zarr").attrs["saestore"]["status"] == "complete"
    db = sqlite3.connect(tmp_path / "saestore_runs.sqlite")
    assert db.execute("SELECT model, status FROM runs").fetchall() == [("tiny", "complete")]


def test_loss_recovered_matches_direct_forward_passes(tmp_path, tiny_cache, model_and_saes):
    model, all_saes = model_and_saes
    argv = [*BASE, "--output_dir", str(tmp_path), "--layer_types", "res", "--devices", "cpu", "--n_docs_per_author",
            "2", "--run_name", "lr", "--loss_recovered"]
    assert main(argv) == 0
    ds = xr.open_zarr(tmp_path / "demo" / "tiny" / "lr.zarr")
    tok = model.tokenizer
    spec, sae = all_saes[("res", 3)]

    def mean_ce(logits, ids):
        lsm = torch.log_softmax(logits[0].double(), -1)
        return float(-lsm[:-1].gather(-1, ids[0, 1:, None]).mean())

    def zero(act, hook):
        return torch.zeros_like(act)

    with torch.inference_mode():
        for a in range(ds.sizes["author"]):
            n = int(ds.doc_length.values[a, 0])
            ids = torch.tensor([[tok.bos_token_id, *ds.token_id.values[a, 0, :n].tolist()]])
            clean = mean_ce(model(ids), ids)
            spliced = mean_ce(model.run_with_saes(ids, saes=[sae], use_error_term=False), ids)
            zeroed = mean_ce(model.run_with_hooks(ids, fwd_hooks=[(spec.hook_name, zero)]), ids)
            assert float(ds.ce_clean.values[a, 0]) == pytest.approx(clean, rel=1e-4)
            assert float(ds.res_ce_spliced.sel(layer=3).values[a, 0]) == pytest.approx(spliced, rel=1e-4)
            assert float(ds.res_ce_zero.sel(layer=3).values[a, 0]) == pytest.approx(zeroed, rel=1e-4)
    import saestore.stats as st

    lr = st.loss_recovered(ds, "res").compute()
    manual = (ds.res_ce_zero.mean("doc") - ds.res_ce_spliced.mean("doc")) / (
        ds.res_ce_zero.mean("doc") - ds.ce_clean.mean("doc"))
    np.testing.assert_allclose(lr.loss_recovered.values, manual.values, rtol=1e-5)
    q = st.reconstruction_quality(ds, "res").compute()
    assert (q.fvu > 0).all() and (q.cos > 0).all() and (q.l0 > 0).all() and (q.fraction_alive <= 1).all()


def test_model_dtype_is_applied_and_recorded(tmp_path, tiny_cache):
    argv = [*BASE, "--output_dir", str(tmp_path), "--layer_types", "res", "--devices", "cpu", "--n_docs_per_author",
            "1", "--run_name", "bf16", "--dtype", "bfloat16", "--use_error_term"]
    assert main(argv) == 0
    ds = xr.open_zarr(tmp_path / "demo" / "tiny" / "bf16.zarr")
    assert ds.attrs["saestore"]["config"]["dtype"] == "bfloat16"
    valid = ds.valid_mask.values
    assert np.isfinite(ds.ce_loss.values[valid]).all() and np.isfinite(ds.res.values).all()
    assert (ds.res.values[:, :, :, :, :].sum(-1)[:, 0][valid] > 0).mean() > 0.9  # features still fire


def test_worker_processes_start_before_planning_and_stop_unused(tmp_path, tiny_cache, capsys, monkeypatch):
    """With several devices the worker processes are started first, so their imports overlap the
    coordinator's planning; a refused start and a rerun of a complete run stop them unused (no
    process left, nothing written), and the summary says when the first batch began."""
    import multiprocessing as mp

    from saestore.extract import launch

    alive_at_plan = []
    real_plan = launch.plan

    def plan(cfg):
        alive_at_plan.append(len(mp.active_children()))
        return real_plan(cfg)

    monkeypatch.setattr(launch, "plan", plan)
    argv = ["--devices", "cpu:2", "--layer_types", "res", "--run_name", "pool", "--n_docs_per_author", "2"]
    assert _extract(tmp_path, *argv, "--layers", "1", "99") == 2
    assert "only at layers 0-3" in capsys.readouterr().err
    assert alive_at_plan == [2] and mp.active_children() == [] and list(tmp_path.iterdir()) == []
    assert _extract(tmp_path, *argv) == 0
    out = capsys.readouterr().out
    wall, first = (float(x) for x in re.search(r"wall time: ([\d.]+)s.*first batch after ([\d.]+)s", out).groups())
    assert 0 < first < wall and mp.active_children() == []
    assert _extract(tmp_path, *argv) == 0
    assert "is already complete" in capsys.readouterr().out
    assert alive_at_plan == [2, 2, 2] and mp.active_children() == []


def test_worker_pool_reports_a_worker_that_died_before_its_job_and_refuses_a_job_it_cannot_send():
    """A worker killed before it read its job (a job larger than a pipe's buffer) is that job's
    failure, not a hang; a job that cannot be pickled raises in the coordinator; no process is left."""
    import multiprocessing as mp
    import pickle

    from saestore.extract.config import ExtractConfig
    from saestore.extract.data import Document
    from saestore.extract.pool import Job, WorkerPool
    from saestore.extract.work import AuthorWork

    cfg = ExtractConfig(layers=(1,), model="tiny")
    big = AuthorWork(author_idx=0, author="ann", docs=(Document(doc_id=0, author="ann", text="x" * 1_000_000),))
    with WorkerPool(["cpu", "cpu"]) as pool:
        victim = pool._procs[0]
        victim.kill()
        victim.join()
        t = time.monotonic()
        stats = pool.run({0: Job("/nowhere.zarr", cfg, [], [big], 1)})
        assert time.monotonic() - t < 30
    assert stats.failed == {"ann": f"worker 0 exited with code {-signal.SIGKILL}"}
    assert mp.active_children() == []
    with WorkerPool(["cpu", "cpu"]) as pool, pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pool.run({0: Job("/nowhere.zarr", cfg, [lambda: 0], [big], 1)})
    assert mp.active_children() == []
