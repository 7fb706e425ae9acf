"""The extraction pipeline's host side without a model: batch results sliced into doc-chunks, and
the background writer (order, backpressure, errors). The model-backed worker is covered by
test_extract.py and the kill harness in test_reliability.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from saestore.bench.synthetic import synthetic_sae_chunk
from saestore.errors import StoreWriteError
from saestore.extract.batches import BatchResult, ChunkSink


def _batch(n_docs: int, seed: int) -> BatchResult:
    chunk = synthetic_sae_chunk(n_docs, 16, seed=seed, n_features=64, l0=5)
    acts = chunk.to_sparse_acts()
    valid = chunk.valid_DT
    rng = np.random.default_rng(seed)
    token_ids = np.where(valid, rng.integers(0, 100, valid.shape), -1).astype(np.int32)
    ce = np.where(valid, rng.random(valid.shape), np.nan).astype(np.float32)
    return BatchResult(token_ids=token_ids, token=np.where(valid, "t", "").astype(object), valid=valid, ce=ce,
                       entropy=ce * 2, n_truncated=np.arange(n_docs, dtype=np.int32), acts={("res", 1): acts},
                       per_sae={("res_cos", 1): ce * 3, ("res_ce_zero", 1): np.arange(n_docs, dtype=np.float32)},
                       per_doc={"ce_clean": np.arange(n_docs, dtype=np.float32)})


def _assert_equal(a: BatchResult, b: BatchResult) -> None:
    for name in ("token_ids", "token", "valid", "ce", "entropy", "n_truncated"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for k in a.acts:
        np.testing.assert_array_equal(a.acts[k].to_dense(), b.acts[k].to_dense())
    for group in ("per_sae", "per_doc"):
        assert getattr(a, group).keys() == getattr(b, group).keys()
        for k in getattr(a, group):
            np.testing.assert_array_equal(getattr(a, group)[k], getattr(b, group)[k])


def test_doc_chunks_sliced_from_joined_batches_equal_the_batch_they_came_from():
    whole = _batch(7, seed=1)
    parts = [whole.docs(0, 3), whole.docs(3, 4), whole.docs(4, 7)]
    _assert_equal(BatchResult.concat(parts), whole)
    _assert_equal(BatchResult.concat(parts).docs(2, 5), whole.docs(2, 5))
    dense = whole.acts[("res", 1)].to_dense()
    np.testing.assert_array_equal(whole.docs(2, 5).acts[("res", 1)].to_dense(), dense[2:5])


def test_sink_writes_in_order_and_never_holds_more_than_its_depth():
    written, waiting = [], []
    gate = threading.Event()

    def write(job: int) -> None:
        gate.wait()
        written.append(job)

    with ChunkSink(write, depth=2) as sink:
        submitter = threading.Thread(target=lambda: [sink.submit(j) for j in range(6)])
        submitter.start()
        time.sleep(0.3)
        waiting.append(sink._queue.qsize())  # the writer holds job 0; jobs 1, 2 wait; the submitter blocks on 3
        assert submitter.is_alive(), "submit must block once depth doc-chunks wait (backpressure)"
        gate.set()
        submitter.join(5)
        sink.drain()
    assert waiting == [2]
    assert written == list(range(6))
    assert sink.busy_s > 0


def test_sink_reraises_the_first_failed_write_skips_the_rest_then_goes_on():
    written = []

    def write(job: int) -> None:
        if job == 2:
            raise StoreWriteError("disk full while writing job 2")
        time.sleep(0.01)
        written.append(job)

    with ChunkSink(write, depth=3) as sink:
        with pytest.raises(StoreWriteError, match="job 2"):
            for j in range(6):
                sink.submit(j)
            sink.drain()
        assert written[:2] == [0, 1] and 2 not in written
        skipped = set(range(6)) - set(written) - {2}
        assert skipped, "doc-chunks queued behind a failed write are left for the rerun"
        sink.submit(10)  # a later author's doc-chunks are written again
        sink.drain()
    assert written[-1] == 10


def test_inline_sink_writes_before_submit_returns():
    written = []
    with ChunkSink(written.append, depth=0) as sink:
        sink.submit("a")
        assert written == ["a"]
        sink.drain()
