"""``python -m saestore.bench --objstore``: a run on S3 next to the same run on local disk.

A local S3-compatible server (moto's server mode, its own process) is started on 127.0.0.1 for the
measurement.
The same synthetic run (every doc-chunk generated from ``(seed, author, chunk)``) is written with
:class:`saestore.writer.RunWriter` to a local folder and to ``s3://bench/run.zarr``. Then, for
each, the bench measures three things: write throughput, the full scan behind
``frequency(by="author")`` through :func:`saestore.open_run` with dask's threaded scheduler
(default threads, and 16 threads: reads from an object store wait on the network, not the CPU),
and the median latency of reading one document of one SAE. While the scan runs, every store
request is counted at zarr's store interface (``FsspecStore.get``), giving the requests in flight
(peak and time-weighted mean) and the request rate.

The server is in the same machine: these figures are the client's overheads (HTTP, signing, s3fs,
zarr's async layer), not a network's latency or bandwidth. A real bucket adds its round-trip time
to every request, which is what concurrency hides.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from saestore import protocol
from saestore.bench.workloads import SyntheticWorkload, write_workload
from saestore.errors import BenchError

__all__ = ["FULL_OBJSTORE", "QUICK_OBJSTORE", "measure_objstore", "markdown"]

FULL_OBJSTORE = SyntheticWorkload(n_authors=8, n_docs=64, n_tok=1023, n_features=16384, layer_types=("res",),
                                  chunk_docs=4)
QUICK_OBJSTORE = SyntheticWorkload(n_authors=3, n_docs=8, n_tok=127, n_features=2048, l0=20, layer_types=("res",),
                                   chunk_docs=2)
MANY_THREADS = 16


@contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, in its own process (so it does not share this one's GIL), and
    the environment pointing botocore and s3fs at it."""
    try:
        import moto.server  # noqa: F401
        import s3fs
    except ImportError as e:
        raise BenchError(f"--objstore needs s3fs and moto ({e}): pip install 'saestore[bench]'") from None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise BenchError(f"the moto S3 server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3fs.S3FileSystem().mkdir("bench")
        yield "s3://bench"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        server.wait(30)


class RequestCounter:
    """Counts ``FsspecStore.get`` calls in flight while installed (what zarr asks the store for)."""

    def __init__(self) -> None:
        self.in_flight = self.peak = self.n = 0
        self._area = 0.0
        self._t = time.perf_counter()
        self._t0 = self._t

    def _tick(self, delta: int) -> None:
        now = time.perf_counter()
        self._area += self.in_flight * (now - self._t)
        self._t = now
        self.in_flight += delta
        self.peak = max(self.peak, self.in_flight)

    @contextmanager
    def installed(self) -> Iterator[RequestCounter]:
        from zarr.storage import FsspecStore

        original = FsspecStore.get
        counter = self

        async def get(store: Any, *args: Any, **kwargs: Any) -> Any:
            counter._tick(+1)
            counter.n += 1
            try:
                return await original(store, *args, **kwargs)
            finally:
                counter._tick(-1)

        FsspecStore.get = get  # type: ignore[method-assign]
        self._t0 = self._t = time.perf_counter()
        try:
            yield self
        finally:
            FsspecStore.get = original  # type: ignore[method-assign]
            self._tick(0)

    @property
    def mean_in_flight(self) -> float:
        return self._area / max(self._t - self._t0, 1e-9)


def _scan(path: str, lt: str, num_workers: int | None) -> tuple[float, np.ndarray, RequestCounter]:
    from saestore import stats
    from saestore.reader import open_run

    ds = open_run(path)
    # the full scan of the SAE chunks (what the section measures), not the §2.8 summaries
    ds = ds.drop_vars([name for name in ds.data_vars if name == protocol.summary_name(lt)])
    counter = RequestCounter()
    with counter.installed():
        t0 = time.perf_counter()
        kw = {"scheduler": "threads", **({"num_workers": num_workers} if num_workers else {})}
        freq = stats.frequency(ds, lt, by="author").compute(**kw)
        seconds = time.perf_counter() - t0
    return seconds, freq.values, counter


def _one_doc(path: str, wl: SyntheticWorkload, n_reads: int) -> float:
    from saestore.reader import open_run

    var = open_run(path)[wl.layer_types[0]]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(n_reads):
        a, d = int(rng.integers(wl.n_authors)), int(rng.integers(wl.n_docs))
        t0 = time.perf_counter()
        var.isel(author=a, layer=0, doc=d).data.compute()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_objstore(wl: SyntheticWorkload, work: Path, *, n_reads: int = 25) -> dict[str, Any]:
    """Write and read ``wl`` on local disk and on a local S3 server, side by side."""
    out: dict[str, Any] = {"workload": wl.to_json(), "token_positions": wl.n_authors * wl.n_docs * wl.n_tok,
                           "stores": {}}
    local = work / "objstore-local.zarr"
    shutil.rmtree(local, ignore_errors=True)
    lt = wl.layer_types[0]
    with s3_server() as bucket:
        for name, path in (("local", str(local)), ("s3", f"{bucket}/run.zarr")):
            res = write_workload(wl, path)
            scans = {}
            for label, threads in (("default threads", None), (f"{MANY_THREADS} threads", MANY_THREADS)):
                seconds, freq, counter = _scan(path, lt, threads)
                scans[label] = {"scan_s": seconds, "scan_nnz_per_s": res["nnz"] / seconds,
                                "requests": counter.n, "peak_in_flight": counter.peak,
                                "mean_in_flight": counter.mean_in_flight, "requests_per_s": counter.n / seconds,
                                "freq_sum": float(np.nansum(freq))}
            res["scans"] = scans
            res["read_one_doc_median_s"] = _one_doc(path, wl, n_reads)
            out["stores"][name] = res
    shutil.rmtree(local, ignore_errors=True)
    loc, s3 = out["stores"]["local"], out["stores"]["s3"]
    sums = {s["freq_sum"] for r in (loc, s3) for s in r["scans"].values()}
    if len({round(x, 6) for x in sums}) != 1:
        raise BenchError(f"the scans disagree: frequency sums {sorted(sums)}")
    many = f"{MANY_THREADS} threads"
    out["ratios"] = {
        "write_s3_over_local": s3["write_nnz_per_s"] / loc["write_nnz_per_s"],
        "scan_s3_over_local": s3["scans"]["default threads"]["scan_nnz_per_s"]
        / loc["scans"]["default threads"]["scan_nnz_per_s"],
        f"scan_s3_{MANY_THREADS}_threads_over_default": s3["scans"][many]["scan_nnz_per_s"]
        / s3["scans"]["default threads"]["scan_nnz_per_s"],
        "one_doc_latency_s3_over_local": s3["read_one_doc_median_s"] / loc["read_one_doc_median_s"],
    }
    return out


def markdown(res: dict[str, Any]) -> str:
    wl = res["workload"]
    lines = [f"Synthetic run: {wl['n_authors']} authors × {wl['n_docs']} docs × {wl['n_tok']} tokens "
             f"({res['token_positions']:,} token positions), one {wl['n_features']:,}-wide SAE at L0 {wl['l0']:g}, "
             f"{res['stores']['local']['nnz']:,} nonzeros.", "",
             "| store | write (M nnz/s) | scan, threads | scan (M nnz/s) | requests | peak / mean in flight | "
             "requests/s | one document (ms) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["stores"].items():
        for i, (label, s) in enumerate(r["scans"].items()):
            lines.append(f"| {name if i == 0 else ''} | {r['write_nnz_per_s'] / 1e6:.2f} | {label} | "
                         f"{s['scan_nnz_per_s'] / 1e6:.2f} | {s['requests']:,} | {s['peak_in_flight']} / "
                         f"{s['mean_in_flight']:.1f} | {s['requests_per_s']:,.0f} | "
                         f"{r['read_one_doc_median_s'] * 1e3:.1f} |" if i == 0 else
                         f"| | | {label} | {s['scan_nnz_per_s'] / 1e6:.2f} | {s['requests']:,} | "
                         f"{s['peak_in_flight']} / {s['mean_in_flight']:.1f} | {s['requests_per_s']:,.0f} | |")
    lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items())]
    return "\n".join(lines)
