"""Bits-per-byte and per-document loss against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
import zarr

import saestore
import saestore.stats as st

from tests.helpers.stats_run import write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("loss") / "run.zarr")
    write_run(path)
    g = zarr.open_group(path, mode="r+")
    trunc = g["n_truncated"][...]
    trunc[0, 1] = 3  # one truncated document: left out of the aggregates
    g["n_truncated"][...] = trunc
    return path


def test_bits_per_byte_equals_hand_computation(run):
    raw = xr.open_zarr(run).load()
    ds = saestore.open_run(run)
    per_doc = st.doc_loss(ds).compute()
    agg = ds.sae.bits_per_byte(by="author").compute()
    for a, author in enumerate(raw.author.values):
        bits_sum = bytes_sum = tokens = 0
        for d in range(int(raw.n_docs[a])):
            n = int(raw.doc_length[a, d])
            ce = raw.ce_loss.values[a, d, :n].astype(np.float64)
            text = str(raw.text.values[a, d]).encode("utf-8")
            bits = ce.sum() / math.log(2)
            assert per_doc.n_tokens.values[a, d] == n
            assert per_doc.bytes.values[a, d] == len(text)
            assert per_doc.bits.values[a, d] == pytest.approx(bits, rel=1e-9)
            assert per_doc.mean_ce.values[a, d] == pytest.approx(ce.mean(), rel=1e-9)
            if int(raw.n_truncated[a, d]):
                assert np.isnan(per_doc.bits_per_byte.values[a, d])
                continue
            assert per_doc.bits_per_byte.values[a, d] == pytest.approx(bits / len(text), rel=1e-9)
            bits_sum, bytes_sum, tokens = bits_sum + bits, bytes_sum + len(text), tokens + n
        got = agg.sel(author=author)
        assert float(got.bits_per_byte) == pytest.approx(bits_sum / bytes_sum, rel=1e-9)
        assert float(got.mean_ce) == pytest.approx(bits_sum * math.log(2) / tokens, rel=1e-9)
    pooled = st.bits_per_byte(ds, by=None).compute()
    weighted = float((agg.bits_per_byte * agg.bytes).sum() / agg.bytes.sum())
    assert float(pooled.bits_per_byte) == pytest.approx(weighted, rel=1e-9)
    assert int(pooled.n_docs) == int(agg.n_docs.sum()) == int(raw.n_docs.sum()) - 1
