"""Model / SAE layer of extraction: registry resolution, the tiny bundle, loading, checks."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.needs import module_needs

module_needs("extract")

import torch

from saestore.errors import ExtractionConfigError
from saestore.extract import tiny
from saestore.extract.corpus import DEMO_AUTHOR_VOCAB, demo_corpus
from saestore.extract.models import (
    SAESpec,
    check_sae_matches_model,
    load_model,
    load_sae,
    resolve_saes,
    tokenize,
    validate_model_name,
)

DOCUMENTED_L0 = {"1k": (20.0, 45.0), "16k": (45.0, 90.0)}


@pytest.fixture(scope="module")
def tiny_model(tiny_cache):
    return load_model("tiny", "cpu")


@pytest.fixture(scope="module")
def tiny_saes(tiny_cache):
    """Every tiny SAE: ``(layer_type, layer, width) -> (spec, sae)``."""
    out = {}
    for width in tiny.TINY_WIDTHS:
        for spec in resolve_saes("tiny", ["res", "mlp", "att"], [0, 1, 2, 3], width):
            out[(spec.layer_type, spec.layer, width)] = (spec, load_sae(spec, "cpu"))
    return out


@pytest.fixture(scope="module")
def demo_acts(tiny_model):
    """Clean activations of every SAE hook on every fourth demo document (non-BOS tokens)."""
    texts = [r["text"] for r in demo_corpus()][::4]
    hooks = [tiny.tiny_hook_name(lt, layer) for lt in ("res", "mlp", "att") for layer in range(4)]
    with torch.no_grad():
        ids, mask = tokenize(tiny_model, texts, 256)
        _, cache = tiny_model.run_with_cache(
            ids, attention_mask=mask, names_filter=hooks, return_type=None
        )
    keep = mask.clone()
    keep[:, 0] = False
    return {h: cache[h][keep] for h in hooks}, ids[keep]


def _fires(sae, acts):
    """Boolean (token, feature) firing matrix, encoded in blocks to bound memory."""
    with torch.no_grad():
        return torch.cat([sae.encode(acts[i : i + 256]) > 0 for i in range(0, len(acts), 256)])


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ExtractionConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# Gemma Scope registry (offline)


def test_resolve_canonical_gemma_2b():
    specs = resolve_saes("google/gemma-2-2b", ["res", "mlp", "att"], [3, 12], "16k")
    assert [(s.layer_type, s.layer) for s in specs] == [
        ("res", 3), ("res", 12), ("mlp", 3), ("mlp", 12), ("att", 3), ("att", 12)
    ]
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    for s in specs:
        assert s.release == f"gemma-scope-2b-pt-{s.layer_type}-canonical"
        assert s.sae_id == f"layer_{s.layer}/width_16k/canonical"
        folder = directory[s.release].saes_map[s.sae_id]
        assert s.expected_l0 == float(re.search(r"average_l0_(\d+)", folder).group(1))
        assert s.d_sae == 16384 and s.local_path is None
    assert [s.hook_name for s in specs[::2]] == [
        "blocks.3.hook_resid_post", "blocks.3.hook_mlp_out", "blocks.3.attn.hook_z"
    ]
    assert json.loads(json.dumps(specs[0].to_json())) == specs[0].to_json()
    assert SAESpec(**specs[0].to_json()) == specs[0]
    # bare model names resolve the same
    assert resolve_saes("gemma-2-2b", ["res", "mlp", "att"], [3, 12], "16k") == specs


@pytest.mark.parametrize(
    ("model", "layer", "width", "target", "expected"),
    [
        ("google/gemma-2-9b-it", 9, "131k", 60, "layer_9/width_131k/average_l0_67"),
        ("google/gemma-2-2b", 12, "131k", 50, "layer_12/width_131k/average_l0_36"),
        ("google/gemma-2-2b", 12, "16k", 1, None),
    ],
)
def test_resolve_target_l0_picks_closest(model, layer, width, target, expected):
    (spec,) = resolve_saes(model, ["res"], [layer], width, target_l0=target)
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    ids = get_pretrained_saes_directory()[spec.release].saes_map
    assert spec.release.endswith("-res") and spec.sae_id in ids
    pattern = rf"layer_{layer}/width_{width}/average_l0_(\d+)"
    l0s = [int(m.group(1)) for i in ids if (m := re.fullmatch(pattern, i))]
    assert spec.expected_l0 == min(l0s, key=lambda n: abs(n - target))
    if expected is not None:
        assert spec.sae_id == expected


def test_resolve_error_messages_name_what_exists():
    assert _one_line_error(resolve_saes, "google/gemma-2-9b-it", ["res"], [10], "16k") == (
        "gemma-2-9b-it has res SAEs only at layers 9, 20, 31"
    )
    assert _one_line_error(resolve_saes, "google/gemma-2-2b", ["res"], [3], "1m") == (
        "gemma-2-2b has no 1m res SAE at layer 3; widths there: 16k, 65k"
    )
    assert _one_line_error(resolve_saes, "gemma-2-2b", ["res"], [30], "16k") == (
        "gemma-2-2b has res SAEs only at layers 0-25"
    )
    msg = _one_line_error(resolve_saes, "gemma-2-9b-it", ["mlp"], [9], "16k")
    assert msg == "gemma-2-9b-it has no mlp SAEs; layer types with SAEs: res"
    msg = _one_line_error(resolve_saes, "gemma-2-2b", ["res"], [3], "2k")
    assert msg.startswith("unknown width '2k'") and "16k, 32k, 65k, 131k, 262k, 524k, 1m" in msg
    msg = _one_line_error(resolve_saes, "gemma-2-2b", ["res"], [12], "131k")
    assert "no canonical 131k res SAE at layer 12" in msg and "--target_l0" in msg
    msg = _one_line_error(resolve_saes, "foo", ["res"], [3], "16k")
    assert msg.startswith("unknown model 'foo': choose tiny, google/gemma-2-2b, google/gemma-2-9b")
    assert "TransformerLens model name" in msg and "local path" in msg
    msg = _one_line_error(resolve_saes, "gemma-2-2b", ["resid"], [3], "16k")
    assert "unknown layer type 'resid'" in msg
    assert "--target_l0" not in _one_line_error(
        resolve_saes, "gemma-2-2b", ["res"], [3], "16k", target_l0=-1
    )
    # a TransformerLens model without Gemma Scope SAEs needs --sae_path
    assert "--sae_path" in _one_line_error(resolve_saes, "gpt2", ["res"], [3], "16k")


def test_validate_model_name(tmp_path):
    assert validate_model_name("tiny") == "tiny"
    assert validate_model_name("gemma-2-9b-it") == "google/gemma-2-9b-it"
    assert validate_model_name("gpt2") == "gpt2"
    assert "does not exist" in _one_line_error(validate_model_name, str(tmp_path / "nope"))
    assert "no config.json" in _one_line_error(validate_model_name, str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert validate_model_name(str(tmp_path)) == str(tmp_path.resolve())


# ----------------------------------------------------------------------------------------------
# the tiny bundle


def test_tiny_registry_resolution(tiny_cache):
    specs = resolve_saes("tiny", ["res", "att"], [0, 3], "1k")
    assert [(s.layer_type, s.layer) for s in specs] == [("res", 0), ("res", 3), ("att", 0), ("att", 3)]
    for s in specs:
        assert Path(s.local_path, "cfg.json").is_file() and s.release is None and s.d_sae == 1024
        assert s.hook_name == tiny.tiny_hook_name(s.layer_type, s.layer)
        lo, hi = DOCUMENTED_L0["1k"]
        assert lo <= s.expected_l0 <= hi
    registry = tiny.tiny_registry()
    assert len(registry) == 3 * 4 * len(tiny.TINY_WIDTHS)
    assert _one_line_error(resolve_saes, "tiny", ["res"], [4], "1k") == (
        "tiny has res SAEs only at layers 0-3"
    )
    assert _one_line_error(resolve_saes, "tiny", ["res"], [0], "65k") == (
        "tiny has no 65k SAEs; widths: 1k, 16k"
    )


def test_tiny_bundle_is_deterministic(tiny_cache, tmp_path):
    """A second build (1k res SAEs only) reproduces the session bundle byte for byte."""
    again = tmp_path / "again"
    again.mkdir()
    tiny.write_tiny_bundle(again, widths={"1k": 1024}, layer_types=["res"])
    first = tiny_cache / tiny.TINY_BUNDLE_NAME
    files = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
             "model/model.safetensors", "model/config.json"]
    files += [f"saes/res/layer_{layer}/width_1k/{name}" for layer in range(4)
              for name in ("sae_weights.safetensors", "cfg.json")]
    for f in files:
        assert (first / f).read_bytes() == (again / f).read_bytes(), f
    vocab = json.loads((first / "tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    assert 1000 <= len(vocab) <= 2000

    def entries(bundle):
        saes = json.loads((bundle / "registry.json").read_text())["saes"]
        return [{k: v for k, v in e.items() if k != "l0_spliced"} for e in saes
                if e["width"] == "1k" and e["layer_type"] == "res"]

    assert entries(first) == entries(again) and len(entries(first)) == 4


def test_build_is_atomic_and_reuses_a_finished_bundle(tmp_path, monkeypatch):
    """A finished bundle is returned as is; a concurrent winner's bundle is kept."""

    calls = []
    version = tiny._BUILD_VERSION

    def fake_write(dest, *, widths=None, layer_types=None):
        calls.append(dest)
        (dest / "registry.json").write_text(json.dumps({"who": "loser", "build_version": version}))
        winner = tmp_path / tiny.TINY_BUNDLE_NAME  # another process finishes first
        winner.mkdir(exist_ok=True)
        (winner / "registry.json").write_text(json.dumps({"who": "winner", "build_version": version}))
        (winner / "x").write_text("not empty")

    monkeypatch.setattr(tiny, "write_tiny_bundle", fake_write)
    bundle = tiny.build_tiny_bundle(tmp_path)
    assert bundle == tmp_path / tiny.TINY_BUNDLE_NAME
    assert json.loads((bundle / "registry.json").read_text())["who"] == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.TINY_BUNDLE_NAME]  # temp removed
    assert tiny.build_tiny_bundle(tmp_path) == bundle and len(calls) == 1
    # a bundle from an older builder is replaced
    (bundle / "registry.json").write_text(json.dumps({"who": "old", "build_version": version - 1}))
    calls.clear()
    monkeypatch.setattr(tiny, "write_tiny_bundle", lambda dest, *, widths=None, layer_types=None: (
        calls.append(dest),
        (dest / "registry.json").write_text(json.dumps({"who": "new", "build_version": version})),
    ))
    assert tiny.build_tiny_bundle(tmp_path) == bundle and len(calls) == 1
    assert json.loads((bundle / "registry.json").read_text())["who"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.TINY_BUNDLE_NAME]
    assert (bundle.stat().st_mode & 0o777) == 0o755


def test_tiny_model_tokenizer_pads_right_with_bos(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.padding_side == "right"
    ids, mask = tokenize(tiny_model, ["Anchor the harbor!", "Simmer the garlic slowly, then whisk."], 64)
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert (ids[:, 1:] != tok.bos_token_id).all()
    n = mask.sum(1)
    assert n[0] < n[1] and not mask[0, n[0]:].any() and (ids[0, n[0]:] == tok.pad_token_id).all()
    assert torch.equal(ids[0, : n[0]], tiny_model.to_tokens("Anchor the harbor!")[0])
    ids_short, mask_short = tokenize(tiny_model, [demo_corpus()[0]["text"]], 8)
    assert ids_short.shape == (1, 8) and mask_short.all()
    assert tiny_model.cfg.n_layers == 4 and tiny_model.cfg.d_model == 64


@pytest.mark.parametrize("width", list(tiny.TINY_WIDTHS))
def test_tiny_sae_l0_in_documented_range(tiny_saes, demo_acts, width):
    acts, _ = demo_acts
    lo, hi = DOCUMENTED_L0[width]
    for (lt, layer, w), (spec, sae) in tiny_saes.items():
        if w != width:
            continue
        l0 = float(_fires(sae, acts[spec.hook_name]).sum(-1).float().mean())
        assert lo <= l0 <= hi, (lt, layer, width, l0)
        # expected_l0 comes from other tokens; att features depend strongly on the author mix
        assert abs(l0 - spec.expected_l0) <= 0.25 * spec.expected_l0, (lt, layer, l0, spec.expected_l0)


@pytest.mark.parametrize("width", list(tiny.TINY_WIDTHS))
def test_author_vocab_features_exist(tiny_model, tiny_saes, demo_acts, width):
    """For every author some res feature fires far more on its distinctive words than elsewhere."""
    acts, ids = demo_acts
    _, sae = tiny_saes[("res", 2, width)]
    fires = _fires(sae, acts["blocks.2.hook_resid_post"])
    for author, words in DEMO_AUTHOR_VOCAB.items():
        word_ids = [tiny_model.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
        on = torch.isin(ids, torch.tensor([w[0] for w in word_ids if len(w) == 1]))
        assert on.sum() > 50
        rate_on = fires[on].float().mean(0)
        rate_off = fires[~on].float().mean(0)
        good = (rate_on >= 0.03) & (rate_on >= 20 * rate_off)
        assert good.any(), author


def test_loaded_saes_splice_into_the_model(tiny_model, tiny_saes):
    saes = [sae for (lt, layer, w), (spec, sae) in tiny_saes.items() if w == "1k" and layer == 1]
    ids, mask = tokenize(tiny_model, ["The captain tied the rope to the mast!"] * 2, 32)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache_with_saes(
            ids, saes=saes, use_error_term=True, attention_mask=mask,
            names_filter=lambda n: n.endswith("hook_sae_acts_post"),
        )
    for name in ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"):
        assert cache[f"{name}.hook_sae_acts_post"].shape == (2, ids.shape[1], 1024)


# ----------------------------------------------------------------------------------------------
# local SAEs (sae_path) and checks


def test_sae_path_layouts(tiny_cache, tmp_path):
    bundle_saes = tiny_cache / tiny.TINY_BUNDLE_NAME / "saes"
    via_path = resolve_saes("tiny", ["res", "mlp"], [1, 2], "16k", sae_path=str(bundle_saes))
    via_tiny = resolve_saes("tiny", ["res", "mlp"], [1, 2], "16k")
    assert [s.local_path for s in via_path] == [s.local_path for s in via_tiny]
    assert all(s.expected_l0 is None and s.d_sae == 16384 for s in via_path)
    # {T}/layer_{L}/ without a width folder
    shutil.copytree(bundle_saes / "mlp" / "layer_0" / "width_1k", tmp_path / "mlp" / "layer_0")
    (spec,) = resolve_saes("tiny", ["mlp"], [0], "1k", sae_path=str(tmp_path))
    assert spec.local_path == str((tmp_path / "mlp" / "layer_0").resolve())
    # a hook that does not match the requested layer is refused before loading
    shutil.copytree(bundle_saes / "res" / "layer_1" / "width_1k", tmp_path / "res" / "layer_2")
    msg = _one_line_error(resolve_saes, "tiny", ["res"], [2], "1k", sae_path=str(tmp_path))
    assert "'blocks.1.hook_resid_post'" in msg and "'blocks.2.hook_resid_post'" in msg
    msg = _one_line_error(resolve_saes, "tiny", ["att"], [3], "1k", sae_path=str(tmp_path))
    assert "att/layer_3/width_1k/" in msg
    # a known width label must match the SAE's size
    assert "1024 features, not the 16384" in _one_line_error(
        resolve_saes, "tiny", ["mlp"], [0], "16k", sae_path=str(tmp_path)
    )


def _write_npz(folder: Path, rng: np.random.Generator, d_in: int = 64, d_sae: int = 1024) -> dict:
    folder.mkdir(parents=True)
    params = {
        "w_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "w_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": np.abs(rng.normal(size=d_sae)).astype(np.float32) + 1.0,
    }
    np.savez(folder / "params.npz", **params)
    return params


def test_gemma_scope_npz_layout(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    params = {n: _write_npz(tmp_path / "layer_2" / "width_1k" / f"average_l0_{n}", rng) for n in (10, 40)}
    (spec,) = resolve_saes("tiny", ["res"], [2], "1k", target_l0=35, sae_path=str(tmp_path))
    assert spec.expected_l0 == 40.0 and spec.local_path.endswith("average_l0_40")
    assert "several L0s" in _one_line_error(resolve_saes, "tiny", ["res"], [2], "1k", sae_path=str(tmp_path))
    sae = load_sae(spec, "cpu")
    check_sae_matches_model(sae, tiny_model, spec)
    p = params[40]
    x = rng.normal(size=(5, 64)).astype(np.float32)
    pre = x @ p["w_enc"] + p["b_enc"]
    expected = np.where(pre > p["threshold"], np.maximum(pre, 0), 0)
    with torch.no_grad():
        got = sae.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # an att SAE from params.npz reshapes hook_z
    _write_npz(tmp_path / "att" / "layer_1", rng)
    (att,) = resolve_saes("tiny", ["att"], [1], "1k", sae_path=str(tmp_path))
    att_sae = load_sae(att, "cpu")
    assert att_sae.cfg.reshape_activations == "hook_z"
    check_sae_matches_model(att_sae, tiny_model, att)


def test_d_in_mismatch_is_refused(tiny_model, tmp_path):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(
        d_in=32, d_sae=1024, apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"),
    ))
    sae.save_model(tmp_path / "res" / "layer_0" / "width_1k")
    (spec,) = resolve_saes("tiny", ["res"], [0], "1k", sae_path=str(tmp_path))
    loaded = load_sae(spec, "cpu")
    msg = _one_line_error(check_sae_matches_model, loaded, tiny_model, spec)
    assert "d_in 32" in msg and "width 64" in msg and "blocks.0.hook_resid_post" in msg
    late = SAESpec(**{**spec.to_json(), "layer": 7, "hook_name": "blocks.7.hook_resid_post"})
    assert "layers 0-3" in _one_line_error(check_sae_matches_model, loaded, tiny_model, late)


# ----------------------------------------------------------------------------------------------
# other model sources and offline failures


def test_local_llama_checkpoint_matches_hf(tiny_cache, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_cache / tiny.TINY_BUNDLE_NAME / "tokenizer")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), "cpu")
    ids, mask = tokenize(model, ["Anchor the harbor at night!", "Simmer"], 32)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).log_softmax(-1)[mask]
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits.log_softmax(-1)[mask]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.fixture
def hub_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_model_offline_error(hub_offline):
    t0 = time.perf_counter()
    msg = _one_line_error(load_model, "google/gemma-2-2b", "cpu")
    assert time.perf_counter() - t0 < 30
    assert "not in the local Hugging Face cache" in msg and "HF_HOME" in msg


def test_hub_sae_offline_error(hub_offline):
    (spec,) = resolve_saes("google/gemma-2-2b", ["res"], [3], "16k")
    msg = _one_line_error(load_sae, spec, "cpu")
    assert "gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical" in msg
    assert "not in the local Hugging Face cache" in msg


def test_bad_dtype(tiny_cache):
    assert "unknown dtype 'float8'" in _one_line_error(load_model, "tiny", "cpu", "float8")


def test_config_hash_covers_content_fields_and_skips_run_options():
    """A field is hashed unless its type says RunOption: changing any content field changes the hash,
    changing any run option does not (so resume works with another batch size or output folder)."""
    import dataclasses

    from saestore import protocol
    from saestore.extract.config import ExtractConfig

    base = ExtractConfig(layers=(1,), max_seq_len=16)
    options = set(ExtractConfig.run_options())
    assert options == {"output_dir", "run_name", "devices", "resume", "overwrite", "registry", "batch_size", "quiet"}
    changed = {"layers": (2,), "model": "tiny", "layer_types": ("res",), "sae_features_width": "1k", "target_l0": 5.0,
               "sae_path": "x", "dataset_name": "demo", "dataset_path": "y", "category_name": "z",
               "author_column": "a", "text_column": "t", "doc_columns": ("category",), "n_docs": 3, "n_docs_per_author": 2, "min_length_doc": 1,
               "min_docs_per_author": 2, "exclude_authors": ("b",), "setting": "prompted",
               "prompt_template": "{style}!", "storage_format": "dense", "value_dtype": "float16", "dtype": "float16",
               "max_seq_len": 17, "chunk_docs": 2, "shard_docs": 8, "use_error_term": True, "loss_recovered": True, "logit_k": 3,
               "devices": "cpu:2", "output_dir": "o", "run_name": "r", "resume": True, "registry": "q.sqlite",
               "batch_size": 3, "quiet": True}
    assert set(changed) | {"overwrite"} == {f.name for f in dataclasses.fields(ExtractConfig)}
    h0 = protocol.config_hash(base.semantic())
    unused = {"prompt_template"}  # by the baseline setting: left out of the hash (normalize_config)
    for name, value in changed.items():
        h = protocol.config_hash(dataclasses.replace(base, **{name: value}).semantic())
        assert (h == h0) == (name in options | unused), name
    prompted = dataclasses.replace(base, setting="prompted")
    assert (protocol.config_hash(dataclasses.replace(prompted, prompt_template="{style}!").semantic())
            != protocol.config_hash(prompted.semantic()))
    # sets in one order: the store sorts layers and layer types
    same = [dataclasses.replace(base, layers=(3, 1), layer_types=("res", "att"), exclude_authors=("b", "a")),
            dataclasses.replace(base, layers=(1, 3), layer_types=("att", "res"), exclude_authors=("a", "b"))]
    assert len({protocol.config_hash(c.semantic()) for c in same}) == 1
    # no doc columns hashes as a run made before --doc_columns existed (it stays resumable)
    assert "doc_columns" not in base.semantic() and "logit_k" not in base.semantic()


def test_every_layer_type_has_one_hook_site():
    """A layer type is one name in protocol.LayerType plus one row of extract/hooks.py."""
    from saestore import protocol
    from saestore.extract import hooks

    assert tuple(hooks.SITES) == protocol.LAYER_TYPES
    assert hooks.forward_hooks(1) == ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    with pytest.raises(ExtractionConfigError, match="unknown layer type 'xyz': choose res, mlp, att"):
        hooks.hook_name("xyz", 0)


def test_default_run_name_sorts_layers_and_finds_a_run_named_as_typed(tmp_path):
    """``--layers 3 1`` and ``--layers 1 3`` name one run (layers sorted); a run made before, named with
    the layers as typed, is still found there (and resumed) by the same command."""
    from saestore.extract.config import ExtractConfig

    typed = ExtractConfig(layers=(3, 1), model="tiny", dataset_name="demo", output_dir=str(tmp_path))
    ordered = ExtractConfig(layers=(1, 3), model="tiny", dataset_name="demo", output_dir=str(tmp_path))
    assert typed.run_path() == ordered.run_path() == str(tmp_path / "demo" / "tiny" / "baseline_all_L1-3_w16k.zarr")
    legacy = tmp_path / "demo" / "tiny" / "baseline_all_L3-1_w16k.zarr"
    legacy.mkdir(parents=True)
    assert typed.run_path() == str(legacy) and Path(ordered.run_path()).name == "baseline_all_L1-3_w16k.zarr"


def test_help_says_each_default_once_and_a_bare_command_names_the_offline_defaults(tmp_path, capsys, monkeypatch):
    """``--help`` shows each default once (none for options without one), the prompt with repr (its
    trailing newline visible); a bare ``--layers 1`` fails on the hub defaults in one line that names
    the built-in offline ones (``--model tiny --dataset_name demo``), and leaves nothing behind."""
    import re

    from saestore.extract.config import DEFAULT_PROMPT, ExtractConfig, make_parser, offline_hint
    from saestore.extract.launch import main

    text = " ".join(make_parser().format_help().split())
    assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text
    options = re.split(r" (?=--\w+ [A-Z{])", text.split("options:", 1)[1])
    assert all(o.lower().count("default") <= 1 for o in options), [o for o in options if o.lower().count("default") > 1]
    assert f"(default: {DEFAULT_PROMPT!r})" in text  # repr: the trailing newline shows as \\n
    assert "(default: google/gemma-2-9b-it)" in text and "(default: 0)" in text and "--model tiny --dataset_name demo" in text
    monkeypatch.chdir(tmp_path)
    assert main(["--layers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gemma-2-9b-it has res SAEs only at layers" in err, err
    assert "--model google/gemma-2-9b-it is the default" in err and "--model tiny --dataset_name demo" in err
    assert not list(tmp_path.iterdir())
    hub = "cannot load 'hallisky/AuthorMix' from the Hugging Face hub"
    assert "--dataset_name AuthorMix is the default" in offline_hint([ExtractConfig(layers=(1,))], hub)
    assert offline_hint([ExtractConfig(layers=(1,), dataset_path="x.csv")], hub) == ""
    assert offline_hint([ExtractConfig(layers=(1,), model="tiny", dataset_name="demo")], "layer 9") == ""
