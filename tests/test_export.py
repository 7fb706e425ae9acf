"""Exports: delphi's latent cache (read back with delphi's documented names, dtypes and shapes, and
with its own TensorBuffer where the package imports) and Neuronpedia's gzipped JSONL batches
(checked against their documented row fields and against saestore.stats)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

import saestore
import saestore.stats as st
from saestore.__main__ import main

from tests.helpers.stats_run import AUTHORS, LAYERS, N_DOCS, N_FEAT, write_run


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("export") / "run.zarr")


def test_split_bounds_follow_delphi_and_the_65536_limit():
    from saestore.export.delphi import split_bounds

    assert split_bounds(40, 5) == [(0, 7), (8, 15), (16, 23), (24, 31), (32, 39)]  # delphi's linspace, end inclusive
    big = split_bounds(200_000, 1)
    assert len(big) == 4 and max(b - a + 1 for a, b in big) <= 65_536 and big[-1][1] == 199_999
    assert split_bounds(3, 5) == [(0, 0), (1, 1), (2, 2)]


def test_delphi_export_reads_back_as_the_run(ref, tmp_path, capsys):
    pytest.importorskip("safetensors", reason="needs the 'export' extra (safetensors)")
    from safetensors.numpy import load_file

    out = tmp_path / "delphi"
    assert main(["export", "delphi", ref.path, str(out), "--layer_type", "res", "--n_splits", "3"]) == 0
    assert "layers.2, layers.5" in capsys.readouterr().out
    seqs = json.loads((out / "sequences.json").read_text())
    assert len(seqs) == sum(N_DOCS) and seqs[N_DOCS[0]] == {"author": AUTHORS[1], "doc": 0, "doc_id": 100}
    seq_of = {(s["author"], s["doc"]): i for i, s in enumerate(seqs)}
    for li, layer in enumerate(LAYERS):
        folder = out / "latents" / f"layers.{layer}"
        cfg = json.loads((folder / "config.json").read_text())
        assert {"dataset_repo", "dataset_split", "dataset_name", "dataset_column", "batch_size", "cache_ctx_len",
                "n_tokens", "n_splits", "model_name"} <= set(cfg) and cfg["n_splits"] == 3
        assert cfg["model_name"] == "synthetic-stats" and cfg["cache_ctx_len"] == ref.valid_ADT.shape[2]
        files = sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
        assert [p.stem for p in files] == ["0_12", "13_25", "26_39"]
        got = np.zeros((sum(N_DOCS), ref.valid_ADT.shape[2], N_FEAT), np.float32)
        for p in files:
            d = load_file(str(p))
            start = int(p.stem.split("_")[0])  # as delphi's loader parses it
            loc, act, tok = d["locations"], d["activations"], d["tokens"]
            assert loc.dtype == np.int64 and loc.ndim == 2 and loc.shape[1] == 3
            assert act.dtype == np.float16 and act.shape == (loc.shape[0],)
            assert tok.dtype == np.int64 and tok.shape == (sum(N_DOCS), cfg["cache_ctx_len"])
            assert (np.lexsort(loc.T[::-1]) == np.arange(len(loc))).all()  # sorted (seq, pos, latent)
            got[loc[:, 0], loc[:, 1], loc[:, 2] + start] = act
        want = np.zeros_like(got)
        for a, name in enumerate(AUTHORS):
            for dd in range(N_DOCS[a]):
                s = seq_of[(name, dd)]
                want[s] = np.where(ref.valid_ADT[a, dd][:, None], ref.acts["res"][a, li, dd], 0).astype(np.float16)
                assert (tok[s] == np.where(ref.token_id_ADT[a, dd] < 0, 0, ref.token_id_ADT[a, dd])).all()
        np.testing.assert_array_equal(got, want)


def test_delphi_export_with_delphis_own_loader(ref, tmp_path):
    pytest.importorskip("safetensors", reason="needs the 'export' extra (safetensors)")
    loader = pytest.importorskip("delphi.latents.loader", reason="delphi (eai-delphi) is not installed")
    from saestore.export.delphi import export_delphi

    export_delphi(ref.path, tmp_path, layer_type=["mlp"], layer=[2], n_splits=2, show_progress=False)
    buf = loader.TensorBuffer(str(tmp_path / "latents" / "layers.2.mlp" / "20_39.safetensors"), "layers.2.mlp")
    locations, activations, tokens = buf.load()
    assert int(locations[:, 2].min()) >= 20 and tokens.shape[0] == sum(N_DOCS)


#: the fields of SAEDashboard's Activation and Feature rows (sae_dashboard/neuronpedia/neuronpedia_export.py,
#: mirrors of neuronpedia_utils.db_models), as documented there
ACTIVATION_FIELDS = {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values",
                     "creatorId", "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt",
                     "lossValues", "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex",
                     "zIndices", "zValues"}
FEATURE_FIELDS = {"modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector",
                  "vectorLabel", "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues",
                  "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                  "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                  "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1", "neg_str",
                  "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                  "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                  "decoder_weights_dist", "sourceSetName"}


def test_neuronpedia_export_rows(ref, tmp_path):
    out = tmp_path / "np"
    assert main(["export", "neuronpedia", ref.path, str(out), "--layer_type", "res", "--layer", "2", "--feature",
                 "0", "3", "4", "11", "--batch_size", "3", "--k", "4", "--window", "2",
                 "--model_name", "org/synthetic-model", "--creator_id", "me"]) == 0
    folder = out / "synthetic-model" / "2-saestore-res"
    assert json.loads((folder / "skipped_indexes.json").read_text()) == [0]  # feature 0 is dead
    feats = [json.loads(line) for n in (0, 1) for line in gzip.open(folder / "features" / f"batch-{n}.jsonl.gz", "rt")]
    acts = [json.loads(line) for n in (0, 1) for line in gzip.open(folder / "activations" / f"batch-{n}.jsonl.gz", "rt")]
    assert [f["index"] for f in feats] == ["3", "4", "11"]
    assert all(set(f) == FEATURE_FIELDS and f["creatorId"] == "me" for f in feats)
    assert all(set(a) == ACTIVATION_FIELDS and a["creatorId"] == "me" for a in acts)
    source = json.loads((folder / "source.jsonl").read_text())
    assert source["id"] == "2-saestore-res" and source["setName"] == "saestore-res"
    assert json.loads((folder / "sourceset.jsonl").read_text())["name"] == "saestore-res"
    assert json.loads((folder / "model.jsonl").read_text())["id"] == "org/synthetic-model"
    ds = saestore.open_run(ref.path)
    fs = st.feature_stats(ds, "res", layer=2, feature=[3, 4, 11]).compute()
    for row in feats:
        assert {"modelId", "layer", "index", "maxActApprox", "frac_nonzero", "freq_hist_data_bar_heights",
                "freq_hist_data_bar_values", "hookName", "neg_str", "pos_str", "sourceSetName"} <= set(row)
        assert row["modelId"] == "org/synthetic-model" and row["layer"] == "2-saestore-res"
        f = int(row["index"])
        assert row["frac_nonzero"] == pytest.approx(float(fs["frequency"].sel(feature=f)), rel=1e-5)
        assert row["maxActApprox"] == pytest.approx(float(fs["max"].sel(feature=f)), rel=1e-5)
        assert sum(row["freq_hist_data_bar_heights"]) == int(fs["count"].sel(feature=f))
    te = st.top_examples(ds, "res", layer=2, feature=[3, 4, 11], k=4, window=2).compute()
    for f in (3, 4, 11):
        rows = [r for r in acts if r["index"] == str(f)]
        top = [r for r in rows if r["binMin"] == -1]
        assert len(top) == 4 and len(rows) > 4  # and examples from the quantile bins
        for rank, r in enumerate(top):
            ex = te.sel(feature=f, rank=rank)
            assert {"id", "tokens", "values", "maxValue", "maxValueTokenIndex", "minValue", "binMin", "binMax",
                    "binContains", "qualifyingTokenIndex", "modelId", "layer"} <= set(r)
            assert len(r["tokens"]) == len(r["values"])
            assert r["tokens"][r["qualifyingTokenIndex"]] == str(ex["tokens"].values[2])
            assert r["values"][r["qualifyingTokenIndex"]] == pytest.approx(float(ex["value"]), rel=1e-3)
            assert r["dataSource"] == str(ex["example_author"].values)
        for r in rows[4:]:
            v = r["values"][r["qualifyingTokenIndex"]]
            assert r["binMin"] - 1e-3 <= v <= r["binMax"] * 1.001 and 0 < r["binContains"] <= 1
    assert len({r["id"] for r in acts}) == len(acts)


def test_export_bad_input(ref, tmp_path, capsys):
    assert main(["export", "neuronpedia", ref.path, str(tmp_path / "x"), "--layer_type", "res"]) == 2
    assert "exactly one --layer_type and one --layer" in capsys.readouterr().err
    assert main(["export", "neuronpedia", ref.path, str(tmp_path / "x"), "--layer_type", "res", "--layer", "9"]) == 2
    assert "layer" in capsys.readouterr().err
    assert main(["export", "delphi", ref.path, str(tmp_path / "no" / "x")]) == 2
    import importlib.util

    has_extra = importlib.util.find_spec("safetensors") is not None  # the 3.13 leg has the core install only
    assert ("does not exist" if has_extra else "needs the 'export' extra") in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "no").exists()


@pytest.mark.extract
def test_delphi_latent_dataset_reads_a_demo_export(tiny_cache, tmp_path, request):
    """delphi's own LatentDataset builds its train examples from an export of the tiny-model run
    (where eai-delphi and its dependencies are installed; skipped otherwise)."""
    import asyncio

    pytest.importorskip("safetensors", reason="needs the 'export' extra (safetensors)")
    torch = pytest.importorskip("torch")
    latents = pytest.importorskip("delphi.latents", reason="delphi (eai-delphi) is not installed")
    config = pytest.importorskip("delphi.config")
    from transformers import AutoTokenizer

    from saestore.export.delphi import export_delphi
    from saestore.extract.launch import main as extract

    runs = tmp_path / "runs"
    assert extract(["--model", "tiny", "--dataset_name", "demo", "--layers", "3", "--layer_types", "res",
                    "--sae_features_width", "1k", "--max_seq_len", "64", "--output_dir", str(runs), "--run_name",
                    "d", "--quiet"]) == 0
    run = runs / "demo" / "tiny" / "d.zarr"
    export_delphi(str(run), tmp_path / "delphi", show_progress=False)
    n_tok = saestore.open_run(run).sizes["tok"]
    tok = AutoTokenizer.from_pretrained(tiny_cache / "tiny-v1" / "tokenizer")
    ds = latents.LatentDataset(
        tmp_path / "delphi" / "latents", config.SamplerConfig(n_examples_train=5, n_examples_test=2, n_quantiles=2),
        config.ConstructorConfig(example_ctx_len=next(n for n in (32, 21, 16, 9, 8, 7) if n_tok % n == 0),
                                 min_examples=5, n_non_activating=2, non_activating_source="random"),
        tokenizer=tok, modules=["layers.3"], latents={"layers.3": torch.arange(0, 20)})

    async def records():
        return [rec async for rec in ds]

    got = asyncio.run(records())
    assert got and all(len(r.train) > 0 for r in got)
    assert all(float(ex.activations.max()) > 0 for r in got for ex in r.train)
