"""Bad input, table-driven: every case gets what a user would expect, a clear typed error or a
recorded, documented handling. ``CASES`` is the table (its keys are the test ids); the handling of
each case is in its docstring. Also: nothing executes from data (no pickle/eval/exec, weights and
arrays loaded without pickle, attribute and codec JSON validated before use).

Extractions run in this process (``main(argv)``, one torch thread) on a small JSON-lines corpus
built from the demo corpus plus the bad rows, shared by the cases that only look at its result.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import saestore
from saestore import protocol
from saestore.errors import ProtocolError, ProtocolVersionError
from saestore.extract.corpus import demo_corpus

N_TOK = 23
ARGS = ["--model", "tiny", "--layers", "1", "--layer_types", "res", "--sae_features_width", "1k",
        "--max_seq_len", str(N_TOK + 1), "--chunk_docs", "2", "--batch_size", "4", "--devices", "cpu", "--quiet",
        "--min_length_doc", "3"]
NAMES = {"slash": "a/b", "dotdot": "..", "control": "ctl\tname\x07\x1b[31m\x00end", "long": "L" * 1000,
         "dup": "dup", "dup_ws": "Dup ", "unicode": "émoji ✨"}


@contextlib.contextmanager
def _one_thread():
    """One torch thread per extraction (the CLI takes cpu_count // workers; two threads spin on a
    shared 2-core machine). Restored after: other tests' float results depend on the thread count."""
    import torch

    real, threads = os.cpu_count, torch.get_num_threads()
    os.cpu_count = lambda: 1
    try:
        yield
    finally:
        os.cpu_count = real
        torch.set_num_threads(threads)


def extract(out: Path, dataset: Path | None, *args: str) -> tuple[int, str, str]:
    """``python -m saestore.extract`` in this process: (exit code, stderr, log text)."""
    from saestore.extract.launch import main

    data = ["--dataset_name", "AuthorMix", "--dataset_path", str(dataset)] if dataset else ["--dataset_name", "demo"]
    err, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logger = logging.getLogger("saestore")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with _one_thread(), contextlib.redirect_stderr(err):
            code = main([*ARGS, *data, "--output_dir", str(out), *args])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return code, err.getvalue(), logs.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The shared corpus: two short documents per odd author name, plus every bad row."""
    out = tmp_path_factory.mktemp("bad_input")
    texts = [d["text"] for d in demo_corpus(6)]
    rows = []
    for i, name in enumerate(NAMES.values()):
        rows += [{"style": name, "text": texts[2 * i][:80]}, {"style": name, "text": texts[2 * i + 1][:60]}]
    rows += [
        {"style": "dup", "text": "Anchor the harbor at dawn"},  # a later row of an earlier author
        {"style": "a/b", "text": ""}, {"style": "a/b", "text": "  \n\t "}, {"style": "..", "text": None},
        {"style": "a/b", "text": texts[20]},  # far longer than max_seq_len
        {"style": "shorty", "text": "hi there"},  # below --min_length_doc: the author is left with nothing
        {"style": "   ", "text": texts[21][:50]}, {"style": None, "text": texts[22][:50]},  # no author
        {"style": 42, "text": 12345.5}, {"style": 7, "text": "seven is a number"},  # not strings
        {"style": "émoji ✨", "text": "naïve café — 東京 🚀 ok ẞ"},
    ]
    dataset = _jsonl(out / "bad.jsonl", rows)
    return {"out": out, "dataset": dataset, "rows": rows}


@pytest.fixture(scope="module")
def data_run(corpus, tiny_cache) -> dict:
    code, err, logs = extract(corpus["out"], corpus["dataset"], "--run_name", "data")
    assert code == 0, err + logs
    path = corpus["out"] / "AuthorMix" / "tiny" / "data.zarr"
    ds = xr.open_zarr(path)
    return {**corpus, "path": path, "ds": ds, "logs": logs,
            "authors": [str(a) for a in ds.author.values]}


def _docs(run: dict, author: str) -> list[str]:
    ds = run["ds"]
    a = run["authors"].index(author)
    return [str(t) for t in ds.text.values[a, : int(ds.n_docs.values[a])]]


def _refused(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("saestore.extract: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------

def case_empty_texts(request):
    """Empty texts are dropped before extraction and counted in the log."""
    run = request.getfixturevalue("data_run")
    assert "" not in _docs(run, "a/b")
    assert "dropped 3 empty documents" in run["logs"]


def case_whitespace_only_texts(request):
    """Whitespace-only texts count as empty: dropped and counted."""
    run = request.getfixturevalue("data_run")
    assert all(t.strip() for a in run["authors"] for t in _docs(run, a))


def case_missing_text_values(request):
    """A null text is an empty text: dropped."""
    run = request.getfixturevalue("data_run")
    assert len(_docs(run, "..")) == 2


def case_non_utf8_bytes_in_file(request):
    """A file that is not UTF-8: DatasetError naming the file and the byte, with the fix; nothing written."""
    out = request.getfixturevalue("tmp_path")
    for name, raw in [("latin1.csv", "style,text\nann,café naïve text here\n".encode("latin-1")),
                      ("bad.jsonl", b'{"style": "ann", "text": "hello \xff\xfe world here"}\n')]:
        (out / name).write_bytes(raw)
        code, err, _ = extract(out, out / name, "--run_name", "x")
        _refused(code, err, name, "not UTF-8", "iconv")
    assert not list(out.rglob("*.zarr")) and not (out / "saestore_runs.sqlite").exists()


def _verbatim(request, key: str) -> None:
    run = request.getfixturevalue("data_run")
    name = NAMES[key]
    assert name in run["authors"]  # a coordinate value, byte for byte
    assert _docs(run, name)[0] == [r for r in run["rows"] if r["style"] == name][0]["text"]
    files = [p.relative_to(run["out"]).as_posix() for p in run["out"].rglob("*")]
    assert all(name not in f for f in files if key != "dup")  # never a path (PROTOCOL.md §2.1)
    assert all(f.startswith(("AuthorMix", "bad.jsonl", "saestore_runs")) for f in files)


def case_author_name_with_slash(request):
    """'a/b' is stored verbatim as an author coordinate; no path is derived from it."""
    _verbatim(request, "slash")


def case_author_name_dotdot(request):
    """'..' likewise: a value, never a path."""
    _verbatim(request, "dotdot")


def case_author_name_control_characters(request):
    """Tab, BEL, ESC and NUL in a name survive verbatim (and in a fresh xr.open_zarr)."""
    _verbatim(request, "control")


def case_author_name_very_long(request):
    """A 1000-character name is stored verbatim."""
    _verbatim(request, "long")


def case_author_name_unicode(request):
    """Non-ASCII names and texts round-trip exactly (UTF-8)."""
    _verbatim(request, "unicode")
    assert "naïve café — 東京 🚀 ok ẞ" in _docs(request.getfixturevalue("data_run"), "émoji ✨")


def case_author_name_duplicate_rows(request):
    """Rows with the same author name are one author; its documents keep source order (doc_id)."""
    run = request.getfixturevalue("data_run")
    a = run["authors"].index("dup")
    assert _docs(run, "dup")[2] == "Anchor the harbor at dawn"
    ids = run["ds"].doc_id.values[a, :3]
    assert list(ids) == sorted(ids)


def case_author_names_differing_in_case_or_space(request):
    """'dup' and 'Dup ' are two authors: names are taken verbatim, never normalized or merged."""
    run = request.getfixturevalue("data_run")
    assert {"dup", "Dup "} <= set(run["authors"]) and len(set(run["authors"])) == len(run["authors"])


def case_author_name_empty_or_missing(request):
    """Rows without an author (null, '', whitespace) are skipped and counted in the log."""
    run = request.getfixturevalue("data_run")
    assert "skipped 2 rows" in run["logs"] and not any(not a.strip() for a in run["authors"])


def case_non_string_values(request):
    """Numbers in the author or text column are read as their text ('7'); '12345.5' is one word, too short."""
    run = request.getfixturevalue("data_run")
    assert "7" in run["authors"] and "42" not in run["authors"]
    assert _docs(run, "7") == ["seven is a number"]


def case_document_longer_than_max_seq_len(request):
    """Truncated to its first max_seq_len - 1 tokens; the dropped count is in n_truncated."""
    from transformers import AutoTokenizer

    from saestore.extract.tiny import build_tiny_bundle

    run = request.getfixturevalue("data_run")
    ds = run["ds"]
    tok = AutoTokenizer.from_pretrained(build_tiny_bundle() / "tokenizer")
    long_text = [r["text"] for r in run["rows"] if r["style"] == "a/b"][-1]
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) > 4 * N_TOK
    n_truncated = 0
    for a, author in enumerate(run["authors"]):
        for d, text in enumerate(_docs(run, author)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert int(ds.doc_length.values[a, d]) == min(len(ids), N_TOK)
            assert int(ds.n_truncated.values[a, d]) == max(0, len(ids) - N_TOK)
            np.testing.assert_array_equal(ds.token_id.values[a, d, : min(len(ids), N_TOK)], ids[:N_TOK])
            n_truncated += len(ids) > N_TOK
    assert n_truncated >= 1


def case_document_shorter_than_minimum(request):
    """Below --min_length_doc words: dropped; an author left with no document is dropped, and logged."""
    run = request.getfixturevalue("data_run")
    assert "shorty" not in run["authors"] and "dropped author 'shorty'" in run["logs"]


def case_empty_dataset_file(request):
    """An empty file, or a header without rows: DatasetError 'has no rows'; nothing written."""
    out = request.getfixturevalue("tmp_path")
    for name, raw in [("empty.jsonl", b""), ("header.csv", b"style,text\n")]:
        (out / name).write_bytes(raw)
        code, err, _ = extract(out, out / name, "--run_name", "x")
        _refused(code, err, "has no rows")
    assert not list(out.rglob("*.zarr"))


def case_every_document_filtered_out(request):
    """Nothing left after the filters: DatasetError saying how many were read and why they went."""
    out = request.getfixturevalue("tmp_path")
    data = _jsonl(out / "d.jsonl", [{"style": "ann", "text": ""}, {"style": "bob", "text": "too short"}])
    code, err, _ = extract(out, data, "--run_name", "x")
    _refused(code, err, "no documents left", "2 read", "1 empty")


def case_dataset_name_of_your_own(request):
    """``--dataset_name NAME --dataset_path FILE``: NAME is the run's dataset folder, so an unsafe one
    ('../up', 'a/b') is refused in one line before anything is read or written; without
    --dataset_path an unknown name is refused naming the known ones and --dataset_path."""
    run = request.getfixturevalue("corpus")
    out = request.getfixturevalue("tmp_path")
    for bad in ("../up", "a/b", ".."):
        code, err, _ = extract(out, run["dataset"], "--dataset_name", bad, "--run_name", "x")
        _refused(code, err, "--dataset_name", "cannot be part of a path")
    code, err, _ = extract(out, None, "--dataset_name", "mycsv", "--run_name", "x")
    _refused(code, err, "unknown dataset 'mycsv'", "demo, AuthorMix, news", "--dataset_path")
    assert not list(out.iterdir()) and not (out.parent / "up").exists()


@pytest.fixture(scope="module")
def one_author_two_workers(corpus, tiny_cache) -> dict:
    data = _jsonl(corpus["out"] / "one.jsonl", [{"style": "solo", "text": t["text"][:70]} for t in demo_corpus(3)[:3]])
    code, err, logs = extract(corpus["out"], data, "--run_name", "one", "--devices", "cpu:2")
    return {"code": code, "err": err, "logs": logs, "path": corpus["out"] / "AuthorMix" / "tiny" / "one.zarr"}


def case_one_author_only(request):
    """A corpus of one author is a run of one author."""
    run = request.getfixturevalue("one_author_two_workers")
    assert run["code"] == 0, run["err"]
    ds = xr.open_zarr(run["path"])
    assert list(ds.author.values) == ["solo"] and ds.attrs["saestore"]["status"] == "complete"


def case_more_workers_than_authors(request):
    """Workers without an author do nothing (logged); the run completes."""
    run = request.getfixturevalue("one_author_two_workers")
    assert run["code"] == 0, run["err"]
    assert "worker 1 (cpu) has no author: 2 workers for 1 authors" in run["logs"]


def case_sae_d_in_mismatch(request):
    """An SAE whose d_in is not the hook's width: ExtractionConfigError naming both widths (exit 2),
    read from its cfg.json before the model is loaded; nothing is written (no store, no registry)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    folder = out / "saes" / "res" / "layer_1" / "width_1k"
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=1024, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.normal_()
    sae.save_model(folder)
    code, err, _ = extract(out, None, "--sae_path", str(out / "saes"), "--n_docs_per_author", "2", "--run_name", "x")
    _refused(code, err, "d_in 32", "width 64", "blocks.1.hook_resid_post")
    assert sorted(p.name for p in out.iterdir()) == ["saes"]


def case_att_sae_with_reshape_none(request):
    """An att SAE saved with ``reshape_activations='none'`` (hook_z needs 'hook_z'): refused in one
    line naming the setting, from its cfg.json, before the model is loaded; nothing is written."""
    from sae_lens import SAE

    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    sae = SAE.from_dict({"architecture": "jumprelu", "d_in": 64, "d_sae": 1024, "apply_b_dec_to_input": False,
                         "reshape_activations": "none", "metadata": {"hook_name": "blocks.1.attn.hook_z"}})
    sae.save_model(out / "saes" / "att" / "layer_1" / "width_1k")
    code, err, _ = extract(out, None, "--sae_path", str(out / "saes"), "--layer_types", "att", "--run_name", "x")
    _refused(code, err, "reshape_activations='none'", "needs hook_z")
    assert sorted(p.name for p in out.iterdir()) == ["saes"]


def case_model_not_in_the_offline_cache(request):
    """``--model google/gemma-2-2b`` with ``HF_HUB_OFFLINE=1`` and an empty cache: one line saying
    the model is not in the local Hugging Face cache and how to get it (huggingface_hub's own cache
    look-up, no network); nothing is written."""
    import subprocess
    import sys

    out = request.getfixturevalue("tmp_path")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    argv = ["--model", "google/gemma-2-2b", "--layers", "12", "--layer_types", "res", "--dataset_name", "demo",
            "--devices", "cpu", "--output_dir", str(out / "runs")]
    proc = subprocess.run([sys.executable, "-m", "saestore.extract", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("saestore.extract:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'google/gemma-2-2b' is not in the local Hugging Face cache" in lines[0], lines
    assert not (out / "runs").exists()


def case_several_models_one_refused(request):
    """``--model tiny google/gemma-2-2b`` with a width only tiny has: every model's request is checked
    before the first is extracted; one line names the refused model; nothing is written."""
    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    code, err, _ = extract(out, None, "--model", "tiny", "google/gemma-2-2b", "--run_name", "x")
    _refused(code, err, "1 of 2 models refused, nothing extracted", "google/gemma-2-2b", "1k")
    assert list(out.iterdir()) == []


def _poisoned(request, value: float) -> None:
    from saestore.extract import models

    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    real = models.load_model

    def load_poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        model.blocks[0].hook_resid_post.add_perma_hook(lambda x, hook: x + value)
        return model

    mp = request.getfixturevalue("monkeypatch")
    mp.setattr(models, "load_model", load_poisoned)
    code, err, _ = extract(out, None, "--n_docs_per_author", "2", "--exclude_authors", "lawyer", "gardener",
                           "--run_name", "x")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "3 author(s) not finished" in lines[0] and "NaN/inf logits" in lines[0] and "--dtype float32" in lines[0]
    path = out / "demo" / "tiny" / "x.zarr"
    assert xr.open_zarr(path).attrs["saestore"]["failed_authors"] == ["astronomer", "chef", "sailor"]
    assert not (zarr.open_array(str(path), path=protocol.PROGRESS_PATH)[...] != 0).any()  # nothing marked done
    assert not list((path / "res").rglob("c/*"))  # nothing stored


def case_model_output_nan(request):
    """NaN in the model: every author fails with 'NaN/inf logits ... try --dtype float32' (exit 1);
    nothing is stored, nothing is marked done."""
    _poisoned(request, float("nan"))


def case_model_output_inf(request):
    """inf in the model: the same."""
    _poisoned(request, float("inf"))


def case_prompt_longer_than_model_context(request):
    """A name so long that its prompt fills the model context: refused before anything is written,
    in one line naming the author and the fixes (a shorter template, --exclude_authors)."""
    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    data = _jsonl(out / "d.jsonl", [{"style": "ok", "text": "Anchor the harbor at dawn today"},
                                    {"style": "word " * 300, "text": "Anchor the harbor at dawn today"}])
    code, err, _ = extract(out, data, "--setting", "prompted", "--run_name", "x")
    _refused(code, err, "the prompt of author 'word word", "fills the model context 256", "--exclude_authors")
    assert sorted(p.name for p in out.iterdir()) == ["d.jsonl"]
    ok = _jsonl(out / "ok.jsonl", [{"style": "ok", "text": "Anchor the harbor at dawn today"}])
    code, err, _ = extract(out, ok, "--setting", "prompted", "--run_name", "x", "--max_seq_len", "250")
    _refused(code, err, "the prompt of author 'ok'", "+ max_seq_len - 1 (249) exceeds the model context 256",
             "pass --max_seq_len")
    assert sorted(p.name for p in out.iterdir()) == ["d.jsonl", "ok.jsonl"]


def case_prompt_template_alone_fills_the_model_context(request):
    """A 300-word --prompt_template: refused before anything is written, in one line saying the
    template alone fills the context (not per author after the store exists)."""
    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    code, err, _ = extract(out, None, "--setting", "prompted", "--prompt_template", "word " * 300 + "{style}: ",
                           "--run_name", "x")
    _refused(code, err, "the prompt template alone", "fills the model context 256", "shorten --prompt_template")
    assert list(out.iterdir()) == []


def _stored_copy(request, name: str) -> tuple[dict, Path]:
    run = request.getfixturevalue("data_run")
    path = run["out"] / "AuthorMix" / "tiny" / f"{name}.zarr"
    shutil.copytree(run["path"], path)
    return run, path


def _edit_attrs(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"]["saestore"])
    (path / "zarr.json").write_text(json.dumps(meta))


def _refused_store(request, run: dict, path: Path, error: type, *words: str) -> None:
    from saestore.reader import open_run
    from saestore.validate import validate_run

    before = _tree(path)
    with pytest.raises(error) as e:
        open_run(path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not validate_run(path).ok
    code, err, _ = extract(run["out"], run["dataset"], "--run_name", path.name.removesuffix(".zarr"))
    _refused(code, err, *words)
    assert _tree(path) == before  # refused before anything was written


def case_store_of_newer_major_version(request):
    """A store written by protocol 2.x: ProtocolVersionError naming both versions, from open_run,
    validate and extract; the store is left untouched."""
    run, path = _stored_copy(request, "newer")
    _edit_attrs(path, lambda a: a.update(protocol_version="2.0"))
    _refused_store(request, run, path, ProtocolVersionError, "protocol 2.0", "major version 1")


def case_store_of_another_layout(request):
    """A Zarr store that is not a saestore run at the run path: ProtocolError ('not a saestore run';
    --overwrite replaces it); untouched."""
    run = request.getfixturevalue("data_run")
    path = run["out"] / "AuthorMix" / "tiny" / "other.zarr"
    xr.Dataset({"x": ("t", np.arange(3))}).to_zarr(path, zarr_format=3)
    _refused_store(request, run, path, ProtocolError, "not a saestore run")


def case_store_with_invalid_root_attributes(request):
    """Root attributes that break schema/run_attributes.schema.json: ProtocolError naming the field."""
    run, path = _stored_copy(request, "invalid")
    _edit_attrs(path, lambda a: a.update(status="exploded"))
    _refused_store(request, run, path, ProtocolError, "run_attributes JSON is invalid at status")


def case_codec_entry_with_unknown_configuration_key(request):
    """A sparse_coo codec entry with a key it does not define is refused before any chunk is
    decoded: by open_run (ValueError naming the key), validate, and extract (ProtocolError)."""
    from saestore.reader import open_run
    from saestore.validate import validate_run

    run, path = _stored_copy(request, "codec")
    for f in (path / "res" / "zarr.json", path / "zarr.json"):
        meta = json.loads(f.read_text())
        node = meta if f.parent.name == "res" else meta["consolidated_metadata"]["metadata"]["res"]
        node["codecs"][0]["configuration"]["codecs"][0]["configuration"]["exec"] = "import os"  # inside the shards
        f.write_text(json.dumps(meta))
    before = _tree(path)
    with pytest.raises(ValueError, match=r"unknown configuration keys \['exec'\]"):
        open_run(path)
    report = validate_run(path)
    assert not report.ok and "unknown configuration keys" in report.format()
    code, err, _ = extract(run["out"], run["dataset"], "--run_name", "codec")
    _refused(code, err, "unknown configuration keys", "--overwrite")
    assert _tree(path) == before


def _cli(*argv: str) -> tuple[int, str, str]:
    """``python -m saestore ARGV`` in this process: (exit code, stdout, stderr)."""
    from saestore.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _one_line(code: int, err: str, command: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"saestore {command}: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def case_info_on_a_missing_path(request):
    """``info`` / ``open_run`` on a path with nothing there: RunNotFoundError, one line naming the
    path and where runs are listed."""
    from saestore.errors import RunNotFoundError
    from saestore.reader import open_run

    missing = request.getfixturevalue("tmp_path") / "nope.zarr"
    _one_line(*_cli("info", str(missing))[::2], "info", "no saestore run at", "runs list")
    with pytest.raises(RunNotFoundError, match="no saestore run at"):
        open_run(missing)
    code, out, _ = _cli("validate", str(missing))  # the same check (reader.run_group), as a problem
    assert code == 1 and "no saestore run at" in out and "FAILED" in out, out
    assert not missing.exists()


def case_info_on_a_folder_that_is_not_a_store(request):
    """``info`` / ``open_run`` on a folder that is not a Zarr store: the same one line."""
    from saestore.errors import RunNotFoundError
    from saestore.reader import open_run

    folder = request.getfixturevalue("tmp_path") / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    _one_line(*_cli("info", str(folder))[::2], "info", "no saestore run at", str(folder))
    with pytest.raises(RunNotFoundError):
        open_run(folder)
    code, out, _ = _cli("validate", str(folder))
    assert code == 1 and "no saestore run at" in out, out
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def case_info_json_into_a_closed_pipe(request):
    """``info --json RUN | head`` when the reader is gone: no traceback, exit 141 (what a tool
    killed by SIGPIPE returns)."""
    import subprocess
    import sys

    run = request.getfixturevalue("data_run")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "saestore", "info", "--json", str(run["path"])],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def case_stats_out_in_a_missing_folder(request):
    """``stats --out /missing/folder/f.csv``: refused in one line before anything is computed; an
    unknown --out format too."""
    run = request.getfixturevalue("data_run")
    missing = request.getfixturevalue("tmp_path") / "missing" / "f.csv"
    _one_line(*_cli("stats", str(run["path"]), "--stat", "frequency", "--out", str(missing))[::2], "stats",
              "does not exist", "--out")
    _one_line(*_cli("stats", str(run["path"]), "--stat", "frequency", "--out", str(missing.with_suffix(".xlsx")))[::2],
              "stats", "--out must end in one of")
    assert not missing.parent.exists()


def case_runs_add_or_show_of_no_run(request):
    """``runs add`` on a path with no run: one line naming the path, and no registry is created;
    ``runs show`` of a run not in the registry: one line naming the registry and ``runs add``."""
    from saestore.registry import Registry

    tmp = request.getfixturevalue("tmp_path")
    registry = tmp / "saestore_runs.sqlite"
    _one_line(*_cli("runs", "add", str(tmp / "nope.zarr"), "--registry", str(registry))[::2], "runs",
              "no saestore run at", "nope.zarr")
    assert not registry.exists()
    Registry(registry)
    _one_line(*_cli("runs", "show", str(tmp / "nope.zarr"), "--registry", str(registry))[::2], "runs",
              "no run", str(registry), "runs add PATH")
    assert Registry(registry).list() == []


def case_overwrite_with_a_prompt_template_that_cannot_be_filled(request):
    """``--overwrite --prompt_template "In {style} {0}: "`` on a complete run: refused in one line
    (the template is formatted as the worker will, before anything); the old run is byte-identical."""
    run, path = _stored_copy(request, "keep")
    before = _tree(path)
    code, err, _ = extract(run["out"], run["dataset"], "--run_name", "keep", "--overwrite", "--setting", "prompted",
                           "--prompt_template", "In {style} {0}: ")
    _refused(code, err, "--prompt_template", "IndexError", "{style} is the only field")
    assert _tree(path) == before
    assert not list(path.parent.glob("keep.zarr.*"))


def _enospc_at_creation(request, out: Path, *args: str, dataset: Path | None = None) -> tuple[int, str]:
    from saestore import faults

    faults.configure("create_array:3:enospc")
    try:
        code, err, _ = extract(out, dataset, *args)
    finally:
        faults.configure(None)
    return code, err


def case_overwrite_when_the_disk_fills_during_creation(request):
    """``--overwrite`` builds the new run aside (``RUN.creating``) and swaps it in only once created:
    a full disk while creating it is one line, and the old run is byte-identical."""
    run, path = _stored_copy(request, "full")
    before = _tree(path)
    code, err = _enospc_at_creation(request, run["out"], "--run_name", "full", "--overwrite", dataset=run["dataset"])
    _refused(code, err, "creating", "No space left on device", "existing run is untouched")
    assert _tree(path) == before
    assert not list(path.parent.glob("full.zarr.*"))


def case_disk_full_during_creation(request):
    """ENOSPC while the store is created (the ``enospc`` fault action): one line naming the run
    and the OS error; nothing is left (no store, no build folder, no registry, no folders)."""
    out = request.getfixturevalue("tmp_path") / "out"
    out.mkdir()
    request.getfixturevalue("tiny_cache")
    code, err = _enospc_at_creation(request, out, "--run_name", "x")
    _refused(code, err, "creating", str(out / "demo" / "tiny" / "x.zarr"), "No space left on device")
    assert list(out.iterdir()) == []


def case_resume_without_a_run(request):
    """``--resume`` with no run there: refused in one line; nothing is created (no folder, no registry)."""
    out = request.getfixturevalue("tmp_path") / "out"
    out.mkdir()
    request.getfixturevalue("tiny_cache")
    code, err, _ = extract(out, None, "--run_name", "x", "--resume")
    _refused(code, err, "--resume: no run at", "drop --resume")
    assert list(out.iterdir()) == []


def _rerun_complete(request, out: Path, dataset: Path, name: str) -> None:
    from saestore.extract import models

    def no_model(*args, **kwargs):
        raise AssertionError("a complete run must not load the model")

    request.getfixturevalue("monkeypatch").setattr(models, "load_model", no_model)
    capsys = request.getfixturevalue("capsys")
    capsys.readouterr()
    code, err, _ = extract(out, dataset, "--run_name", name)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and err == "" and len(lines) == 1 and "is already complete" in lines[0], (err, lines)


def case_rerun_of_a_complete_run(request):
    """The same command on a complete run: one line saying it is complete (exit 0), checked before
    any model is loaded or the store touched."""
    run, path = _stored_copy(request, "again")
    before = _tree(path)
    _rerun_complete(request, run["out"], run["dataset"], "again")
    assert _tree(path) == before


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount as root (chmod does not stop root), else chmod."""
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("root without permission to mount: cannot make a read-only folder here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def case_read_only_output_dir(request):
    """A read-only --output_dir (or --registry folder): one line naming what cannot be written and
    the option to change, before anything is loaded; nothing is written."""
    tmp = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    ro, rw = tmp / "ro", tmp / "rw"
    ro.mkdir()
    rw.mkdir()
    with _read_only(ro):
        code, err, _ = extract(ro, None, "--run_name", "x")
        _refused(code, err, "cannot write the run", "not writable", "--output_dir")
        code, err, _ = extract(ro, None, "--run_name", "x", "--registry", str(rw / "reg.sqlite"))
        _refused(code, err, "cannot write the run", "--output_dir")
        code, err, _ = extract(rw, None, "--run_name", "x", "--registry", str(ro / "reg.sqlite"))
        _refused(code, err, "cannot write the registry", "--registry")
    assert list(ro.iterdir()) == [] and list(rw.iterdir()) == []


def case_rerun_of_a_complete_run_on_a_read_only_mount(request):
    """The same command on a complete run on a read-only mount: 'already complete' (exit 0), no lock taken."""
    run = request.getfixturevalue("data_run")
    mount = request.getfixturevalue("tmp_path") / "mnt"
    shutil.copytree(run["out"] / "AuthorMix", mount / "AuthorMix")
    with _read_only(mount):
        _rerun_complete(request, mount, run["dataset"], "data")


def case_resume_with_other_numerics(request):
    """A run started with another torch thread count (``--devices cpu:2`` shares the cores) and
    resumed now: one warning line naming both (root attribute ``numerics``, not part of the
    configuration hash); the resume goes on and the started numerics stay recorded."""
    run, path = _stored_copy(request, "numerics")
    started = {"device": "cpu", "torch_threads": 2}
    _edit_attrs(path, lambda a: a.update(status="failed", numerics=started))
    zarr.open_array(str(path), path=protocol.PROGRESS_PATH, mode="r+")[0] = 0  # the first author to redo
    code, err, logs = extract(run["out"], run["dataset"], "--run_name", "numerics")
    assert code == 0, err
    lines = [ln for ln in logs.splitlines() if "was started with" in ln]
    assert len(lines) == 1 and "torch_threads 2" in lines[0] and "torch_threads 1" in lines[0], logs
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["saestore"]
    assert attrs["status"] == "complete" and attrs["numerics"] == started
    fresh = json.loads((run["path"] / "zarr.json").read_text())["attributes"]["saestore"]
    assert fresh["numerics"] == {"device": "cpu", "torch_threads": 1}


def _chunk_files(path: Path) -> dict[str, bytes]:
    """Every data file of a run (metadata and progress markers aside: they hold times)."""
    return {k: v for k, v in _tree(path).items()
            if not k.endswith("zarr.json") and not k.startswith(protocol.PROGRESS_PATH)}


def _status(path: Path, registry: Path) -> tuple[str, str]:
    """(status in the store's attributes, status of its registry row)."""
    import sqlite3

    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["saestore"]
    with contextlib.closing(sqlite3.connect(registry)) as db:
        (row,) = db.execute("SELECT status FROM runs").fetchall()
    return attrs["status"], row[0]


def _signalled(out: Path, argv: list[str], env: dict, signum: int, code: int, *, group: bool = False) -> str:
    """Run the CLI in a process, send ``signum`` once a doc-chunk is done (to its process group with
    ``group``, as a terminal's Ctrl-C does), check the one line, exit code and status; the line."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "saestore.extract", *argv], stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=group)
    path, registry = out / "demo" / "tiny" / "x.zarr", out / "saestore_runs.sqlite"
    progress = path / protocol.PROGRESS_PATH
    deadline = time.monotonic() + 240
    while not (progress.exists() and (zarr.open_array(str(path), path=protocol.PROGRESS_PATH)[..., 0] == 1).any()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("saestore.extract:")]
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in err, err
    assert f"interrupted by {signal.Signals(signum).name}" in lines[0] and "saved as interrupted" in lines[0], lines
    assert _status(path, registry) == ("interrupted", "interrupted")
    return lines[0]


def _interrupted_then_resumed(request, signum: int, code: int) -> None:
    """Start the CLI in a process, signal it once a doc-chunk is done (it waits at a forward pass),
    check the one line, the exit code and the status, then run the printed command to the end."""
    import shlex
    import subprocess
    import sys

    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    few = ["--n_docs_per_author", "6", "--shard_docs", "2"]
    ref_code, err, _ = extract(out / "ref", None, "--run_name", "x", *few)
    assert ref_code == 0, err
    argv = [*ARGS, "--dataset_name", "demo", "--output_dir", str(out / "run"), "--run_name", "x", *few]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESTORE_FAULT": "forward:3:sleep120"}
    line = _signalled(out / "run", argv, env, signum, code)
    path, registry = out / "run" / "demo" / "tiny" / "x.zarr", out / "run" / "saestore_runs.sqlite"
    command = shlex.split(line.partition("Resume with: ")[2])
    assert command[1:3] == ["-m", "saestore.extract"] and command[3:] == [*argv, "--resume"], command
    env.pop("SAESTORE_FAULT")
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _status(path, registry) == ("complete", "complete")
    assert _chunk_files(path) == _chunk_files(out / "ref" / "demo" / "tiny" / "x.zarr")


def case_sigint_during_extraction(request):
    """Ctrl-C (SIGINT): one line naming the signal, the run saved as ``interrupted`` (store and
    registry) and the exact command that resumes it (the argv plus --resume); exit 130, no
    traceback. That command finishes the run byte-identical to an uninterrupted one."""
    import signal

    _interrupted_then_resumed(request, signal.SIGINT, 130)


def case_sigint_with_two_workers(request):
    """Ctrl-C with ``--devices cpu:2`` (SIGINT to the whole process group): the workers leave it to
    the coordinator, which stops them; one line, exit 130, no traceback from any process, the run
    ``interrupted`` and valid."""
    import signal

    from saestore.validate import validate_run

    out = request.getfixturevalue("tmp_path")
    request.getfixturevalue("tiny_cache")
    argv = [*ARGS, "--dataset_name", "demo", "--output_dir", str(out), "--run_name", "x", "--n_docs_per_author", "6",
            "--shard_docs", "2", "--devices", "cpu:2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAESTORE_FAULT": "forward:3:sleep120"}
    _signalled(out, argv, env, signal.SIGINT, 130, group=True)
    report = validate_run(out / "demo" / "tiny" / "x.zarr")
    assert report.ok and report.incomplete and report.status == "interrupted", report.format()


def case_sigterm_during_extraction(request):
    """SIGTERM (kill, a scheduler's pre-emption): the same as SIGINT, exit 143 (128 + 15)."""
    import signal

    _interrupted_then_resumed(request, signal.SIGTERM, 143)


def case_registry_created_before_interrupted_existed(request):
    """A registry made by an older saestore (its status CHECK lacks ``interrupted``) is migrated when
    opened: its rows are kept and an interrupted run can be recorded."""
    import sqlite3

    from saestore.registry import Registry

    path = request.getfixturevalue("tmp_path") / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""CREATE TABLE runs (path TEXT PRIMARY KEY, run_name TEXT NOT NULL, model TEXT NOT NULL,
        dataset TEXT NOT NULL, category TEXT, status TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
        config_hash TEXT NOT NULL, config TEXT NOT NULL, authors TEXT NOT NULL DEFAULT '[]',
        failed_authors TEXT NOT NULL DEFAULT '[]', n_docs INTEGER, n_tokens INTEGER, n_nonzero INTEGER, bytes INTEGER,
        started_at TEXT NOT NULL, finished_at TEXT, wall_s REAL, error TEXT);
        INSERT INTO runs (path, run_name, model, dataset, status, config_hash, config, started_at)
        VALUES ('runs/a.zarr', 'a', 'tiny', 'demo', 'complete', 'sha256:0', '{}', '2026-12-01T00:00:00+00:00');""")
    old.close()
    reg = Registry(path)
    assert [(r.path, r.status) for r in reg.list()] == [("runs/a.zarr", "complete")]
    reg.start(path="runs/b.zarr", run_name="b", model="tiny", dataset="demo", category=None, config_hash="sha256:1",
              config={}, authors=["x"], n_docs=1)
    reg.finish("runs/b.zarr", status="interrupted", failed_authors=["x"], n_tokens=0, n_nonzero=0, bytes=0, wall_s=1.0)
    assert Registry(path).get("b").status == "interrupted"


CASES: dict[str, Callable] = {
    name.removeprefix("case_").replace("_", "-"): fn for name, fn in globals().items() if name.startswith("case_")
}


@pytest.mark.slow
@pytest.mark.extract
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(case, request):
    CASES[case](request)


def test_table_lists_every_case_the_issue_names():
    named = {"empty-texts", "whitespace-only-texts", "non-utf8-bytes-in-file", "author-name-with-slash",
             "author-name-dotdot", "author-name-control-characters", "author-name-very-long",
             "author-name-duplicate-rows", "document-longer-than-max-seq-len", "document-shorter-than-minimum",
             "one-author-only", "more-workers-than-authors", "sae-d-in-mismatch", "model-output-nan",
             "model-output-inf", "store-of-newer-major-version", "store-of-another-layout"}
    assert named <= set(CASES), named - set(CASES)
    assert all(fn.__doc__ for fn in CASES.values())


# --------------------------------------------------------------------------------------------
# nothing executes from data
# --------------------------------------------------------------------------------------------

PACKAGE = Path(saestore.__file__).resolve().parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}
#: The one module allowed to import pickle. It reproduces the format saestore replaces (the seed's
#: ``.meta.pkl`` metadata file next to its scipy CSR ``.npz``) for the benchmark only, and only
#: reads pickles it wrote itself in the benchmark's temporary folder. Nothing else in it may turn
#: data into code, and no module outside saestore/bench/ may import it (next test), so extraction
#: and reading can never reach it.
PICKLE_ALLOWED = "saestore/bench/seed.py"


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str) -> object:
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def _unsafe(tree: ast.AST, where: str) -> list[str]:
    """Every way ``tree`` could turn data into code: pickle-family imports, eval/exec/compile/
    __import__, torch.load without weights_only=True, np.load with allow_pickle, yaml.load,
    trust_remote_code."""
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad = [n for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if bad:
                findings.append(f"{where}:{node.lineno} imports {bad}")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
                findings.append(f"{where}:{node.lineno} calls {name}()")
            elif name.endswith("torch.load") and _kw(node, "weights_only") is not True:
                findings.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                findings.append(f"{where}:{node.lineno} np.load with allow_pickle")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                findings.append(f"{where}:{node.lineno} {name}")
            if _kw(node, "trust_remote_code") not in (None, False):
                findings.append(f"{where}:{node.lineno} trust_remote_code")
    return findings


def test_nothing_in_the_package_deserializes_code():
    """The whole package passes the scan (and the scan catches what it should: module.eval() of
    torch is not the builtin)."""
    planted = ast.parse("import pickle\nfrom dill import loads\nx = eval('1')\ntorch.load(f)\n"
                        "torch.load(f, weights_only=True)\nnp.load(f, allow_pickle=True)\nnp.load(f, allow_pickle=False)\n"
                        "model.eval()\nAutoModel.from_pretrained(p, trust_remote_code=True)\nyaml.load(s)\n")
    assert len(_unsafe(planted, "planted")) == 7
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    findings = [f for path in files for f in _unsafe(ast.parse(path.read_text(encoding="utf-8")),
                                                      path.relative_to(PACKAGE.parent).as_posix())]
    allowed = [f for f in findings if f.startswith(f"{PICKLE_ALLOWED}:") and f.endswith(" imports ['pickle']")]
    assert allowed, f"{PICKLE_ALLOWED} no longer imports pickle: drop the allowance"
    rest = [f for f in findings if f not in allowed]
    assert not rest, "\n".join(rest)


def _imported_modules(tree: ast.AST, module: str) -> set[str]:
    """Every module ``tree`` (the source of ``module``, dotted) imports, relative imports resolved;
    ``from pkg import name`` counts as ``pkg`` and ``pkg.name``."""
    out = set()
    package = module.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def test_only_the_benchmarks_import_the_pickling_seed_baseline():
    """saestore/bench/seed.py is the pickle allowance above: no module of the package outside
    saestore/bench/ imports it, directly, through a relative import or by name."""
    seed = PICKLE_ALLOWED.removesuffix(".py").replace("/", ".")
    reaches = [("import saestore.bench.seed", "saestore.x"), ("from saestore.bench import seed", "saestore.x"),
               ("from saestore.bench.seed import read_meta", "saestore.x"), ("from .bench import seed", "saestore.x"),
               ("from ..bench.seed import read_meta", "saestore.stats.x"), ("from .bench import seed", "saestore.__init__")]
    assert all(seed in _imported_modules(ast.parse(src), where) for src, where in reaches)
    assert seed not in _imported_modules(ast.parse("from saestore.bench import baselines\nfrom .bench import seed"),
                                         "saestore.stats.x")  # the latter is saestore.stats.bench.seed
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[:2] == ("saestore", "bench"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        by_name = any(isinstance(n, ast.Constant) and isinstance(n.value, str) and seed in n.value
                      for n in ast.walk(tree))  # importlib.import_module("saestore.bench.seed")
        if by_name or seed in _imported_modules(tree, ".".join(rel.with_suffix("").parts)):
            bad.append(rel.as_posix())
    assert not bad, f"outside saestore/bench/, these import {seed}: {bad}"


def test_attribute_and_codec_json_are_validated_against_schema_before_use():
    """open_run validates the root attributes against schema/ (ProtocolError) and the codec refuses
    configuration keys it does not define, before anything is read with them."""
    from saestore.codec import SparseCOOCodec

    example = json.loads((PACKAGE.parent / "schema" / "examples" / "run_attributes.json").read_text())
    protocol.read_attrs({"saestore": example})
    for field, value in [("config_hash", "md5:abc"), ("storage", {"format": "pickle", "value_dtype": "float32",
                                                                  "chunk_docs": 4}), ("saes", "not a mapping")]:
        with pytest.raises(ProtocolError, match=field):
            protocol.read_attrs({"saestore": {**example, field: value}})
    with pytest.raises(ValueError, match="unknown configuration keys"):
        SparseCOOCodec.from_dict({"name": "saestore.sparse_coo", "configuration": {"value_dtype": "float32", "x": 1}})
    with pytest.raises(ValueError, match="value_dtype"):
        SparseCOOCodec.from_dict({"name": "saestore.sparse_coo", "configuration": {"value_dtype": "object"}})
