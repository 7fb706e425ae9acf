"""Reliability: kill anywhere and resume exactly, corruption detected and repaired, one writer per
run, failing writes.

Extractions that are killed run in real separate processes, forked from a fork server that has
imported torch, sae_lens and saestore once (``import sae_lens`` alone takes 8 s), so each run costs
what the extraction itself costs. Kills are deterministic (``SAESTORE_FAULT``, see
:mod:`saestore.faults`: SIGKILL at the N-th pass of a named point) plus a few at random times.
Every killed run is followed by the same command again, and the final store must be
byte-identical, chunk file by chunk file, to one uninterrupted run, with status ``complete`` in
the store and in the registry. The figures (kill points, corruptions) are printed at the end of
the module (``pytest -s``) for the README's Guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from saestore import protocol
from saestore.errors import CorruptChunkError
from saestore.writer import CREATING_SUFFIX, read_progress

pytestmark = pytest.mark.extract

#: small on purpose: 3 authors x 5 documents, 3 doc-chunks (2, 2, 1 documents) per author in 2 shards
#: (doc-chunks 0-1 and 2), batches of 4 documents spanning one shard, two SAE layers; 6 forward
#: passes, 9 doc-chunks, 6 shards (each written whole, then its markers in one write).
ARGS = ["--model", "tiny", "--dataset_name", "demo", "--layers", "1", "3", "--layer_types", "res",
        "--sae_features_width", "1k", "--n_docs_per_author", "5", "--exclude_authors", "lawyer", "gardener",
        "--chunk_docs", "2", "--shard_docs", "4", "--batch_size", "4", "--max_seq_len", "32", "--devices", "cpu",
        "--quiet"]
N_CHUNKS = 9
N_SHARDS = 6
CHUNKS_PER_SHARD = 2
PAYLOADS_PER_SHARD = 2 + 1 + 9  # two SAE shards, res_quality, five per-token and four per-document variables
N_CREATE = 6 + 1 + 11 + 1  # create_array passes: coordinates, SAE variable, other variables, attributes

#: Each scenario: the faults of consecutive runs of the same command, each run killed by SIGKILL
#: at the N-th pass of the point; then one run without a fault must finish the run exactly.
SCENARIOS = {
    "lock": ["lock:1"],
    "create-first-array": ["create_array:1"],
    "create-mid": ["create_array:8"],
    "create-before-attrs": [f"create_array:{N_CREATE}"],
    "created": ["created:1"],
    "forward-first": ["forward:1"],
    "forward-mid-author": ["forward:2"],
    "forward-last": ["forward:6"],
    "payload-between-sae-layers": ["payload:1"],
    "payload-per-token": ["payload:5"],
    "payload-second-shard": [f"payload:{PAYLOADS_PER_SHARD + 3}"],
    "payload-late": [f"payload:{4 * PAYLOADS_PER_SHARD + 10}"],
    "before-marker-first": ["before_marker:1"],
    "before-marker-second-shard": ["before_marker:2"],
    "before-marker-last": [f"before_marker:{N_SHARDS}"],
    "after-marker-first": ["after_marker:1"],
    "after-marker-mid": ["after_marker:4"],
    "after-marker-last": [f"after_marker:{N_SHARDS}"],
    "workers-done": ["workers_done:1"],
    "finalize-attrs": ["finalize_attrs:1"],
    "finalized": ["finalized:1"],
    # killed at a forward while the background writer still sleeps inside the first shard's write
    # (checked: none of its 2 doc-chunks has a marker), or after that shard's markers while the
    # second shard waits in the queue (checked: at most the first shard's 2 doc-chunks are marked)
    "writer-behind-mid-payloads": ["payload:3:sleep2,forward:2"],
    "writer-behind-before-marker": ["before_marker:1:sleep2,forward:2"],
    "writer-behind-second-shard": ["after_marker:1:sleep2,forward:3"],
    # kills during resumes
    "resume-reopen": ["after_marker:3", "reopen:1"],
    "resume-chain": ["before_marker:4", "forward:1", "payload:3", "after_marker:2"],
    "resume-finalize": ["after_marker:5", "finalize_attrs:1", "finalized:1"],
}
N_RANDOM_KILLS = 4
FIGURES: dict[str, int] = {}


# --------------------------------------------------------------------------------------------
# running the CLI in a separate process, forked from a warm fork server
# --------------------------------------------------------------------------------------------

def _fail_writes(after_markers: int, n_failures: int) -> None:
    """Make this process's local zarr writes fail with ENOSPC once ``after_markers`` progress markers
    are written (``n_failures`` writes in a row, 0 = every later write: the disk stays full)."""
    from zarr.storage import LocalStore

    original = LocalStore.set
    state = {"markers": 0, "failed": 0}

    async def set_or_fail(self, key, value, *args, **kwargs):
        if state["markers"] >= after_markers and (n_failures == 0 or state["failed"] < n_failures):
            state["failed"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", key)
        await original(self, key, value, *args, **kwargs)
        state["markers"] += key.startswith(protocol.PROGRESS_PATH + "/c/")

    LocalStore.set = set_or_fail


def _child(argv: list[str], fault: str | None, cache: str, log_path: str,
           fail_writes: tuple[int, int] | None = None) -> None:
    """Body of one extraction process: ``python -m saestore.extract ARGV`` with a fault plan."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["SAESTORE_CACHE"] = cache
    from saestore import faults
    from saestore.extract.launch import main

    faults.configure(fault)
    if fault:
        os.environ[faults.ENV] = fault  # spawned workers read it when they import saestore.faults
    if fail_writes is not None:
        _fail_writes(*fail_writes)
    # One torch thread per extraction (the CLI takes cpu_count // workers): on a shared 2-core
    # machine two OpenMP threads spin against other processes, 13 ms vs 60-550 ms per forward here.
    os.cpu_count = lambda: 1
    buf = io.StringIO()
    code = 99
    try:
        with contextlib.redirect_stderr(buf):
            code = main(argv)
    except BaseException:
        import traceback

        buf.write(traceback.format_exc())
    os.write(fd, f"\n@@stderr@@{buf.getvalue()}".encode())
    os._exit(code)


@pytest.fixture(scope="module")
def procs() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "sae_lens", "transformer_lens", "xarray", "zarr", "saestore.extract.launch",
                                "saestore.extract.models", "saestore.extract.worker", "test_reliability"])
    return ctx


class Extraction:
    """One extraction process (a fork of the warm server)."""

    def __init__(self, ctx: mp.context.BaseContext, out: Path, name: str, cache: Path, fault: str | None = None,
                 extra: tuple[str, ...] = (), fail_writes: tuple[int, int] | None = None) -> None:
        self.log = out / f"{name}.{time.monotonic_ns()}.log"
        argv = [*ARGS, "--output_dir", str(out), "--run_name", name, *extra]
        self.proc = ctx.Process(target=_child, args=(argv, fault, str(cache), str(self.log), fail_writes))
        self.proc.start()

    def wait(self, timeout: float = 300) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"extraction hung; log:\n{self.output()}"
        return self.proc.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stderr(self) -> str:
        return self.output().rpartition("@@stderr@@")[2]


def _run(ctx, out: Path, name: str, cache: Path, fault: str | None = None) -> int:
    run = Extraction(ctx, out, name, cache, fault)
    code = run.wait()
    if code not in (0, -signal.SIGKILL):
        print(run.output())
    return code


# --------------------------------------------------------------------------------------------
# comparing stores
# --------------------------------------------------------------------------------------------

def _files(path: Path) -> dict[str, bytes]:
    """Every chunk file of a run (metadata and progress markers aside; they hold times)."""
    out = {}
    for p in path.rglob("*"):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and p.name != "zarr.json" and not rel.startswith(protocol.PROGRESS_PATH) \
                and not p.name.endswith(".partial"):
            out[rel] = p.read_bytes()
    return out


def _attrs(path: Path) -> dict:
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["saestore"]
    return {k: v for k, v in attrs.items() if k not in ("created_at", "finalized_at", "library_versions", "run_id")}


def assert_same_run(path: Path, ref: Path, registry: Path | None = None) -> None:
    """``path`` is complete and byte-identical to ``ref`` (chunk files, markers, attributes)."""
    want, got = _files(ref), _files(path)
    assert sorted(got) == sorted(want), f"chunk files differ: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"chunk files with other bytes: {differ}"
    np.testing.assert_array_equal(read_progress(path)[..., :3], read_progress(ref)[..., :3])
    assert _attrs(path) == _attrs(ref)
    assert _attrs(path)["status"] == "complete"
    consolidated = zarr.open_group(str(path), mode="r", use_consolidated=True)
    assert consolidated.attrs["saestore"]["status"] == "complete"
    assert not Path(str(path) + CREATING_SUFFIX).exists()
    if registry is not None:
        with contextlib.closing(sqlite3.connect(registry)) as db:
            status = db.execute("SELECT status FROM runs WHERE path = ?", (str(Path(path).resolve()),)).fetchone()
        assert status == ("complete",), status


def _shown_status(registry: Path, path: Path) -> str:
    """What ``runs list`` shows for the run at ``path``."""
    from saestore.registry import Registry, shown_status

    return next(shown_status(r) for r in Registry(registry).list() if Path(r.path).resolve() == path.resolve())


def assert_marked_chunks_match(path: Path, ref: Path) -> int:
    """After a kill: every doc-chunk with a marker holds exactly the reference's bytes. Returns how many."""
    if not (path / protocol.PROGRESS_PATH / "zarr.json").exists():
        return 0
    progress = read_progress(path)
    done = progress[..., 0] == 1
    np.testing.assert_array_equal(progress[done][:, :3], read_progress(ref)[done][:, :3])
    want, got = _files(ref), _files(path)
    layered: dict[str, bool] = {}
    for key, data in want.items():
        parts = key.split("/")  # var/c/author/... : SAE (a, layer, s, 0, 0), token (a, s, 0), doc (a, s)
        if parts[1] == "c" and parts[0] not in layered:
            dims = zarr.open_array(str(ref), path=parts[0], mode="r").metadata.dimension_names or ()
            layered[parts[0]] = tuple(dims[:2]) == ("author", "layer")
        if layered.get(parts[0]):  # SAE variables and the §2.6 quality variables: (a, layer, s, ...)
            a, s = int(parts[2]), int(parts[4])
        elif parts[1] == "c" and len(parts) >= 4 and parts[0] not in protocol.COORDS and parts[0] != "n_docs":
            a, s = int(parts[2]), int(parts[3])
        else:
            continue
        if done[a, s * CHUNKS_PER_SHARD]:  # a shard's markers are written together, after all of it
            assert got.get(key) == data, f"{key} of a marked shard differs after a kill"
    return int(done.sum())


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(procs, tiny_cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reliability")
    assert _run(procs, out, "warm-up", tiny_cache, "lock:1") == -signal.SIGKILL  # starts the fork server
    t0 = time.perf_counter()
    run = Extraction(procs, out, "ref", tiny_cache)
    assert run.wait() == 0, run.output()
    seconds = time.perf_counter() - t0
    path = out / "demo" / "tiny" / "ref.zarr"
    assert (read_progress(path)[..., 0] == 1).sum() == N_CHUNKS
    return {"out": out, "path": path, "seconds": seconds, "cache": tiny_cache,
            "registry": out / "saestore_runs.sqlite"}


def _path(reference: dict, name: str) -> Path:
    return reference["out"] / "demo" / "tiny" / f"{name}.zarr"


# --------------------------------------------------------------------------------------------
# 1. kill anywhere, resume exactly
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_at_every_fault_point_then_resume_exactly(procs, reference):
    """SIGKILL at each scenario's fault points (store creation, forward passes, between a chunk's
    payloads, between payloads and marker, finalization, during resumes); the same command then
    finishes the run byte-identically to the uninterrupted one."""
    out, cache, ref = reference["out"], reference["cache"], reference["path"]
    n_kills = 0
    for name, faults in SCENARIOS.items():
        path = _path(reference, name)
        for fault in faults:
            code = _run(procs, out, name, cache, fault)
            assert code == -signal.SIGKILL, f"{name}: {fault} was never reached (exit {code})"
            n_kills += 1
            marked = assert_marked_chunks_match(path, ref)
            if name.startswith("writer-behind"):  # the first author has 3 doc-chunks, 2 in its first shard
                most = CHUNKS_PER_SHARD if name.endswith("second-shard") else 0
                assert marked <= most, f"{name}: the kill found the writer caught up ({marked} doc-chunks marked)"
            if name.startswith(("forward", "payload", "before-marker", "after-marker", "writer-behind")):
                assert _shown_status(reference["registry"], path) == "interrupted", f"{name}: killed run not shown as interrupted"
        code = _run(procs, out, name, cache)
        assert code == 0, f"{name}: the rerun after {faults} failed"
        assert_same_run(path, ref, reference["registry"])
    FIGURES["fault-point kills"] = n_kills


@pytest.mark.slow
def test_random_time_kills_then_resume_exactly(procs, reference):
    """SIGKILL at random times (anywhere: inside zarr writes, the forward pass, imports, ...)."""
    out, cache, ref = reference["out"], reference["cache"], reference["path"]
    rng = random.Random(20261122)
    n_kills = attempts = 0
    scale = 0.9
    while n_kills < N_RANDOM_KILLS and attempts < 3 * N_RANDOM_KILLS:
        name = f"random{attempts}"
        attempts += 1
        run = Extraction(procs, out, name, cache)
        time.sleep(rng.uniform(0.05, scale) * reference["seconds"])
        run.proc.kill()
        code = run.wait()
        if code != -signal.SIGKILL:  # it finished first: aim earlier next time
            scale /= 2
        n_kills += code == -signal.SIGKILL
        assert_marked_chunks_match(_path(reference, name), ref)
        assert _run(procs, out, name, cache) == 0
        assert_same_run(_path(reference, name), ref, reference["registry"])
    assert n_kills == N_RANDOM_KILLS
    FIGURES["random-time kills"] = n_kills


def test_fault_spec_is_checked():
    from saestore import faults

    assert faults.parse("payload:3, forward:1:sleep0.5") == {"payload": (3, "kill"), "forward": (1, "sleep0.5")}
    for bad in ["nowhere:1", "payload", "payload:0", "payload:x", "payload:1:explode"]:
        with pytest.raises(ValueError, match="SAESTORE_FAULT"):
            faults.parse(bad)
    assert set(SCENARIOS_POINTS := {f.split(":")[0] for fs in SCENARIOS.values() for f in fs}) == set(faults.POINTS), \
        f"points never tried: {set(faults.POINTS) - SCENARIOS_POINTS}"


# --------------------------------------------------------------------------------------------
# 2. corruption: detected, named, repaired
# --------------------------------------------------------------------------------------------

AUTHORS = ("astronomer", "chef", "sailor")  # sorted, as stored
LAYERS = (1, 3)


def _sae(a: int, li: int, s: int) -> str:
    return f"res/c/{a}/{li}/{s}/0/0"


def _tok(name: str, a: int, s: int) -> str:
    return f"{name}/c/{a}/{s}/0"


def _doc(name: str, a: int, s: int) -> str:
    return f"{name}/c/{a}/{s}"


def _marker(a: int, s: int) -> str:
    return f"{protocol.PROGRESS_PATH}/c/{a}/{s}/0"


def _shard_chunks(a: int, s: int) -> set[tuple[int, int]]:
    """The (author, doc-chunk) pairs of shard ``s``: every author has doc-chunks 0-1 and 2."""
    return {(a, c) for c in range(s * CHUNKS_PER_SHARD, min((s + 1) * CHUNKS_PER_SHARD, 3))}


#: batches of (shard (author, s), shard file, corruption); one corruption per shard in a batch
CORRUPTIONS = {
    "sae-truncated": [((0, 0), _sae(0, 0, 0), "truncate:0"), ((1, 1), _sae(1, 1, 1), "truncate:3"),
                      ((2, 0), _sae(2, 0, 0), "truncate:half"), ((0, 1), _sae(0, 1, 1), "truncate:-1")],
    "sae-flipped-deleted-swapped": [((0, 0), _sae(0, 0, 0), "flip:0"), ((1, 0), _sae(1, 1, 0), "flip:half"),
                                    ((2, 1), _sae(2, 0, 1), "flip:-1"), ((0, 1), _sae(0, 1, 1), "delete"),
                                    ((1, 1), _sae(1, 0, 1), f"swap:{_sae(2, 1, 1)}")],
    "per-token-and-document": [((0, 0), _tok("token_id", 0, 0), "delete"), ((1, 1), _tok("ce_loss", 1, 1), "delete"),
                               ((2, 0), _tok("valid_mask", 2, 0), "flip:half"), ((0, 1), _doc("text", 0, 1), "delete"),
                               ((1, 0), _doc("doc_length", 1, 0), "delete"), ((2, 1), _doc("doc_id", 2, 1), "flip:5")],
    "mixed-with-markers": [((0, 0), _tok("entropy", 0, 0), "truncate:half"), ((1, 0), _tok("token", 1, 0), "delete"),
                           ((2, 1), _marker(2, 1), "flip:half"), ((0, 1), _marker(0, 1), "truncate:0"),
                           ((1, 1), _tok("token", 1, 1), "flip:-2")],
}


def _corrupt(path: Path, rel: str, how: str) -> None:
    f = path / rel
    data = bytearray(f.read_bytes())
    kind, _, arg = how.partition(":")
    pos = {"half": len(data) // 2}.get(arg, None)
    if pos is None and arg.lstrip("-").isdigit():
        pos = int(arg) if int(arg) >= 0 else len(data) + int(arg)
    if kind == "delete":
        f.unlink()
    elif kind == "truncate":
        f.write_bytes(bytes(data[:pos]))
    elif kind == "flip":
        data[pos] ^= 0x04
        f.write_bytes(bytes(data))
    elif kind == "swap":
        f.write_bytes((path / arg).read_bytes())
    else:
        raise AssertionError(how)


@pytest.mark.slow
@pytest.mark.parametrize("batch", list(CORRUPTIONS))
def test_corruption_is_detected_named_and_repaired(procs, reference, batch, capsys):
    from saestore.__main__ import main as saestore_cli
    from saestore.reader import open_run

    ref = reference["path"]
    name = f"corrupt-{batch}"
    path = _path(reference, name)
    shutil.copytree(ref, path)
    before = read_progress(path)
    for _, rel, how in CORRUPTIONS[batch]:
        _corrupt(path, rel, how)
    expected = set().union(*(_shard_chunks(*shard) for shard, _, _ in CORRUPTIONS[batch]))

    # reading: a damaged SAE shard raises CorruptChunkError naming variable, author, layer and a
    # doc-chunk of the shard
    ds = open_run(path)
    for (a, s), rel, how in CORRUPTIONS[batch]:
        if rel.startswith("res/") and how.split(":")[0] in ("truncate", "flip"):
            layer = LAYERS[int(rel.split("/")[3])]
            chunks = "|".join(str(c) for _, c in sorted(_shard_chunks(a, s)))
            with pytest.raises(CorruptChunkError, match=rf"res\[author='{AUTHORS[a]}', layer={layer}, doc-chunk ({chunks})\]"):
                ds.res.isel(author=a).sel(layer=layer).isel(doc=slice(4 * s, 4 * s + 4)).data.compute()

    # validate names a damaged doc-chunk of every damaged shard (and the variable, unless a valid
    # shard was swapped in); the repair clears the markers of whole shards, the unit a rerun redoes
    assert saestore_cli(["validate", str(path), "--json", "--repair"]) == 1
    report = json.loads(capsys.readouterr().out)
    found = {(p["author_idx"], p["doc_chunk"]) for p in report["problems"]}
    assert found <= expected, report["problems"]
    for (a, s), rel, how in CORRUPTIONS[batch]:
        in_shard = _shard_chunks(a, s)
        text = [f"{p['where']} {p['message']}" for p in report["problems"]
                if (p["author_idx"], p["doc_chunk"]) in in_shard]
        assert any(repr(AUTHORS[a]) in t and any(f"doc-chunk {c}" in t for _, c in in_shard) for t in text), text
        variable = rel.split("/")[0] if not rel.startswith("_saestore") else "marker"
        if not how.startswith("swap"):
            assert any(variable in t for t in text), (variable, text)
        if rel.startswith("res/") and not how.startswith("swap"):
            assert any(f"layer {LAYERS[int(rel.split('/')[3])]}" in t for t in text), text
    assert sorted(map(tuple, report["repaired"])) == sorted((AUTHORS[a], c) for a, c in expected)

    # the same extraction command recomputes exactly those doc-chunks; the run equals the reference
    assert _run(procs, reference["out"], name, reference["cache"]) == 0
    assert_same_run(path, ref, reference["registry"])
    after = read_progress(path)
    for a in range(len(AUTHORS)):
        for c in range(3):
            redone = after[a, c, 3] != before[a, c, 3]
            assert redone == ((a, c) in expected), f"doc-chunk {(a, c)} recomputed: {redone}"
    FIGURES["corruptions detected"] = FIGURES.get("corruptions detected", 0) + len(CORRUPTIONS[batch])


# --------------------------------------------------------------------------------------------
# 4. one writer per run
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_second_writer_refused_then_dead_holder_taken_over(procs, reference):
    out, cache, name = reference["out"], reference["cache"], "two-writers"
    path = _path(reference, name)
    first = Extraction(procs, out, name, cache, "after_marker:1:sleep60")
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and (read_progress(path)[..., 0] == 1).sum() >= 1):
        assert first.proc.exitcode is None, first.output()
        time.sleep(0.05)
    marked = read_progress(path).copy()
    second = Extraction(procs, out, name, cache)
    assert second.wait() == 2
    err = second.stderr()
    holder = rf"pid {first.proc.pid} on host {socket.gethostname()} since \d{{4}}-\d\d-\d\dT"
    assert re.search(holder, err), err
    np.testing.assert_array_equal(read_progress(path), marked)  # the refused writer wrote nothing
    assert _shown_status(reference["registry"], path) == "running"  # its writer is alive
    first.proc.kill()  # SIGKILL while holding the lock
    assert first.wait() == -signal.SIGKILL
    assert _shown_status(reference["registry"], path) == "interrupted"  # runs list: the writer is gone
    lock = Path(str(path) + ".lock")
    assert json.loads(lock.read_text())["pid"] == first.proc.pid  # left behind, naming the dead holder
    assert _run(procs, out, name, cache) == 0
    assert not lock.exists()
    assert_same_run(path, reference["path"], reference["registry"])


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _torchrun(reference: dict, name: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m saestore.extract ARGS``: two gloo ranks on the CPU."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "SAESTORE_CACHE": str(reference["cache"]), "OMP_NUM_THREADS": "1"}
    env.pop("SAESTORE_FAULT", None)
    if fault:
        env["SAESTORE_FAULT"] = fault
    argv = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "saestore.extract", *ARGS,
            "--output_dir", str(reference["out"]), "--run_name", name]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_two_ranks_killed_one_rank_then_rerun_equals_single_process(reference):
    """Two gloo ranks write one run; rank 1 is SIGKILLed after its first shard (torchrun then
    stops rank 0 with SIGTERM, which saves the run as interrupted and prints the torchrun command
    that resumes it); the same command again resumes, and the run equals the one-process reference
    chunk file by chunk file, with the registry saying complete."""
    path = _path(reference, "torchrun")
    killed = _torchrun(reference, "torchrun", "after_marker:1@1")
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-2000:]
    # rank 0 is stopped by torchrun's SIGTERM (or finds rank 1 gone): it saves the run, never left 'running'
    lines = [ln for ln in killed.stderr.splitlines() if ln.startswith("saestore.extract:")]
    assert len(lines) == 1 and ("interrupted by SIGTERM" in lines[0] or "a rank stopped" in lines[0]), killed.stderr
    assert _attrs(path)["status"] in ("interrupted", "failed")
    with contextlib.closing(sqlite3.connect(reference["registry"])) as db:
        assert db.execute("SELECT status FROM runs WHERE path = ?", (str(path),)).fetchone()[0] == \
            _attrs(path)["status"]
    if "interrupted" in lines[0]:
        assert "torchrun --standalone --nproc_per_node 2 -m saestore.extract" in lines[0], lines[0]
    assert_marked_chunks_match(path, reference["path"])
    progress = read_progress(path)
    assert 0 < (progress[..., 0] == 1).sum() < N_CHUNKS  # killed part-way: some doc-chunks done, some not
    done = _torchrun(reference, "torchrun")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "status: complete" in done.stdout and "2 ranks" in done.stderr
    assert_same_run(path, reference["path"], reference["registry"])
    FIGURES["torchrun kills survived"] = 1


def _two_nodes(reference: dict, name: str, fault: str | None = None) -> list[subprocess.CompletedProcess]:
    """Two torchrun "nodes" on localhost (``--nnodes 2``, one rank each, c10d rendezvous on
    127.0.0.1), as two SLURM tasks on two hosts would start them; returns both nodes' results."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SAESTORE_CACHE": str(reference["cache"]), "OMP_NUM_THREADS": "1"}
    env.pop("SAESTORE_FAULT", None)
    if fault:
        env["SAESTORE_FAULT"] = fault
    nodes = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(n),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name,
                               "--max_restarts", "0", "-m", "saestore.extract", *ARGS,
                               "--output_dir", str(reference["out"]), "--run_name", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for n in (0, 1)]
    out = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_nodes_one_killed_then_rerun_equals_single_process(reference):
    """#17: two "nodes" (two torchrun agents, --nnodes 2) write one run; the rank on node 1 is
    SIGKILLed after its first shard; both nodes rerun the same command, and the run equals the
    one-process reference chunk file by chunk file."""
    path = _path(reference, "two-nodes")
    killed = _two_nodes(reference, "two-nodes", "after_marker:1@1")
    assert any(r.returncode != 0 for r in killed), killed[0].stderr[-2000:]
    assert_marked_chunks_match(path, reference["path"])
    assert 0 < (read_progress(path)[..., 0] == 1).sum() < N_CHUNKS
    done = _two_nodes(reference, "two-nodes")
    assert [r.returncode for r in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert "status: complete" in done[0].stdout + done[1].stdout and "2 ranks" in done[0].stderr + done[1].stderr
    assert_same_run(path, reference["path"], reference["registry"])
    FIGURES["two-node kills survived"] = 1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_stop_when_the_coordinator_is_killed(procs, reference):
    """Two spawned workers; SIGKILL to the coordinator while they write: both stop within seconds
    (they would otherwise go on writing the run that a rerun now owns); the rerun finishes exactly."""
    out, cache, name = reference["out"], reference["cache"], "orphans"
    path = _path(reference, name)
    run = Extraction(procs, out, name, cache, "after_marker:1:sleep60", extra=("--devices", "cpu:2"))
    deadline = time.time() + 180
    while time.time() < deadline and not (path.exists() and (read_progress(path)[..., 0] == 1).sum() >= 1):
        assert run.proc.exitcode is None, run.output()
        time.sleep(0.1)
    workers = _children(run.proc.pid)
    assert len(workers) >= 2, workers  # the spawned workers (and multiprocessing's resource tracker)
    run.proc.kill()
    assert run.wait() == -signal.SIGKILL
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived their coordinator"
    assert _run(procs, out, name, cache) == 0
    assert_same_run(path, reference["path"], reference["registry"])
    FIGURES["coordinator kills with 2 live workers"] = 1


def _contend(run: str, start: float, result: str) -> None:
    from saestore.errors import RunLockedError
    from saestore.lock import RunLock

    while time.time() < start:
        pass
    try:
        lock = RunLock(run).acquire()
    except RunLockedError:
        return
    t0 = time.time()
    assert json.loads(Path(run + ".lock").read_text())["pid"] == os.getpid()
    time.sleep(0.03)
    t1 = time.time()
    lock.release()
    Path(result).write_text(json.dumps([t0, t1]))


def test_stale_lock_race_has_one_winner(procs, tmp_path):
    """Six processes at once take over a lock left by a dead process: never two holders at a time."""
    n_rounds, n_procs = 8, 6
    for r in range(n_rounds):
        run = str(tmp_path / f"run{r}.zarr")
        Path(run + ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7,
                                                   "started_at": "2026-01-01T00:00:00+00:00"}))
        start = time.time() + 0.3
        ps = [procs.Process(target=_contend, args=(run, start, str(tmp_path / f"r{r}.{i}.json"))) for i in range(n_procs)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(60)
            assert p.exitcode == 0
        spans = sorted(json.loads(f.read_text()) for f in tmp_path.glob(f"r{r}.*.json"))
        assert spans, "nobody took over the stale lock"
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            assert begin >= end, f"round {r}: two holders at once {spans}"


# --------------------------------------------------------------------------------------------
# 5. writes that fail part-way
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n_failures", [0, 1], ids=["disk-stays-full", "one-write-fails"])
def test_failing_writes_stop_clearly_keep_completed_chunks_and_resume(procs, reference, n_failures):
    from saestore.validate import validate_run

    out, cache, name = reference["out"], reference["cache"], f"enospc-{n_failures}"
    path = _path(reference, name)
    run = Extraction(procs, out, name, cache, fail_writes=(4, n_failures))
    code = run.wait()
    err = run.stderr().strip().splitlines()[-1]
    assert code == (2 if n_failures == 0 else 1), run.output()
    assert err.startswith("saestore.extract: error:") and "No space left on device" in err, err
    assert "rerun the same command" in err.lower()
    # the 4 shards written before the disk filled (authors 0 and 1: 6 doc-chunks) are intact
    assert assert_marked_chunks_match(path, reference["path"]) == 6
    assert validate_run(path).ok
    assert _run(procs, out, name, cache) == 0  # writes succeed again
    assert_same_run(path, reference["path"], reference["registry"])


def test_figures(request):
    """Print the figures of this module's run (pytest -s) for the README's Guarantees."""
    print("\nreliability figures:", json.dumps(FIGURES))
