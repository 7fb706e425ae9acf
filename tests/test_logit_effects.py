"""Logit effects at extraction (issue #15 item 3, ``--logit_k``): each feature's top and bottom output
tokens of ``W_dec @ W_U``, stored once per SAE, read by ``ds.sae.logit_effects``, the dashboard and the
Neuronpedia export."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tests.helpers.needs import module_needs

module_needs("extract")

import xarray as xr

import saestore.stats  # noqa: F401  (the ds.sae accessor)
from saestore.extract.launch import main
from saestore.reader import open_run
from saestore.validate import validate_run

K = 5
ARGS = ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "--layer_types", "res", "att",
        "--sae_features_width", "1k", "--max_seq_len", "32", "--n_docs_per_author", "4", "--chunk_docs", "2",
        "--devices", "cpu", "--quiet", "--logit_k", str(K)]


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("logits")
    assert main([*ARGS, "--output_dir", str(out), "--run_name", "logits", "--devices", "cpu:2"]) == 0  # two writers
    return out / "demo" / "tiny" / "logits.zarr"


def test_logit_effects_equal_the_decoder_through_the_unembedding(run):
    from saestore.extract.models import load_model, load_sae, resolve_saes

    assert validate_run(run).ok
    ds = open_run(run)
    assert list(ds.logit_rank.values) == [*range(1, K + 1), *range(-1, -K - 1, -1)]
    model = load_model("tiny", "cpu")
    W_U = model.W_U.detach().double().numpy()
    for spec in resolve_saes("tiny", ("res", "att"), (1,), "1k"):
        W_dec = load_sae(spec, "cpu").W_dec.detach().double().numpy()
        if spec.layer_type == "att":  # hook_z directions reach the residual stream through W_O
            W_dec = W_dec @ model.blocks[1].attn.W_O.detach().double().numpy().reshape(-1, W_U.shape[0])
        logits = W_dec @ W_U
        got = ds.sae.logit_effects(spec.layer_type, layer=1).isel(layer=0).compute()
        want_top = np.sort(logits, axis=1)[:, ::-1][:, :K]
        want_bottom = np.sort(logits, axis=1)[:, :K]
        np.testing.assert_allclose(got.value.sel(logit_rank=list(range(1, K + 1))), want_top, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.value.sel(logit_rank=list(range(-1, -K - 1, -1))), want_bottom,
                                   rtol=1e-4, atol=1e-6)
        ids = got.token_id.values
        np.testing.assert_allclose(np.take_along_axis(logits, ids.astype(np.int64), axis=1), got.value.values,
                                   rtol=1e-4, atol=1e-6)
        tokens = [model.tokenizer.decode([int(i)]) for i in ids[0]]
        assert list(got.token.values[0]) == tokens


def test_dashboard_and_neuronpedia_show_the_logit_effects(run, tmp_path):
    from saestore.dashboard import write_dashboard
    from saestore.export.neuronpedia import export_neuronpedia

    ds = open_run(run)
    effects = ds.sae.logit_effects("res", layer=1, feature=[3]).isel(layer=0, feature=0).compute()
    site = write_dashboard(str(run), tmp_path / "dash", layer_type="res", layer=1, features=[3], k=3, window=2,
                           n_bins=2, per_bin=1, show_progress=False)
    page = (site / "features" / "3.html").read_text(encoding="utf-8")
    assert 'id="logits-positive"' in page and 'id="logits-negative"' in page
    data = json.loads(page.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])
    assert [r["token_id"] for r in data["logits"]["positive"]] == list(effects.token_id.values[:K])
    folder = export_neuronpedia(str(run), tmp_path / "np", layer_type="res", layer=1, features=[3], k=3, window=2,
                                show_progress=False)
    (row,) = [json.loads(line) for p in (folder / "features").glob("*.jsonl.gz") for line in gzip.open(p, "rt")]
    assert row["pos_str"] == list(effects.token.values[:K]) and len(row["neg_values"]) == K


def test_runs_without_logit_k_have_none_and_say_so(tiny_cache, tmp_path, capsys):
    from saestore.stats import StatsError

    args = [a for a in ARGS if a not in ("--logit_k", str(K))]
    assert main([*args, "--output_dir", str(tmp_path), "--layer_types", "res"]) == 0
    (path,) = (tmp_path / "demo").rglob("*.zarr")
    ds = xr.open_zarr(path)
    assert "logit_rank" not in ds.coords and "res_logit_value" not in ds
    with pytest.raises(StatsError, match="--logit_k"):
        open_run(path).sae.logit_effects("res")
    assert main([*args, "--output_dir", str(tmp_path / "bad"), "--logit_k", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--logit_k must be between 0 and 100" in err[0]
    assert not (tmp_path / "bad").exists()


def test_a_rerun_writes_missing_logit_effects_again(run, tmp_path):
    """Logit effects whose ids are unwritten (-1: a worker killed while writing them) are written by the
    next worker that loads the model, equal to the first ones."""
    import shutil

    import zarr

    from saestore import protocol

    path = tmp_path / "demo" / "tiny" / "logits.zarr"
    shutil.copytree(run, path)
    before = xr.open_zarr(run).res_logit_value.values
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group["res_logit_token_id"][...] = -1
    zarr.open_array(str(path), path=protocol.PROGRESS_PATH, mode="r+")[0, :] = 0  # one author to redo
    attrs = dict(group.attrs[protocol.ATTRS_KEY])
    group.attrs[protocol.ATTRS_KEY] = {**attrs, "status": "running", "finalized_at": None}  # as a kill leaves it
    zarr.consolidate_metadata(str(path))
    assert main([*ARGS, "--output_dir", str(tmp_path), "--run_name", "logits"]) == 0
    after = xr.open_zarr(path)
    assert (after.res_logit_token_id.values >= 0).all()
    np.testing.assert_array_equal(after.res_logit_value.values, before)
    assert validate_run(path).ok
