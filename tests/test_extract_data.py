"""Data layer of extraction: the demo corpus, dataset loaders and the selection filters."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from saestore.errors import DatasetError
from saestore.extract.corpus import DEMO_AUTHOR_VOCAB, DEMO_COMMON_WORDS, demo_corpus
from saestore.extract.data import Document, load_documents, select_documents

pytestmark = pytest.mark.extract  # load_documents reads through `datasets`

AUTHORMIX_ROWS = [
    {"style": "obama", "text": "Yes we can, and we will, together.", "extra": 1},
    {"style": "woolf", "text": "Mrs Dalloway said she would buy the flowers herself.", "extra": 2},
    {"style": "obama", "text": "Hope is the thing.", "extra": 3},
    {"style": "hemingway", "text": "The old man was thin and gaunt.", "extra": 4},
]
NEWS_ROWS = [
    {"style": "cnn", "text": "Storm hits coast. Winds rose overnight.", "category": "weather",
     "text_length_words": 6},
    {"style": "fox", "text": "Team wins final. Fans cheered.", "category": "sports", "text_length_words": 5},
    {"style": "bbc", "text": "Rain again. More tomorrow.", "category": "weather", "text_length_words": 4},
]


def _expected(rows, index=None):
    return [Document(doc_id=i if index is None else index[k], author=r["style"], text=r["text"])
            for k, (i, r) in enumerate(enumerate(rows))]


# ----------------------------------------------------------------------------------------------
# demo corpus


def test_demo_corpus_is_deterministic_and_shaped():
    docs = demo_corpus()
    assert docs == demo_corpus() and docs != demo_corpus(seed=1)
    assert [d["doc_id"] for d in docs] == list(range(len(docs)))
    assert Counter(d["style"] for d in docs) == {a: 24 for a in DEMO_AUTHOR_VOCAB}
    assert all(40 <= len(d["text"].split()) <= 150 for d in docs)
    assert len(demo_corpus(n_docs_per_author=3)) == 3 * len(DEMO_AUTHOR_VOCAB)


def test_demo_authors_differ_in_vocabulary_and_style():
    docs = demo_corpus()
    all_words = [w for ws in DEMO_AUTHOR_VOCAB.values() for w in ws]
    assert len(set(all_words)) == len(all_words) and not set(all_words) & set(DEMO_COMMON_WORDS)
    sentence_len = {}
    for author, vocab in DEMO_AUTHOR_VOCAB.items():
        words = [w.strip(".,!?;()").lower() for d in docs if d["style"] == author for w in d["text"].split()]
        own = sum(w in vocab for w in words) / len(words)
        others = sum(w in all_words and w not in vocab for w in words) / len(words)
        assert own > 0.2 and others == 0, author
        assert sum(w in DEMO_COMMON_WORDS for w in words) / len(words) > 0.3
        texts = " ".join(d["text"] for d in docs if d["style"] == author)
        sentence_len[author] = len(texts.split()) / sum(texts.count(c) for c in ".!?")
    assert sentence_len["sailor"] < sentence_len["chef"] < sentence_len["lawyer"]


def test_load_demo():
    docs = load_documents("demo")
    assert len(docs) == 120 and docs[5] == Document(5, "sailor", demo_corpus()[5]["text"])


# ----------------------------------------------------------------------------------------------
# AuthorMix and news from local files


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "csv"])
def test_authormix_local_file(tmp_path, fmt):
    path = tmp_path / f"authormix.{fmt}"
    df = pd.DataFrame(AUTHORMIX_ROWS)
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "json":
        path.write_text(json.dumps(AUTHORMIX_ROWS))
    else:
        df.to_csv(path, index=False)
    assert load_documents("AuthorMix", dataset_path=str(path)) == _expected(AUTHORMIX_ROWS)


def test_authormix_local_folder_reads_files_in_name_order(tmp_path):
    pd.DataFrame(AUTHORMIX_ROWS[2:]).to_parquet(tmp_path / "part-1.parquet")
    pd.DataFrame(AUTHORMIX_ROWS[:2]).to_parquet(tmp_path / "part-0.parquet")
    (tmp_path / "README.md").write_text("ignored")
    assert load_documents("authormix", dataset_path=str(tmp_path)) == _expected(AUTHORMIX_ROWS)
    pd.DataFrame(AUTHORMIX_ROWS).to_csv(tmp_path / "more.csv", index=False)
    with pytest.raises(DatasetError, match="mixes formats"):
        load_documents("AuthorMix", dataset_path=str(tmp_path))


def test_custom_and_missing_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame([{"author": "a", "body": "x y z"}]).to_parquet(path)
    assert load_documents("AuthorMix", dataset_path=str(path), author_column="author",
                          text_column="body") == [Document(0, "a", "x y z")]
    with pytest.raises(DatasetError) as info:
        load_documents("AuthorMix", dataset_path=str(path))
    msg = str(info.value)
    assert "'style'" in msg and "'text'" in msg and "columns found: author, body" in msg


def test_news_file_filtered_by_category(tmp_path):
    path = tmp_path / "news.json"
    path.write_text(json.dumps(NEWS_ROWS))
    weather = load_documents("news", dataset_path=str(path), category_name="weather")
    assert weather == [Document(0, "cnn", NEWS_ROWS[0]["text"]), Document(2, "bbc", NEWS_ROWS[2]["text"])]
    assert len(load_documents("news", dataset_path=str(path))) == 3
    with pytest.raises(DatasetError, match="categories: sports, weather"):
        load_documents("news", dataset_path=str(path), category_name="politics")


def test_news_folder_of_categories(tmp_path):
    for category in ("sports", "weather"):
        rows = [r for r in NEWS_ROWS if r["category"] == category]
        (tmp_path / f"{category}.json").write_text(json.dumps(rows))
    docs = load_documents("news", dataset_path=str(tmp_path), category_name="weather")
    assert docs == [Document(0, "cnn", NEWS_ROWS[0]["text"]), Document(1, "bbc", NEWS_ROWS[2]["text"])]
    with pytest.raises(DatasetError, match="pass --category_name; categories in .*: sports, weather"):
        load_documents("news", dataset_path=str(tmp_path))
    with pytest.raises(DatasetError, match="--dataset_path"):
        load_documents("news")


def test_a_dataset_of_your_own_is_named_by_you_and_known_names_are_canonical(tmp_path):
    """``--dataset_name mycsv --dataset_path FILE`` reads the file as AuthorMix's local copy is read and
    names the run's dataset folder ``mycsv``; ``authormix`` (any case) is ``AuthorMix``, one tree."""
    from saestore.errors import ExtractionConfigError
    from saestore.extract.config import ExtractConfig
    from saestore.extract.data import resolve_dataset_name

    path = tmp_path / "mine.csv"
    pd.DataFrame(AUTHORMIX_ROWS).to_csv(path, index=False)
    assert load_documents("mycsv", dataset_path=str(path)) == _expected(AUTHORMIX_ROWS)
    cfg = ExtractConfig(layers=(1,), model="tiny", dataset_name="mycsv", dataset_path=str(path), output_dir="o")
    assert cfg.dataset_name == "mycsv" and Path(cfg.run_path()).parts[:2] == ("o", "mycsv")
    for spelling in ("authormix", "AUTHORMIX", " AuthorMix", "hallisky/AuthorMix"):
        assert resolve_dataset_name(spelling) == "AuthorMix"
        assert Path(ExtractConfig(layers=(1,), dataset_name=spelling).run_path()).parts[1] == "AuthorMix"
    assert resolve_dataset_name("DEMO") == "demo" and resolve_dataset_name("News", "x") == "news"
    # a name of your own is a user string: never a path that leaves its folder
    for bad in ("../up", "a/b", ".hidden", "x y"):
        with pytest.raises(ExtractionConfigError, match="cannot be part of a path"):
            ExtractConfig(layers=(1,), dataset_name=bad, dataset_path=str(path))


def test_bad_dataset_requests(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imdb': choose one of demo, AuthorMix, news, or pass "
                                           "--dataset_path FILE"):
        load_documents("imdb")
    with pytest.raises(DatasetError, match="does not exist"):
        load_documents("AuthorMix", dataset_path=str(tmp_path / "missing.parquet"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="no rows"):
        load_documents("AuthorMix", dataset_path=str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(DatasetError, match="cannot read"):
        load_documents("AuthorMix", dataset_path=str(tmp_path / "bad.txt"))


def test_authormix_hub_offline_asks_for_dataset_path(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError) as info:
        load_documents("AuthorMix")
    assert "hallisky/AuthorMix" in str(info.value) and "--dataset_path" in str(info.value)


# ----------------------------------------------------------------------------------------------
# selection filters


def _docs(spec: dict[str, list[int]]) -> list[Document]:
    """Documents from ``author -> [word counts]``, interleaved in source order."""
    out: list[Document] = []
    queues = {a: list(v) for a, v in spec.items()}
    while any(queues.values()):
        for author, q in queues.items():
            if q:
                n = q.pop(0)
                out.append(Document(len(out), author, " ".join(["w"] * n)))
    return out


def test_select_filters_short_empty_and_excluded():
    docs = _docs({"b": [10, 2, 10], "a": [10, 10], "c": [10]})
    docs.append(Document(len(docs), "a", "   \n "))
    got = select_documents(docs, n_docs=None, n_docs_per_author=None, min_length_doc=5,
                           exclude_authors=["c"])
    assert list(got) == ["a", "b"]
    assert [d.doc_id for d in got["a"]] == [1, 4]
    assert [d.doc_id for d in got["b"]] == [0, 5]


def test_select_caps_per_author_then_deals_total():
    docs = _docs({"b": [10] * 5, "a": [10] * 5, "c": [10] * 1})
    per_author = select_documents(docs, n_docs=None, n_docs_per_author=2, min_length_doc=1)
    assert {a: [d.doc_id for d in ds] for a, ds in per_author.items()} == {
        "a": [1, 4], "b": [0, 3], "c": [2]
    }
    dealt = select_documents(docs, n_docs=6, n_docs_per_author=None, min_length_doc=1)
    assert {a: len(ds) for a, ds in dealt.items()} == {"a": 3, "b": 2, "c": 1}
    assert [d.doc_id for d in dealt["a"]] == [1, 4, 6]


def test_select_drops_thin_authors_and_logs_why(caplog):
    docs = _docs({"a": [10, 10, 10], "b": [10, 1, 1], "c": [10, 10]})
    with caplog.at_level(logging.WARNING, logger="saestore.extract.data"):
        got = select_documents(docs, n_docs=None, n_docs_per_author=None, min_length_doc=5,
                               min_docs_per_author=2, exclude_authors=["zed"])
    assert list(got) == ["a", "c"]
    text = caplog.text
    assert "dropped author 'b': 1 usable documents (fewer than min_docs_per_author=2" in text
    assert "zed" in text  # excluded authors that do not exist are reported
    with caplog.at_level(logging.WARNING, logger="saestore.extract.data"):
        got = select_documents(docs, n_docs=5, n_docs_per_author=None, min_length_doc=5,
                               min_docs_per_author=2)
    assert {a: len(ds) for a, ds in got.items()} == {"a": 3, "c": 2}
    with caplog.at_level(logging.WARNING, logger="saestore.extract.data"):
        got = select_documents(docs, n_docs=3, n_docs_per_author=None, min_length_doc=5,
                               min_docs_per_author=2)
    assert {a: len(ds) for a, ds in got.items()} == {"a": 2}
    assert "dropped author 'c': n_docs=3 left it 1 documents" in caplog.text


def test_select_raises_when_nothing_is_left():
    docs = _docs({"a": [3, 3], "b": [2]})
    with pytest.raises(DatasetError, match="no documents left after filtering: 3 read, 0 empty, 3 shorter than 5"):
        select_documents(docs, n_docs=None, n_docs_per_author=None, min_length_doc=5)
    with pytest.raises(DatasetError, match="n_docs must be at least 1"):
        select_documents(docs, n_docs=0, n_docs_per_author=None, min_length_doc=0)


def test_select_on_demo_corpus():
    got = select_documents(load_documents("demo"), n_docs=10, n_docs_per_author=None,
                           min_length_doc=50, exclude_authors=["chef"])
    assert list(got) == ["astronomer", "gardener", "lawyer", "sailor"]
    assert sum(map(len, got.values())) == 10
    assert all(len(d.text.split()) >= 50 for ds in got.values() for d in ds)


def test_a_cap_above_what_there_is_is_said_once(caplog):
    """``--n_docs_per_author 60`` on the 24-document demo corpus keeps the 24 and says so in one warning
    (not one per author), naming how many were available; so does ``--n_docs`` above the total."""
    docs = load_documents("demo")
    with caplog.at_level(logging.WARNING, logger="saestore.extract.data"):
        got = select_documents(docs, n_docs=None, n_docs_per_author=60, min_length_doc=0)
    assert {len(ds) for ds in got.values()} == {24}
    assert [r.getMessage() for r in caplog.records] == [
        "n_docs_per_author=60: 5 of 5 authors have fewer usable documents (24); they keep all they have"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saestore.extract.data"):
        select_documents(_docs({"a": [10] * 3, "b": [10] * 1}), n_docs=10, n_docs_per_author=2, min_length_doc=1)
    assert [r.getMessage() for r in caplog.records] == [
        "n_docs_per_author=2: 1 of 2 authors have fewer usable documents (1); they keep all they have",
        "n_docs=10: only 3 usable documents are selected; all are kept"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saestore.extract.data"):
        select_documents(docs, n_docs=10, n_docs_per_author=24, min_length_doc=0)
    assert not caplog.records
