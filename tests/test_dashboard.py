"""The feature dashboard: its quantile-bin sampler against numpy, escaping of untrusted strings, and
the site rendered in a real headless browser (Debian's chromium) from a tiny-model demo run, with
the top example, its highlighted token and the author table checked against saestore.stats."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import saestore
import saestore.stats as st
from saestore import dashboard
from saestore.featuredata import feature_data, quantile_bin_examples

from tests.helpers.stats_run import AUTHORS, write_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("dash") / "run.zarr")


def test_quantile_bin_examples_are_uniform_draws_from_their_bins(ref):
    """Every sampled example lies in its bin, is a real activation at its position, and each bin
    holds min(m, activations in the bin) examples; the draw does not depend on the chunking."""
    ds = saestore.open_run(ref.path)
    feats = [3, 4, 11]
    edges = np.array([[-np.inf, 0.5, 2.0, np.inf]] * len(feats))
    got = quantile_bin_examples(ds, "res", layer=5, feature=feats, edges_FB=edges, m=3, window=1).compute()
    x = np.where(ref.valid_ADT[:, None, :, :, None], ref.acts["res"], 0)[:, 1]  # layer 5: (A, D, T, F)
    for fi, f in enumerate(feats):
        for b in range(3):
            vals = x[..., f][x[..., f] != 0]
            n_in = int(((vals >= edges[fi, b]) & (vals < edges[fi, b + 1])).sum())
            ex = got.sel(feature=f, bin=b)
            ok = np.isfinite(ex["value"].values)
            assert ok.sum() == min(3, n_in)
            for r in np.flatnonzero(ok):
                a = AUTHORS.index(str(ex["example_author"].values[r]))
                d, t = int(ex["example_doc"].values[r]), int(ex["example_tok"].values[r])
                v = float(ex["value"].values[r])
                assert v == pytest.approx(float(x[a, d, t, f]), rel=1e-7) and edges[fi, b] <= v < edges[fi, b + 1]
                assert ex["tokens"].values[r, 1] == ref.token_ADT[a, d, t]
    rechunked = saestore.open_run(ref.path).chunk({"doc": 1})
    again = quantile_bin_examples(rechunked, "res", layer=5, feature=feats, edges_FB=edges, m=3, window=1).compute()
    np.testing.assert_array_equal(again["example_tok"].values, got["example_tok"].values)


def test_untrusted_strings_are_escaped(ref):
    """Author names, tokens and texts are data, never markup, in both pages and their inline JSON."""
    ds = saestore.open_run(ref.path)
    data = feature_data(ds, "res", 2, [4], k=2, window=1, per_bin=1, show_progress=False)
    evil = '</script><script>alert(1)</script><img src=x onerror="alert(2)">&amp;'
    f = data["features"][0]
    f["authors"][0]["author"] = evil
    f["top"][0]["author"] = evil
    f["top"][0]["tokens"][f["top"][0]["center"]] = evil
    data["authors"][0] = evil
    page = dashboard.render_feature_page(data, f, evil, (None, None))
    index = dashboard.render_index(data, evil)
    for text in (page, index):
        assert "<script>alert" not in text and "<img" not in text and 'onerror="' not in text
    assert html.escape(evil) in page  # shown as text
    assert "\\u003c/script\\u003e" in page and "\\u003c/script\\u003e" in index  # JSON cannot close its element


def test_cli_errors(ref, tmp_path, capsys):
    from saestore.__main__ import main

    assert main(["dashboard", ref.path, "--layer_type", "res", "--layer", "7", "--out", str(tmp_path / "d")]) == 2
    assert "layer" in capsys.readouterr().err
    assert main(["dashboard", ref.path, "--layer_type", "res", "--layer", "2", "--feature", "4",
                 "--out", str(tmp_path / "missing" / "d")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["dashboard", ref.path, "--layer_type", "res", "--layer", "2", "--feature", "4", "400",
                 "--out", str(tmp_path / "d")]) == 2
    assert "400" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "missing").exists()


def test_rewrite_replaces_the_previous_pages(ref, tmp_path):
    out = tmp_path / "d"
    dashboard.write_dashboard(ref.path, out, layer_type="res", layer=2, features=[3, 4], k=2, window=1,
                              show_progress=False)
    dashboard.write_dashboard(ref.path, out, layer_type="res", layer=2, features=[4, 5], k=2, window=1,
                              show_progress=False)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["4.html", "5.html"]


# --- in a real browser -------------------------------------------------------------------------------


def chromium() -> str:
    """The chromium executable; skip (fail under CI_REQUIRE_CHROMIUM=1) when there is none."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    msg = "chromium is not on PATH (Debian: apt-get install -y chromium); .ci/run installs it"
    if os.environ.get("CI_REQUIRE_CHROMIUM") == "1":
        pytest.fail(msg + " and CI_REQUIRE_CHROMIUM=1")
    pytest.skip(msg)


def browse(exe: str, url: str, profile: Path, *extra: str) -> str:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={profile}", *extra, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


class Tree(HTMLParser):
    """A minimal DOM: every element as ``(tag, attrs, text inside it)`` in document order."""

    VOID = {"meta", "br", "img", "input", "hr", "link", "line", "rect"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.open: list[int] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict((k, v or "") for k, v in attrs), []))
        if tag not in self.VOID:
            self.open.append(len(self.elements) - 1)

    def handle_endtag(self, tag):
        while self.open:
            if self.elements[self.open.pop()][0] == tag:
                break

    def handle_data(self, data):
        for i in self.open:
            self.elements[i][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[str, dict[str, str], str]]:
        return [(t, a, "".join(x)) for t, a, x in self.elements
                if t == tag and all(a.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def demo_run(tiny_cache, tmp_path_factory) -> Path:
    """The built-in corpus through the tiny model, res SAE at layer 3 (as in test_notebooks)."""
    pytest.importorskip("transformer_lens", reason="needs the 'extract' extra to extract the demo run")
    from saestore.extract.launch import main as extract

    out = tmp_path_factory.mktemp("dashrun")
    assert extract(["--model", "tiny", "--dataset_name", "demo", "--layers", "3", "--layer_types", "res",
                    "--sae_features_width", "1k", "--max_seq_len", "64", "--use_error_term", "--output_dir",
                    str(out), "--run_name", "dash", "--quiet"]) == 0
    return out / "demo" / "tiny" / "dash.zarr"


@pytest.mark.extract
def test_dashboard_in_headless_chromium(demo_run, tmp_path):
    exe = chromium()
    out = tmp_path / "site"
    from saestore.__main__ import main

    assert main(["dashboard", str(demo_run), "--layer_type", "res", "--layer", "3", "--top_author_features", "3",
                 "--k", "8", "--window", "8", "--out", str(out)]) == 0
    ds = saestore.open_run(demo_run)
    spec = st.author_specificity(ds, "res", layer=3).compute()
    chosen = sorted({int(f) for a in spec.author.values
                     for f in spec.feature.values[np.argsort(-spec.z.sel(author=a).values, kind="stable")[:3]]})
    assert sorted(int(p.stem) for p in (out / "features").glob("*.html")) == chosen
    total = sum(p.stat().st_size for p in out.rglob("*.html"))
    assert total < 80_000 * (len(chosen) + 1)  # "a few MB for 100 features"

    # the index: its script builds one row per feature from the inline JSON
    index = Tree(browse(exe, (out / "index.html").as_uri(), tmp_path / "profile", "--dump-dom"))
    rows = index.find("tr")[1:]
    assert sorted(int(a["data-feature"]) for _, a, _ in rows) == chosen
    freq = st.frequency(ds, "res", layer=3, feature=chosen).compute()
    first = int(freq.feature.values[np.argmax(freq.values)])
    assert int(rows[0][1]["data-feature"]) == first  # sorted by frequency, highest first

    # a feature page: the top example, its highlighted token and the author table match the statistics
    f = chosen[0]
    page = Tree(browse(exe, (out / "features" / f"{f}.html").as_uri(), tmp_path / "profile", "--dump-dom"))
    te = st.top_examples(ds, "res", layer=3, feature=f, k=1, window=8).compute().isel(rank=0)
    ex = page.find("div", **{"class": "ex"})[0]
    assert ex[1]["data-author"] == str(te["example_author"].values)
    assert int(ex[1]["data-doc-id"]) == int(te["example_doc_id"]) and int(ex[1]["data-tok"]) == int(te["example_tok"])
    assert float(page.find("span", **{"class": "v"})[0][2]) == pytest.approx(float(te["value"]), rel=1e-3)
    hit = page.find("span", **{"class": "hit"})[0]
    assert hit[2] == (str(te["tokens"].values[8]).replace("\n", "↵") or "\u2009")
    assert float(hit[1]["title"]) == pytest.approx(float(te["value"]), rel=1e-3)
    table = {a["data-author"]: txt for _, a, txt in page.find("tr") if "data-author" in a}
    assert set(table) == {str(a) for a in spec.author.values}
    tds = [txt for t, _, txt in page.find("td")]
    for a in spec.author.values:
        i = tds.index(str(a))
        count, frequency = int(tds[i + 1].replace(",", "")), float(tds[i + 2])
        assert count == int(spec["count"].sel(author=a, feature=f))
        assert frequency == pytest.approx(float(spec["frequency"].sel(author=a, feature=f)), rel=1e-3)
    assert page.find("svg", id="histogram") and page.find("rect", **{"class": "bar"})

    shot = tmp_path / "feature_page.png"
    browse(exe, (out / "features" / f"{f}.html").as_uri(), tmp_path / "profile", "--window-size=1200,1500",
           f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    if os.environ.get("SAESTORE_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "img" / "feature_page.png")


def test_index_of_1000_features_sorts_and_filters_in_the_browser(ref, tmp_path):
    """An index of 1,000 features renders all its rows; the view in the address (author filter,
    sort key and direction) gives exactly that author's features in that order."""
    exe = chromium()
    ds = saestore.open_run(ref.path)
    data = feature_data(ds, "res", 2, list(range(3, 40)), k=1, window=1, per_bin=1, show_progress=False)
    base = data["features"]
    many = []
    for i in range(1000):
        f = dict(base[i % len(base)])
        f["feature"] = i
        f["max"] = (f["max"] or 0.0) + i * 1e-3  # distinct values, so the order is unique
        many.append(f)
    data["features"] = many
    (tmp_path / "index.html").write_text(dashboard.render_index(data, "synthetic"), encoding="utf-8")
    url = (tmp_path / "index.html").as_uri()
    rows = Tree(browse(exe, url, tmp_path / "profile", "--dump-dom")).find("tr")[1:]
    assert len(rows) == 1000
    by_id = {f["feature"]: f for f in many}
    top_author = {r["feature"]: r["top_author"] for r in dashboard._index_rows(data)}
    author = AUTHORS[2]
    shown = Tree(browse(exe, f"{url}#author={author}&sort=max&dir=desc", tmp_path / "profile", "--dump-dom"))
    ids = [int(a["data-feature"]) for _, a, _ in shown.find("tr")[1:]]
    want = sorted((f for f in by_id if top_author[f] == author), key=lambda f: -by_id[f]["max"])
    assert ids == want and 0 < len(ids) < 1000


def test_one_author_dashboard_has_no_specificity(ref, tmp_path):
    """With one author selected, the pages show its frequencies, the examples are its own, and the
    features are its most frequent ones."""
    out = dashboard.write_dashboard(ref.path, tmp_path / "d", layer_type="mlp", layer=5, author=["zoë"],
                                    top_author_features=3, k=3, window=1, show_progress=False)
    freq = st.frequency(saestore.open_run(ref.path), "mlp", layer=5, author=["zoë"]).compute()
    want = sorted(int(f) for f in freq.feature.values[np.argsort(-freq.values, kind="stable")[:3]])
    assert sorted(int(p.stem) for p in (out / "features").glob("*.html")) == want
    data = feature_data(saestore.open_run(ref.path), "mlp", 5, want, k=3, window=1, per_bin=2, author="zoë",
                        show_progress=False)
    assert data["authors"] == ["zoë"]
    for f in data["features"]:
        assert f["authors"][0]["z"] is None and f["authors"][0]["frequency"] == f["frequency"]
        assert {e["author"] for e in f["top"]} | {e["author"] for b in f["bins"] for e in b["examples"]} <= {"zoë"}
