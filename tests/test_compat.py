"""Stores written on one zarr line, and by an earlier protocol version, read identically now.

tests/fixtures/runs/P/zarr-X.Y.zarr were written by tests/make_run_fixtures.py with zarr X.Y (3.1 on
Python 3.11, 3.4 on Python 3.13) in protocol version P: ``1.1/`` are archived unsharded stores of the
last 1.1 writer, ``1.2/`` archived sharded stores of the last 1.2 writer (no shard summaries),
``1.3/`` stores of the current one. Each is read here with the installed zarr and checked against the
reference it was drawn from; CI runs this module on both lines, so 3.1 -> 3.4 and 3.4 -> 3.1 are both
exercised, for every protocol version. Writing the same run now gives
byte-identical chunk files to the current version's fixtures (the same zstd on both lines; PROTOCOL.md
§5.3 does not promise that across zstd builds, so a failure there after a zstd upgrade means: compare
decoded payloads instead).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import saestore
import saestore.stats as st
from saestore import protocol
from saestore.validate import validate_run

from tests.helpers.stats_run import AUTHORS, LAYER_TYPES, make_reference, write_run

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
WRITTEN_BY = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.glob("*/zarr-*.zarr"))
CURRENT = [name for name in WRITTEN_BY if name.startswith(protocol.PROTOCOL_VERSION + "/")]


def test_fixtures_of_both_zarr_lines_and_every_protocol_version_exist():
    versions = ("1.1", "1.2", protocol.PROTOCOL_VERSION)
    assert {f"{p}/zarr-{z}.zarr" for p in versions for z in ("3.1", "3.4")} <= set(WRITTEN_BY)


@pytest.fixture(params=WRITTEN_BY)
def fixture_run(request, tmp_path) -> Path:
    path = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param, path)  # validate and open never write, but be sure
    return path


def test_fixture_layout_of_its_protocol_version(fixture_run):
    """1.1 fixtures are unsharded with one variable per quality metric, 1.2 ones sharded with T_quality,
    1.3 ones have shard summaries too; the quality statistics read them all."""
    import json

    attrs = protocol.read_attrs(xr.open_zarr(fixture_run).attrs)
    meta = json.loads((fixture_run / "res" / "zarr.json").read_text(encoding="utf-8"))
    ds = saestore.open_run(fixture_run)
    cos = st.quality_metric(ds, "res", "cos")
    assert cos.dims == ("author", "layer", "doc", "tok")
    if attrs.protocol_version == "1.1":
        assert attrs.storage.shard_docs is None and meta["codecs"][0]["name"] == "saestore.sparse_coo"
        assert "res_quality" not in ds and "res_cos" in ds
    else:
        assert attrs.storage.shard_docs == 4 and meta["codecs"][0]["name"] == "sharding_indexed"
        assert "res_cos" not in ds and list(ds.metric.values) == list(protocol.QUALITY_METRICS)
        assert (protocol.shard_summary_name("res") in ds) == (attrs.protocol_version != "1.2")
    np.testing.assert_array_equal(np.isnan(cos.values), True)  # the fixture stores no metric values


def test_fixture_reads_identically_with_open_run_and_open_zarr(fixture_run):
    ref = make_reference(str(fixture_run), seed=0)
    plain = xr.open_zarr(fixture_run)
    sp = saestore.open_run(fixture_run)
    assert list(plain.author.values) == list(AUTHORS)
    for lt in LAYER_TYPES:
        dense = plain[lt].values
        np.testing.assert_array_equal(dense, ref.acts[lt])
        np.testing.assert_array_equal(sp[lt].data.compute().todense(), dense)
    np.testing.assert_array_equal(plain.valid_mask.values, ref.valid_ADT)
    np.testing.assert_array_equal(plain.token_id.values, ref.token_id_ADT)
    np.testing.assert_array_equal(plain.ce_loss.values, ref.ce_loss_ADT)
    assert [str(t) for t in plain.text.values.ravel()] == [str(t) for t in ref.text_AD.ravel()]
    for name in plain.data_vars:
        if name not in LAYER_TYPES:
            np.testing.assert_array_equal(np.asarray(sp[name].values), np.asarray(plain[name].values), err_msg=name)


def test_fixture_statistics_and_validate(fixture_run):
    ref = make_reference(str(fixture_run), seed=0)
    freq = st.frequency(saestore.open_run(fixture_run), "res", by="author").compute()
    valid = ref.valid_ADT[:, None, :, :, None]
    active = ((ref.acts["res"] != 0) & valid).sum((2, 3))
    want = active / ref.valid_ADT.sum((1, 2))[:, None, None]
    np.testing.assert_allclose(freq.values, want, rtol=1e-12)
    report = validate_run(fixture_run)
    assert report.ok, report.format()
    assert protocol.read_attrs(xr.open_zarr(fixture_run).attrs).status == "complete"


def test_writing_now_gives_the_fixtures_chunk_bytes(tmp_path):
    """Every data chunk file the installed zarr writes equals the file each fixture holds (progress
    markers carry write times and the consolidated root metadata is zarr's own; both are left out)."""
    path = tmp_path / "now.zarr"
    write_run(path, seed=0)

    def chunk_files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.relative_to(root).as_posix() != "zarr.json"
                and not p.relative_to(root).as_posix().startswith(protocol.PROGRESS_PATH + "/c/")}

    now = chunk_files(path)
    assert len(now) > 40
    assert len(CURRENT) == 2
    for name in CURRENT:
        then = chunk_files(FIXTURES / name)
        assert then.keys() == now.keys(), name
        differ = [k for k in now if now[k] != then[k]]
        assert not differ, f"{name}: {differ[:5]}"
