"""Exact token contexts in any script (issue #15 item 1) and per-document source columns (issue #16).

One small extraction with the tiny model (a byte-level BPE tokenizer trained on English, so every
non-Latin character is split over several byte tokens, each of which decodes alone to U+FFFD) of a
CSV of French, Arabic, Hebrew, CJK and emoji documents with two extra columns, in the ``prompted``
setting (the prompt must not shift the spans). Every context string built from the run —
``top_examples`` windows, ``example_table``, the dashboard pages, the Neuronpedia export — must be a
substring of its document's text, and the stored spans must tile each text exactly.
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import re

import numpy as np
import pytest

from tests.helpers.needs import module_needs

module_needs("extract")

import xarray as xr

from saestore.extract.launch import main
from saestore.reader import open_run
from saestore.stats import top_examples
from saestore.stats.examples import example_table
from saestore.validate import validate_run

TEXTS = {
    "fr": ["Ça va très bien, naïve café à Noël.", "L'été dernier, où étiez-vous ? Déjà vu, garçon !"],
    "ar": ["مرحبا بالعالم، كيف حالك اليوم؟", "اللغة العربية جميلة جدا"],
    "he": ["שלום עולם, מה שלומך היום?", "עברית נכתבת מימין לשמאל"],
    "zh": ["你好世界，今天天气很好。", "日本語のテキストも大丈夫です。한국어도"],
    "emoji": ["I ❤️ 🍕 and 🎉 with my 👩‍👩‍👧 family!", "Flags 🇫🇷🇯🇵, skin 👍🏽 tones, done ✅"],
}
CATEGORY = {"fr": "europe", "ar": "middle-east", "he": "middle-east", "zh": "asia", "emoji": "web"}
ARGS = ["--model", "tiny", "--layers", "1", "--layer_types", "res", "--sae_features_width", "1k", "--max_seq_len", "128",
        "--chunk_docs", "2", "--batch_size", "4", "--devices", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("contexts")
    path = out / "multi.csv"
    rows = [{"style": a, "text": t, "category": CATEGORY[a], "source": f"{a}-{i}"}
            for a, texts in TEXTS.items() for i, t in enumerate(texts)]
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["style", "text", "category", "source"])
        w.writeheader()
        w.writerows(rows)
    code = main([*ARGS, "--dataset_name", "multi", "--dataset_path", str(path), "--output_dir", str(out),
                 "--setting", "prompted", "--doc_columns", "category", "source", "--run_name", "multi"])
    assert code == 0
    run_path = out / "multi" / "tiny" / "multi.zarr"
    return {"path": run_path, "rows": rows, "out": out, "texts": {r["text"] for r in rows}}


def _in_a_document(context: str, texts: set[str]) -> bool:
    return any(context in t for t in texts)


def test_spans_tile_every_document_and_tokens_stay_the_tokenizers(run):
    ds = xr.open_zarr(run["path"])
    assert validate_run(run["path"]).ok
    start, end, valid = ds.char_start.values, ds.char_end.values, ds.valid_mask.values
    assert ((start == -1) == ~valid).all() and ((end == -1) == ~valid).all()
    for a in range(ds.sizes["author"]):
        for d in range(int(ds.n_docs.values[a])):
            text, n = str(ds.text.values[a, d]), int(ds.doc_length.values[a, d])
            assert int(ds.n_truncated.values[a, d]) == 0
            s, e = start[a, d, :n], end[a, d, :n]
            assert s[0] == 0 and (s[1:] == e[:-1]).all() and e[-1] == len(text)
            assert "".join(text[i:j] for i, j in zip(s, e, strict=True)) == text
    # ``token`` is still what the tokenizer calls each token: byte tokens decode alone to U+FFFD
    tokens = ds.token.values[valid]
    assert (tokens == "\ufffd").sum() > 50


def test_top_examples_contexts_are_substrings_of_the_source(run):
    ds = open_run(run["path"])
    ex = top_examples(ds, "res", layer=1, k=5, window=4).compute()
    tokens, values, text = ex["tokens"].values, ex["value"].values, ex["text"].values
    found = 0
    for idx in zip(*np.nonzero(np.isfinite(values)), strict=True):
        context = "".join(tokens[idx])
        assert context in str(text[idx]) and "\ufffd" not in context, (context, text[idx])
        found += 1
    assert found > 100
    table = example_table(ex)
    assert (table["context"] == table["left_context"] + table["token"] + table["right_context"]).all()
    assert all(_in_a_document(c, run["texts"]) for c in table["context"])
    scripts = {"ar": "\u0600", "he": "\u05d0", "zh": "\u4e00", "emoji": "\U0001f300"}
    for author, first in scripts.items():  # every script appears in some context, exactly
        assert any(any(ord(ch) >= ord(first) for ch in c) for c in table.loc[table.example_author == author, "context"])


def test_dashboard_and_neuronpedia_contexts_are_exact(run, tmp_path):
    from saestore.dashboard import write_dashboard
    from saestore.export.neuronpedia import export_neuronpedia

    counts = (xr.open_zarr(run["path"]).res.isel(layer=0) > 0).sum(("author", "doc", "tok")).values
    features = [int(f) for f in np.argsort(-counts, kind="stable")[:4]]
    site = write_dashboard(str(run["path"]), tmp_path / "dash", layer_type="res", layer=1, features=features,
                           k=5, window=4, n_bins=2, per_bin=2, show_progress=False)
    n = 0
    for f in features:
        page = (site / "features" / f"{f}.html").read_text(encoding="utf-8")
        for ctx in re.findall(r'<span class="ctx">(.*?)</span></div>', page):
            context = html.unescape(re.sub(r"<[^>]+>", "", ctx)).replace("↵", "\n").replace("⇥", "\t")
            assert _in_a_document(context, run["texts"]) and "\ufffd" not in context, context
            n += 1
    assert n >= 4 * 5
    folder = export_neuronpedia(str(run["path"]), tmp_path / "np", layer_type="res", layer=1, features=features,
                                k=5, window=4, show_progress=False)
    acts = [json.loads(line) for p in sorted((folder / "activations").glob("*.jsonl.gz"))
            for line in gzip.open(p, "rt", encoding="utf-8")]
    assert acts and all(_in_a_document("".join(a["tokens"]), run["texts"]) for a in acts)
    assert all(len(a["tokens"]) == len(a["values"]) for a in acts)


def test_doc_columns_are_selectable_per_document(run):
    ds = xr.open_zarr(run["path"])
    assert list(ds.doc_column.values) == ["category", "source"]
    assert ds.doc_meta.dims == ("author", "doc", "doc_column")
    by_text = {r["text"]: r for r in run["rows"]}
    category = ds.doc_meta.sel(doc_column="category")
    for a, author in enumerate(ds.author.values):
        for d in range(int(ds.n_docs.values[a])):
            row = by_text[str(ds.text.values[a, d])]
            assert str(category.values[a, d]) == row["category"] == CATEGORY[str(author)]
            assert str(ds.doc_meta.sel(doc_column="source").values[a, d]) == row["source"]
    # grouping documents by a column: the two middle-east authors' documents
    asia = (category == "asia").values
    assert asia.sum() == 2 and set(ds.text.values[asia]) == set(TEXTS["zh"])
    assert ds.attrs["saestore"]["config"]["doc_columns"] == ["category", "source"]


def test_news_of_several_categories_stores_the_category(tiny_cache, tmp_path):
    path = tmp_path / "news.json"
    rows = [{"style": "ann", "text": "Rain over the hills today", "category": "weather"},
            {"style": "ann", "text": "The council voted on the budget", "category": "politics"},
            {"style": "bob", "text": "Sunny skies all week long", "category": "weather"}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert main([*ARGS, "--dataset_name", "news", "--dataset_path", str(path), "--output_dir", str(tmp_path)]) == 0
    (store,) = (tmp_path / "news").rglob("*.zarr")
    ds = xr.open_zarr(store)
    assert list(ds.doc_column.values) == ["category"]
    got = {str(ds.text.values[a, d]): str(ds.doc_meta.values[a, d, 0])
           for a in range(ds.sizes["author"]) for d in range(int(ds.n_docs.values[a]))}
    assert got == {r["text"]: r["category"] for r in rows}
    # one category chosen: nothing to store
    assert main([*ARGS, "--dataset_name", "news", "--dataset_path", str(path), "--output_dir", str(tmp_path / "one"),
                 "--category_name", "weather"]) == 0
    (one,) = (tmp_path / "one").rglob("*.zarr")
    assert "doc_meta" not in xr.open_zarr(one) and "doc_column" not in xr.open_zarr(one).coords


def test_decoded_spans_fallback_tiles_like_the_offsets(tiny_cache):
    """The fallback for tokenizers without offsets (decoded prefixes) tiles every text exactly too; it
    differs from the offsets only in which of the tokens sharing a character gets it."""
    from saestore.extract.models import decoded_spans, encode_with_spans, load_model

    tok = load_model("tiny", "cpu").tokenizer
    texts = [t for ts in TEXTS.values() for t in ts]
    ids, _, spans = encode_with_spans(tok, texts, 10_000)
    for text, row, fast in zip(texts, ids, spans, strict=True):
        slow = decoded_spans(tok, text, row)
        for s in (fast, slow):
            assert s[0, 0] == 0 and (s[1:, 0] == s[:-1, 1]).all() and s[-1, 1] == len(text)
            assert "".join(text[i:j] for i, j in s) == text
        assert set(fast[:, 1]) - {0} == set(slow[:, 1]) - {0}  # the same character boundaries


def test_a_run_without_spans_resumes_without_them_and_joins_tokens(run, tmp_path):
    """A 1.2 run made before the spans existed (here: the spans removed, a doc-chunk's marker cleared)
    resumes with the same command and stays without them; its contexts join ``token`` as before."""
    import shutil

    import zarr

    from saestore import protocol

    path = tmp_path / "multi" / "tiny" / "multi.zarr"
    shutil.copytree(run["path"], path)
    for name in ("char_start", "char_end"):
        shutil.rmtree(path / name)
    progress = zarr.open_array(str(path), path=protocol.PROGRESS_PATH, mode="r+")
    progress[0, :] = 0  # the first author's doc-chunks are to be redone
    zarr.consolidate_metadata(str(path))
    code = main([*ARGS, "--dataset_name", "multi", "--dataset_path", str(run["out"] / "multi.csv"),
                 "--output_dir", str(tmp_path), "--setting", "prompted", "--doc_columns", "category", "source",
                 "--run_name", "multi"])
    assert code == 0
    assert validate_run(path).ok
    ds = open_run(path)
    assert ds.attrs["saestore"]["status"] == "complete" and "char_start" not in ds and "doc_meta" in ds
    ex = top_examples(ds, "res", layer=1, k=3, window=2).compute()
    table = example_table(ex)
    tokens = ex["tokens"].values
    joined = {"".join(tokens[idx]) for idx in zip(*np.nonzero(np.isfinite(ex["value"].values)), strict=True)}
    assert set(table["context"]) == joined
    assert any("\ufffd" in c for c in joined)  # the stored tokens, joined: multi-byte characters read as U+FFFD


def test_validate_names_spans_that_do_not_tile(run, tmp_path):
    import shutil

    import zarr

    path = tmp_path / "broken.zarr"
    shutil.copytree(run["path"], path)
    arr = zarr.open_group(str(path), mode="r+", use_consolidated=False)["char_end"]
    arr[0, 0, 2] = int(arr[0, 0, 2]) + 1  # the third token's piece now overlaps the fourth's
    report = validate_run(path)
    assert not report.ok
    assert any("char_start/char_end" in str(p) and "starts where the one before ended" in str(p)
               for p in report.problems), report.format()
