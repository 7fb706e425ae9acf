"""The coordinator of ``python -m saestore.extract``: validate, create the run, launch workers, finalize.

Everything the user asked for is validated (model, SAEs, dataset) before anything is written or
registered; then the coordinator takes the run's lock, creates the store, records the run in the
registry, deals authors round-robin to one worker per device (or per torchrun/SLURM rank), and
finalizes the store and the registry once every worker has returned.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saestore import faults, protocol
from saestore.errors import SaestoreError, StoreWriteError, WorkerFailedError
from saestore.extract.config import ExtractConfig, parse_all, resolve_defaults
from saestore.extract.worker import AuthorWork, WorkerStats, run_worker
from saestore.lock import RunLock
from saestore.registry import Registry
from saestore.writer import RunLayout, create_run, finalize_run, read_progress

log = logging.getLogger("saestore.extract")


def parse_devices(devices: str | None) -> list[str]:
    """``cuda:0,cuda:1`` | ``cpu`` | ``cpu:2`` (two CPU workers) | None (every GPU, else one CPU worker)."""
    import torch

    if not devices:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out: list[str] = []
    for item in (d.strip() for d in devices.split(",") if d.strip()):
        if item == "cpu":
            out.append("cpu")
        elif item.startswith("cpu:"):
            try:
                n = int(item[4:])
            except ValueError:
                raise SaestoreError(f"--devices: {item!r} is not cpu:N") from None
            if n < 1:
                raise SaestoreError(f"--devices: {item!r} needs N >= 1")
            out += ["cpu"] * n
        elif item.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SaestoreError(f"--devices {item}: no CUDA GPU is visible here; use --devices cpu")
            idx = int(item.split(":")[1]) if ":" in item else 0
            if idx >= torch.cuda.device_count():
                raise SaestoreError(f"--devices {item}: only {torch.cuda.device_count()} GPU(s) visible")
            out.append(f"cuda:{idx}")
        else:
            raise SaestoreError(f"--devices: unknown device {item!r}; use cuda:N, cpu or cpu:N")
    return out


def _sae_infos(specs: Sequence[Any]) -> dict[str, dict[str, protocol.SAEInfo]]:
    out: dict[str, dict[str, protocol.SAEInfo]] = {}
    for s in specs:
        out.setdefault(s.layer_type, {})[str(s.layer)] = protocol.SAEInfo(
            release=s.release, sae_id=s.sae_id, path=s.local_path, hook_name=s.hook_name, width=s.d_sae,
            expected_l0=s.expected_l0, architecture=getattr(s, "architecture", "jumprelu"))
    return out


def plan(cfg: ExtractConfig) -> tuple[list[Any], dict[str, list[Any]], RunLayout, protocol.RunAttrs]:
    """Validate everything and build the run's layout and attributes; nothing is loaded or written."""
    from saestore.extract.data import load_documents, select_documents
    from saestore.extract.models import resolve_saes, validate_model_name

    validate_model_name(cfg.model)
    specs = (resolve_saes(cfg.model, cfg.layer_types, cfg.layers, cfg.sae_features_width, cfg.target_l0,
                          cfg.sae_path) if cfg.layer_types else _resolve_available(cfg))
    widths = {s.d_sae for s in specs}
    if len(widths) != 1:
        raise SaestoreError(f"every SAE of a run must have the same width, got {sorted(widths)}")
    docs = load_documents(cfg.dataset_name, dataset_path=cfg.dataset_path, category_name=cfg.category_name,
                          author_column=cfg.author_column, text_column=cfg.text_column)
    by_author = select_documents(docs, n_docs=cfg.n_docs, n_docs_per_author=cfg.n_docs_per_author,
                                 min_length_doc=cfg.min_length_doc, exclude_authors=cfg.exclude_authors,
                                 min_docs_per_author=cfg.min_docs_per_author)
    authors = tuple(sorted(by_author))
    used_types = tuple(t for t in protocol.LAYER_TYPES if any(s.layer_type == t for s in specs))
    storage = protocol.StorageInfo(format=cfg.storage_format, value_dtype=cfg.value_dtype, chunk_docs=cfg.chunk_docs)
    layout = RunLayout(authors=authors, n_docs=tuple(len(by_author[a]) for a in authors), n_tok=cfg.n_tok,
                       layer_types=used_types, layers=tuple(sorted(cfg.layers)), n_features=widths.pop(),
                       storage=storage, loss_recovered=cfg.loss_recovered)
    config = cfg.semantic()
    attrs = protocol.RunAttrs(
        protocol_version=protocol.PROTOCOL_VERSION, layout=protocol.LAYOUT, status="running",
        created_at="1970-01-01T00:00:00+00:00", finalized_at=None, config=config,
        config_hash=protocol.config_hash(config), model=cfg.model, setting=cfg.setting,
        prompt_template=cfg.prompt_template if cfg.setting == "prompted" else None,
        use_error_term=cfg.use_error_term, storage=storage, saes=_sae_infos(specs))
    return specs, by_author, layout, attrs


def _resolve_available(cfg: ExtractConfig) -> list[Any]:
    """Default layer types: every type the model has SAEs for at the requested layers."""
    from saestore.extract.models import resolve_saes

    specs, errors = [], []
    for lt in protocol.LAYER_TYPES:
        try:
            specs += resolve_saes(cfg.model, (lt,), cfg.layers, cfg.sae_features_width, cfg.target_l0, cfg.sae_path)
        except SaestoreError as e:
            errors.append(str(e))
    if not specs:
        raise SaestoreError(errors[0] if len(errors) == 1 else "; ".join(errors))
    return specs


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _exit_with(coordinator: int) -> None:
    """Stop this worker as soon as its coordinator is gone (even killed by SIGKILL, which no cleanup
    sees): the rerun that takes the run's lock over must be the run's only writer."""

    def watch() -> None:
        while os.getppid() == coordinator:
            time.sleep(0.5)
        log.error("the coordinator (pid %d) is gone: this worker stops", coordinator)
        os._exit(3)

    threading.Thread(target=watch, name="saestore-coordinator-watch", daemon=True).start()


def _worker_entry(path: str, cfg: ExtractConfig, specs: list[Any], work: list[AuthorWork], device: str,
                  rank: int, n_threads: int, queue: Any, coordinator: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker{rank} %(levelname)s %(message)s")
    _exit_with(coordinator)
    try:
        stats = run_worker(path, cfg, specs, work, device, rank, n_threads)
    except SaestoreError as e:  # e.g. an SAE that does not fit the model: tell the coordinator why
        log.error("worker %d failed: %s", rank, e)
        stats = WorkerStats(failed={w.author: f"{type(e).__name__}: {e}" for w in work})
    queue.put((rank, stats.to_json()))


def _merge(results: Sequence[dict[str, Any]]) -> WorkerStats:
    total = WorkerStats()
    for r in results:
        total.n_docs += r["n_docs"]
        total.n_tokens += r["n_tokens"]
        total.seconds = max(total.seconds, r["seconds"])
        total.failed.update(r["failed"])
        for k, v in r["nnz"].items():
            total.nnz[k] = total.nnz.get(k, 0) + v
    return total


def run_local(path: str, cfg: ExtractConfig, specs: list[Any], work: list[AuthorWork],
              devices: list[str]) -> WorkerStats:
    """One worker per device: in this process for a single device, else spawned processes."""
    n_cpu = sum(d == "cpu" for d in devices)
    # torch threads per CPU worker: $OMP_NUM_THREADS when set (on a busy machine 1 can be fastest), else
    # the cores shared out between the CPU workers
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // max(1, n_cpu))
    shares = [work[i :: len(devices)] for i in range(len(devices))]
    if len(devices) == 1:
        return run_worker(path, cfg, specs, shares[0], devices[0], 0, threads if n_cpu else None)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = []
    for rank, (device, share) in enumerate(zip(devices, shares, strict=True)):
        if not share:
            log.info("worker %d (%s) has no author: %d workers for %d authors", rank, device, len(devices), len(work))
            continue
        p = ctx.Process(target=_worker_entry, args=(path, cfg, specs, share, device, rank,
                                                    threads if device == "cpu" else 0, queue, os.getpid()),
                        name=f"saestore-worker-{rank}")
        p.start()
        procs.append((rank, p, share))
    results: dict[int, dict[str, Any]] = {}
    while len(results) < len(procs) and any(p.is_alive() for _, p, _ in procs):
        try:
            rank, res = queue.get(timeout=1.0)
            results[rank] = res
        except Exception:
            continue
    while not queue.empty():
        rank, res = queue.get()
        results[rank] = res
    for rank, p, share in procs:
        p.join()
        if rank not in results:
            results[rank] = {"n_docs": 0, "n_tokens": 0, "nnz": {}, "seconds": 0.0,
                             "failed": {w.author: f"worker {rank} exited with code {p.exitcode}" for w in share}}
    return _merge(list(results.values()))


def _summary(path: Path, layout: RunLayout, attrs: protocol.RunAttrs, stats: WorkerStats, wall: float) -> str:
    progress = read_progress(path)
    n_tokens = int(progress[..., 1].sum())
    n_nonzero = int(progress[..., 2].sum())
    lines = [f"run: {path}", f"status: {attrs.status}",
             f"authors: {len(layout.authors)}  documents: {sum(layout.n_docs)}  tokens: {n_tokens:,}  "
             f"nonzeros: {n_nonzero:,}",
             f"bytes on disk: {_du(path):,}  wall time: {wall:.1f}s  "
             f"({stats.n_tokens / max(wall, 1e-9):,.0f} tokens/s this session)"]
    for key, nnz in sorted(stats.nnz.items()):
        lt, layer = key.split("/")
        expected = attrs.saes[lt][layer].expected_l0
        l0 = nnz / max(stats.n_tokens, 1)
        lines.append(f"  {lt:>3} layer {layer:>3}: mean L0 {l0:7.1f}" + (f" (SAE expects {expected:.1f})" if expected else ""))
    if attrs.failed_authors:
        lines.append(f"FAILED authors (rerun the same command to finish them): {', '.join(attrs.failed_authors)}")
    return "\n".join(lines)


def _check_l0(stats: WorkerStats, attrs: protocol.RunAttrs) -> None:
    for key, nnz in stats.nnz.items():
        lt, layer = key.split("/")
        expected = attrs.saes[lt][layer].expected_l0
        l0 = nnz / max(stats.n_tokens, 1)
        if expected and stats.n_tokens and not expected / 3 <= l0 <= expected * 3:
            log.warning("%s layer %s: measured mean L0 %.1f is far from the SAE's expected %.1f "
                        "(prompt/BOS handling, dtype or the wrong SAE?)", lt, layer, l0, expected)


def extract(cfg: ExtractConfig) -> int:
    """Run an extraction; returns the process exit code (0 complete, 1 failed authors)."""
    t0 = time.perf_counter()
    cfg = resolve_defaults(cfg)
    specs, by_author, layout, attrs = plan(cfg)
    path = cfg.run_path()
    work = [AuthorWork(author_idx=i, author=a, docs=tuple(by_author[a])) for i, a in enumerate(layout.authors)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from saestore.extract.distributed import extract_distributed

        return extract_distributed(cfg, specs, layout, attrs, work, path, t0)
    devices = parse_devices(cfg.devices)
    registry = Registry(cfg.registry_path())
    mode = "overwrite" if cfg.overwrite else "resume" if cfg.resume else "auto"
    with RunLock(path):
        faults.point("lock")
        attrs = create_run(path, layout, attrs, mode=mode)
        _start_registry(registry, cfg, path, attrs, layout)
        faults.point("created")
        log.info("extracting %d authors, %d documents into %s on %s", len(layout.authors), sum(layout.n_docs),
                 path, ", ".join(devices))
        error = None
        try:
            stats = run_local(str(path), cfg, specs, work, devices)
        except BaseException as e:
            stats, error = WorkerStats(failed={a: f"{type(e).__name__}: {e}" for a in layout.authors}), e
        faults.point("workers_done")
        try:
            final = finalize_run(path, failed_authors=sorted(stats.failed))
        except (OSError, SaestoreError) as e:  # cannot write (disk full?) or read (corrupt markers): say so
            _finish_registry(registry, path, "failed", list(layout.authors), t0, f"{type(e).__name__}: {e}")
            if not isinstance(e, OSError):
                raise
            cause = _first_failure(stats)
            raise StoreWriteError(
                (f"{cause}; then " if cause else "") + f"finalizing {path} failed: {type(e).__name__}: {e}. Fix the "
                "cause (free space?) and rerun the same command: doc-chunks with a progress marker are kept"
            ) from (error or e)
        faults.point("finalized")
        wall = time.perf_counter() - t0
        _finish_registry(registry, path, final.status, final.failed_authors, t0, repr(error) if error else
                         "; ".join(f"{a}: {m}" for a, m in sorted(stats.failed.items())) or None)
        if error is not None:
            raise error
    _check_l0(stats, final)
    print(_summary(path, layout, final, stats, wall), flush=True)
    if final.failed_authors:
        cause = _first_failure(stats)
        raise WorkerFailedError(
            f"{len(final.failed_authors)} author(s) not finished: {', '.join(final.failed_authors)}."
            + (f" First error: {cause}." if cause else "") + " Rerun the same command to finish them once the cause "
            "is fixed")
    return 0


def _first_failure(stats: WorkerStats) -> str | None:
    """The first recorded failure (authors in order) for one-line messages, naming its author."""
    return next((m if repr(a) in m else f"{a!r}: {m}" for a, m in sorted(stats.failed.items())), None)


def _start_registry(registry: Registry, cfg: ExtractConfig, path: Path, attrs: protocol.RunAttrs,
                    layout: RunLayout) -> None:
    """Record the run as running (after the store exists, before any worker starts)."""
    registry.start(path=str(path), run_name=path.name.removesuffix(".zarr"), model=cfg.model,
                   dataset=cfg.dataset_name, category=cfg.category_name, config_hash=attrs.config_hash,
                   config=attrs.config, authors=list(layout.authors), n_docs=sum(layout.n_docs))


def _finish_registry(registry: Registry, path: Path, status: str, failed_authors: list[str], t0: float,
                     error: str | None) -> None:
    """Record the outcome in the registry; a registry that cannot be written is logged, not fatal."""
    try:
        progress = read_progress(path)
        registry.finish(str(path), status=status, failed_authors=failed_authors,
                        n_tokens=int(progress[..., 1].sum()), n_nonzero=int(progress[..., 2].sum()),
                        bytes=_du(path), wall_s=time.perf_counter() - t0, error=error)
    except (OSError, sqlite3.Error, SaestoreError) as e:
        log.error("could not record the outcome of %s in the registry %s: %s", path, registry.path, e)


def extract_many(configs: list[ExtractConfig]) -> int:
    """One run per model, on the same document selection; a failing model does not stop the others."""
    failures: dict[str, str] = {}
    for cfg in configs:
        log.info("model %s (%d of %d)", cfg.model, configs.index(cfg) + 1, len(configs))
        try:
            extract(cfg)
        except SaestoreError as e:
            failures[cfg.model] = f"{type(e).__name__}: {e}"
            log.error("model %s failed: %s", cfg.model, e)
    done = [c.model for c in configs if c.model not in failures]
    print(f"models done: {', '.join(done) or 'none'}", flush=True)
    if failures:
        raise WorkerFailedError("; ".join(f"{m}: {msg}" for m, msg in failures.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        configs = parse_all(argv)
        if len(configs) > 1:
            return extract_many(configs)
        return extract(configs[0])
    except WorkerFailedError as e:
        print(f"saestore.extract: error: {e}", file=sys.stderr)
        return 1
    except SaestoreError as e:
        print(f"saestore.extract: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
