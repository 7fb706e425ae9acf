"""``python -m saestore.extract``: validate the request, then run it through the coordinator.

Everything the user asked for is validated (model, SAEs, dataset) before anything is written or
registered (:func:`plan`); :class:`~saestore.extract.coordinator.Coordinator` then owns the run's
lifecycle, and :class:`LocalLauncher` (here) or
:class:`~saestore.extract.distributed.TorchrunLauncher` runs its workers: one per device, or one per
torchrun/SLURM rank, authors dealt round-robin.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from saestore import protocol
from saestore.errors import SaestoreError, WorkerFailedError
from saestore.extract.config import ExtractConfig, offline_hint, parse_all, resolve_defaults, stored_identity
from saestore.extract.coordinator import Coordinator
from saestore.extract.worker import AuthorWork, WorkerStats, run_worker
from saestore.writer import RunLayout

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
    from saestore.extract.data import doc_columns_of, load_documents, select_documents
    from saestore.extract.models import resolve_saes, validate_model_name

    validate_model_name(cfg.model)
    specs = (resolve_saes(cfg.model, cfg.layer_types, cfg.layers, cfg.sae_features_width, cfg.target_l0,
                          cfg.sae_path) if cfg.layer_types else _resolve_available(cfg))
    widths = {s.d_sae for s in specs}
    if len(widths) != 1:
        raise SaestoreError(f"every SAE of a run must have the same width, got {sorted(widths)}")
    doc_columns = doc_columns_of(cfg.dataset_name, cfg.category_name, cfg.doc_columns, cfg.dataset_path)
    docs = load_documents(cfg.dataset_name, dataset_path=cfg.dataset_path, category_name=cfg.category_name,
                          author_column=cfg.author_column, text_column=cfg.text_column, doc_columns=doc_columns)
    by_author = select_documents(docs, n_docs=cfg.n_docs, n_docs_per_author=cfg.n_docs_per_author,
                                 min_length_doc=cfg.min_length_doc, exclude_authors=cfg.exclude_authors,
                                 min_docs_per_author=cfg.min_docs_per_author)
    authors = tuple(sorted(by_author))
    used_types = tuple(t for t in protocol.LAYER_TYPES if any(s.layer_type == t for s in specs))
    storage = protocol.StorageInfo(format=cfg.storage_format, value_dtype=cfg.value_dtype, chunk_docs=cfg.chunk_docs,
                                   shard_docs=cfg.shard_docs or "auto")
    layout = RunLayout(authors=authors, n_docs=tuple(len(by_author[a]) for a in authors), n_tok=cfg.n_tok,
                       layer_types=used_types, layers=tuple(sorted(cfg.layers)), n_features=widths.pop(),
                       storage=storage, loss_recovered=cfg.loss_recovered, char_offsets=True,
                       doc_columns=doc_columns, logit_k=cfg.logit_k)
    config = cfg.semantic()
    config, config_hash = (config, protocol.config_hash(config)) if cfg.overwrite else stored_identity(cfg.run_path(), config)
    attrs = protocol.RunAttrs(
        protocol_version=protocol.PROTOCOL_VERSION, layout=protocol.LAYOUT, status="running",
        created_at="1970-01-01T00:00:00+00:00", finalized_at=None, config=config,
        config_hash=config_hash, model=cfg.model, setting=cfg.setting,
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
        stats = WorkerStats.failing((w.author for w in work), f"{type(e).__name__}: {e}")
    queue.put((rank, stats))


class LocalLauncher:
    """One worker per device: in this process for a single device, else spawned processes."""

    def __init__(self, cfg: ExtractConfig, specs: list[Any], devices: list[str]) -> None:
        self.cfg, self.specs, self.devices = cfg, specs, devices
        self.where = ", ".join(devices)

    def abort(self, reason: str) -> None:
        pass  # no worker was started

    def finished(self, code: int) -> None:
        pass

    def run(self, path: str, work: Sequence[AuthorWork]) -> WorkerStats:
        devices = self.devices
        n_cpu = sum(d == "cpu" for d in devices)
        # torch threads per CPU worker: $OMP_NUM_THREADS when set (on a busy machine 1 can be fastest), else
        # the cores shared out between the CPU workers
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // max(1, n_cpu))
        shares = [list(work[i :: len(devices)]) for i in range(len(devices))]
        if len(devices) == 1:
            return run_worker(path, self.cfg, self.specs, shares[0], devices[0], 0, threads if n_cpu else None)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = []
        for rank, (device, share) in enumerate(zip(devices, shares, strict=True)):
            if not share:
                log.info("worker %d (%s) has no author: %d workers for %d authors", rank, device, len(devices),
                         len(work))
                continue
            p = ctx.Process(target=_worker_entry, args=(path, self.cfg, self.specs, share, device, rank,
                                                        threads if device == "cpu" else 0, queue, os.getpid()),
                            name=f"saestore-worker-{rank}")
            p.start()
            procs.append((rank, p, share))
        results: dict[int, WorkerStats] = {}
        while len(results) < len(procs) and any(p.is_alive() for _, p, _ in procs):
            try:
                rank, stats = queue.get(timeout=1.0)
                results[rank] = stats
            except queue_mod.Empty:
                continue
        while not queue.empty():
            rank, stats = queue.get()
            results[rank] = stats
        for rank, p, share in procs:
            p.join()
            if rank not in results:
                results[rank] = WorkerStats.failing((w.author for w in share),
                                                    f"worker {rank} exited with code {p.exitcode}")
        return WorkerStats.merge(results.values())


def extract(cfg: ExtractConfig) -> int:
    """Run an extraction; returns the process exit code (0 complete; failed authors raise WorkerFailedError)."""
    t0 = time.perf_counter()
    cfg = resolve_defaults(cfg)
    specs, by_author, layout, attrs = plan(cfg)
    coordinator = Coordinator(cfg, layout, attrs, cfg.run_path(), t0)
    work = coordinator.work(by_author)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from saestore.extract.distributed import TorchrunLauncher, follow, rank_info

        launcher = TorchrunLauncher(cfg, specs)
        if rank_info()[0] != 0:
            return follow(launcher, work)
        return coordinator.run(launcher, work)
    return coordinator.run(LocalLauncher(cfg, specs, parse_devices(cfg.devices)), work)


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
    configs: list[ExtractConfig] = []
    try:
        configs = parse_all(argv)
        if len(configs) > 1:
            return extract_many(configs)
        return extract(configs[0])
    except WorkerFailedError as e:
        print(f"saestore.extract: error: {e}", file=sys.stderr)
        return 1
    except SaestoreError as e:
        print(f"saestore.extract: error: {e}{offline_hint(configs, str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
