"""``python -m saestore.extract``: validate the request, then run it through the coordinator.

Everything the user asked for is validated (model, SAEs, dataset) before anything is written or
registered (:func:`plan`); :class:`~saestore.extract.coordinator.Coordinator` then owns the run's
lifecycle, and :class:`LocalLauncher` (here) or
:class:`~saestore.extract.distributed.TorchrunLauncher` runs its workers: one per device, or one per
torchrun/SLURM rank, authors dealt round-robin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from saestore import protocol
from saestore.errors import ExtractionConfigError, SaestoreError, WorkerFailedError
from saestore.extract import STARTED, interrupt
from saestore.extract.config import ExtractConfig, offline_hint, parse_all, resolve_defaults, stored_identity
from saestore.extract.coordinator import Coordinator
from saestore.extract.pool import Job, WorkerPool
from saestore.extract.work import AuthorWork, WorkerStats
from saestore.writer import RunLayout

log = logging.getLogger("saestore.extract")


def parse_devices(devices: str | None) -> list[str]:
    """``cuda:0,cuda:1`` | ``cpu`` | ``cpu:2`` (two CPU workers) | None (every GPU, else one CPU worker).
    Only a request that names or may use a GPU imports torch (CPU workers start sooner without it)."""
    if not devices or "cuda" in devices:
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
    from saestore.extract.preflight import check_request

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
    check_request(cfg.model, specs, cfg.prompt_template if cfg.setting == "prompted" else None, authors, cfg.n_tok)
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


def numerics(devices: Sequence[str], threads: int | None) -> dict[str, Any]:
    """What decides the computed values besides the configuration (PROTOCOL.md §4 ``numerics``): the
    device kind (the GPU's name) and the torch threads of each CPU worker."""
    kinds = []
    for d in dict.fromkeys(d.split(":")[0] for d in devices):
        gpu = next((x for x in devices if x.startswith("cuda")), None) if d == "cuda" else None
        if gpu:
            import torch
        kinds.append(f"cuda {torch.cuda.get_device_name(torch.device(gpu))}" if gpu else d)
    return {"device": ", ".join(kinds), "torch_threads": threads if "cpu" in devices else None}


class LocalLauncher:
    """One worker per device: in this process for a single device, else the processes of ``pool``
    (started before the run was planned)."""

    def __init__(self, cfg: ExtractConfig, specs: list[Any], devices: list[str], pool: WorkerPool | None = None) -> None:
        if len(devices) > 1 and pool is None:
            raise SaestoreError(f"{len(devices)} devices need a WorkerPool of their processes")
        self.cfg, self.specs, self.devices, self.pool = cfg, specs, devices, pool
        self.where = ", ".join(devices)
        n_cpu = sum(d == "cpu" for d in devices)
        # torch threads per CPU worker: $OMP_NUM_THREADS when set (on a busy machine 1 can be fastest), else
        # the cores shared out between the CPU workers
        self.threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // max(1, n_cpu))
        self.numerics = numerics(devices, self.threads)

    def abort(self, reason: str) -> None:
        if self.pool is not None:  # no job was handed out: the waiting processes are stopped
            self.pool.close_idle()

    def finished(self, code: int) -> None:
        pass

    def run(self, path: str, work: Sequence[AuthorWork]) -> WorkerStats:
        devices, threads = self.devices, self.threads
        shares = [list(work[i :: len(devices)]) for i in range(len(devices))]
        if self.pool is None:
            from saestore.extract.worker import run_worker

            return run_worker(path, self.cfg, self.specs, shares[0], devices[0], 0, threads if devices[0] == "cpu"
                              else None)
        jobs = {}
        for rank, (device, share) in enumerate(zip(devices, shares, strict=True)):
            if not share:
                log.info("worker %d (%s) has no author: %d workers for %d authors", rank, device, len(devices),
                         len(work))
                continue
            jobs[rank] = Job(path, self.cfg, self.specs, share, threads if device == "cpu" else 0)
        return self.pool.run(jobs)


Plan = tuple[list[Any], dict[str, list[Any]], RunLayout, protocol.RunAttrs]


def extract(cfg: ExtractConfig, planned: Plan | None = None, t0: float | None = None) -> int:
    """Run an extraction (``planned``: its :func:`plan` already made; ``t0``: the ``perf_counter`` its
    wall time counts from, default now); returns the process exit code (0 complete; failed authors
    raise WorkerFailedError)."""
    t0 = time.perf_counter() if t0 is None else t0
    cfg = resolve_defaults(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        specs, by_author, layout, attrs = planned or plan(cfg)
        coordinator = Coordinator(cfg, layout, attrs, cfg.run_path(), t0)
        work = coordinator.work(by_author)
        from saestore.extract.distributed import TorchrunLauncher, follow, rank_info

        launcher = TorchrunLauncher(cfg, specs)
        if rank_info()[0] != 0:
            return follow(launcher, work)
        return coordinator.run(launcher, work)
    return extract_local(cfg, planned, t0)


def extract_local(cfg: ExtractConfig, planned: Plan | None, t0: float) -> int:
    """:func:`extract` on this machine's devices: with several, their worker processes start first and
    import the model stack while the run is planned (stopped unused if it is refused or complete)."""
    devices = parse_devices(cfg.devices)
    with WorkerPool(devices) if len(devices) > 1 else contextlib.nullcontext() as pool:
        specs, by_author, layout, attrs = planned or plan(cfg)
        coordinator = Coordinator(cfg, layout, attrs, cfg.run_path(), t0)
        return coordinator.run(LocalLauncher(cfg, specs, devices, pool), coordinator.work(by_author))


def extract_many(configs: list[ExtractConfig], t0: float | None = None) -> int:
    """One run per model, on the same document selection. Every model's request is checked first
    (nothing is extracted if one is refused); a model failing during extraction does not stop the
    others. ``t0``: as :func:`extract`'s, for the first model."""
    plans: dict[str, Plan] = {}
    refused: dict[str, str] = {}
    for cfg in configs:
        try:
            plans[cfg.model] = plan(resolve_defaults(cfg))
        except SaestoreError as e:
            refused[cfg.model] = f"{type(e).__name__}: {e}"
    if refused:
        raise ExtractionConfigError(f"{len(refused)} of {len(configs)} models refused, nothing extracted: "
                                    + "; ".join(f"{m}: {msg}" for m, msg in refused.items()))
    failures: dict[str, str] = {}
    for cfg in configs:
        log.info("model %s (%d of %d)", cfg.model, configs.index(cfg) + 1, len(configs))
        try:
            extract(cfg, plans[cfg.model], t0 if cfg is configs[0] else None)
        except SaestoreError as e:
            failures[cfg.model] = f"{type(e).__name__}: {e}"
            log.error("model %s failed: %s", cfg.model, e)
    done = [c.model for c in configs if c.model not in failures]
    print(f"models done: {', '.join(done) or 'none'}", flush=True)
    if failures:
        raise WorkerFailedError("; ".join(f"{m}: {msg}" for m, msg in failures.items()))
    return 0


def _interrupted(stop: interrupt.Interrupted, argv: list[str], configs: list[ExtractConfig]) -> str:
    """The one line an interrupted extraction ends with."""
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if rank:
        return f"rank {rank} stopped by {stop.name}; rank 0 saves the run and prints how to resume it"
    if stop.run is None:  # stopped before the coordinator started (or resumed) a run: nothing changed
        existing = next((str(p) for c in configs for p in [c.run_path()] if p.exists()), None)
        return (f"interrupted by {stop.name} before the run was started; "
                + (f"{existing} is as it was" if existing else "nothing was written") + ". Rerun: "
                + interrupt.resume_command(argv, resume=False))
    run = stop.run
    # several models: the same command (complete runs are skipped, the interrupted one resumes)
    return (f"interrupted by {stop.name}: {run} is saved as {stop.status or 'interrupted'}"
            + (f" with {stop.progress}" if stop.progress else "") + "; finished doc-chunks are kept. Resume with: "
            + interrupt.resume_command(argv, resume=len(configs) == 1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    configs: list[ExtractConfig] = []
    try:
        with interrupt.handle_signals():
            configs = parse_all(argv)
            if len(configs) > 1:
                return extract_many(configs, STARTED)
            return extract(configs[0], t0=STARTED)
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM: one line, and the command that finishes the run
        stop = interrupt.of(e)
        assert stop is not None
        print(f"saestore.extract: {_interrupted(stop, argv, configs)}", file=sys.stderr, flush=True)
        return stop.exit_code
    except WorkerFailedError as e:
        print(f"saestore.extract: error: {e}", file=sys.stderr)
        return 1
    except SaestoreError as e:
        print(f"saestore.extract: error: {e}{offline_hint(configs, str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
