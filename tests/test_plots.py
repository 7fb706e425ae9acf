"""Each plot renders to a non-trivial PNG from real statistics of the synthetic run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.figure import Figure
from PIL import Image

import saestore
import saestore.stats as st
from saestore import plots

from tests.helpers.stats_run import write_run


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "run.zarr"
    write_run(path)
    return saestore.open_run(str(path))


def check_png(fig: Figure, path) -> None:
    assert isinstance(fig, Figure)
    fig.savefig(path, dpi=80)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    img = Image.open(path).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # something was drawn
    assert img.size[0] > 200 and img.size[1] > 100


def test_feature_density(ds, tmp_path):
    check_png(plots.feature_density(st.frequency(ds)), tmp_path / "density.png")


def test_l0_distribution_per_author_and_sae(ds, tmp_path):
    check_png(plots.l0_distribution(st.l0_histogram(ds, by="author")), tmp_path / "l0.png")
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.l0_distribution(st.l0_histogram(ds, "res", layer=2), ax=ax) is fig
    with pytest.raises(ValueError, match="select one"):
        plots.l0_distribution(st.l0_histogram(ds, "res"), ax=ax)


def test_author_heatmap(ds, tmp_path):
    spec = st.author_specificity(ds, "res", layer=2)
    check_png(plots.author_heatmap(spec, n=4), tmp_path / "heatmap.png")


def test_feature_card(ds, tmp_path):
    ex = st.top_examples(ds, "res", layer=2, feature=[3, 4], k=6, window=4)
    check_png(plots.feature_card(ex, feature=4), tmp_path / "card.png")
    never = st.top_examples(ds, "res", layer=2, feature=0, k=3)
    check_png(plots.feature_card(never), tmp_path / "card_dead.png")
