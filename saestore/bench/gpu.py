"""``python -m saestore.bench --gpu [--quick]``: extraction at device speed, with nothing to download.

Builds a ``HookedSAETransformer`` with TransformerLens's Gemma-2-2b configuration (name-based:
nothing is fetched) and random weights, 12 random JumpReLU SAEs (res, mlp and att at 4 layers,
width 16,384) whose thresholds are calibrated on the model's own activations for L0 ≈ 70, and a
random-token corpus (a real fast tokenizer whose vocabulary is the token ids), then measures on
the same batches, in one process:

* **forward**: the bare model forward;
* **SAE loop**: the bare ``run_with_cache_with_saes`` loop (SAEs spliced in, their activations,
  inputs and reconstructions cached, nothing stored): what a researcher's own script does;
* **saestore**: the worker's extraction (``Extractor.run_batch`` + the background writer) into a
  run on local disk;

as tokens/s, their ratios (target: saestore ≥ 0.85 × the SAE loop), the peak GPU memory of each
and the process's host RSS. Without a GPU, or with ``--quick``, the same code runs on small shapes
(the Gemma-2 architecture at d_model 128, 4 layers) on the CPU: the test suite's smoke test.

**Several workers** (:func:`run_scaling`, where two or more GPUs are visible; ``--quick`` runs it
with two CPU processes): one spawned process per device builds the same model and SAEs and runs
the saestore loop on the same batches into its own run, all starting together at a barrier, as
``--devices cuda:0,cuda:1`` runs one worker per device; the ratio is the tokens/s of all of them
together (every token over the span from the first start to the last end) over the single
worker's (target ≥ 1.8 on two GPUs).
"""

from __future__ import annotations

import dataclasses
import os
import queue as queue_mod
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saestore.bench.child import rss_mb

__all__ = ["GpuBench", "FULL_GPU", "QUICK_CPU", "run_gpu_bench", "run_scaling"]

GEMMA = "google/gemma-2-2b"
_SMALL_SHAPE = {"d_model": 128, "d_head": 32, "n_heads": 4, "n_key_value_heads": 2, "d_mlp": 256, "n_layers": 4,
                "d_vocab": 2048, "n_ctx": 256, "window_size": 64, "attn_types": ["local", "global"] * 2}
_SPECIAL = 3  # ids 0 (pad), 1 (eos), 2 (bos) never appear in documents


@dataclass(frozen=True, kw_only=True)
class GpuBench:
    """Shapes of one GPU benchmark."""

    small: bool
    """the Gemma-2 architecture at small shapes (CPU smoke test) instead of Gemma-2-2b's."""
    layers: tuple[int, ...]
    d_sae: int
    l0: float
    batch_size: int
    n_tok: int
    """token positions per document (max_seq_len - 1)."""
    n_batches: int
    dtype: str
    layer_types: tuple[str, ...] = ("res", "mlp", "att")
    seed: int = 0


FULL_GPU = GpuBench(small=False, layers=(6, 12, 18, 24), d_sae=16384, l0=70.0, batch_size=8, n_tok=1023,
                    n_batches=24, dtype="bfloat16")
QUICK_CPU = GpuBench(small=True, layers=(1, 3), d_sae=512, l0=20.0, batch_size=4, n_tok=31, n_batches=4,
                     dtype="float32")


def model_config(bench: GpuBench, device: str) -> Any:
    """Gemma-2-2b's HookedTransformerConfig (or its small-shape variant), random weights."""
    import torch
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    d = convert_hf_model_config(GEMMA)  # name-based for Gemma-2: no hub access
    if bench.small:
        d.update(_SMALL_SHAPE)
    fields = HookedTransformerConfig.__dataclass_fields__
    d = {k: v for k, v in d.items() if k in fields and k != "tokenizer_name"}
    return HookedTransformerConfig(**d, dtype=getattr(torch, bench.dtype), device=device, seed=bench.seed)


def number_tokenizer(d_vocab: int) -> Any:
    """A fast tokenizer whose tokens are the ids written as numbers (``"17 2043 99"``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(d_vocab)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1", bos_token="2")
    fast.padding_side = "right"
    return fast


def random_saes(model: Any, bench: GpuBench, calib_ids: Any) -> tuple[list[Any], list[Any]]:
    """``(specs, saes)``: one random JumpReLU SAE per (layer type, layer), each feature's threshold
    the quantile of its pre-activation on ``calib_ids`` at which it fires with probability
    ``l0 / d_sae``."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from saestore.extract import hooks
    from saestore.extract.sae_specs import SAESpec

    keys = [(lt, layer) for lt in bench.layer_types for layer in bench.layers]
    names = {hooks.hook_name(lt, layer) for lt, layer in keys}
    with torch.inference_mode():
        _, cache = model.run_with_cache(calib_ids, names_filter=lambda n: n in names)
    gen = torch.Generator(device="cpu").manual_seed(bench.seed)
    specs, saes = [], []
    for lt, layer in keys:
        hook = hooks.hook_name(lt, layer)
        x = cache[hook].flatten(0, 1).flatten(1).float()  # (tokens, d_in)
        d_in = x.shape[1]
        w_enc = (torch.randn(d_in, bench.d_sae, generator=gen) / d_in**0.5).to(x.device)
        mean = x.mean(0)
        pre = (x - mean) @ w_enc
        k = max(1, round(bench.l0 / bench.d_sae * x.shape[0]))
        threshold = torch.topk(pre, k + 1, dim=0).values[k].clamp_min(1e-3)
        cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=bench.d_sae, apply_b_dec_to_input=False,
                                reshape_activations=hooks.site(lt).reshape, dtype=bench.dtype,
                                device=str(x.device),
                                metadata=SAEMetadata(hook_name=hook, model_name="gemma-2-2b-random",
                                                     prepend_bos=True, context_size=bench.n_tok + 1))
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(w_enc)
            sae.b_enc.copy_(-(mean @ w_enc))
            sae.threshold.copy_(threshold)
            sae.W_dec.copy_(w_enc.T)
            sae.b_dec.copy_(mean)
        specs.append(SAESpec(layer_type=lt, layer=layer, width=f"{bench.d_sae}", d_sae=bench.d_sae, release=None,
                             sae_id=None, local_path=None, hook_name=hook, expected_l0=bench.l0))
        saes.append(sae)
        del x, pre
    return specs, saes


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_gpu_mb(device: str, reset: bool = False) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


LOOPS = ("forward", "sae_loop", "saestore")


def run_gpu_bench(bench: GpuBench, work: Path, *, device: str | None = None, loops: tuple[str, ...] = LOOPS,
                  barrier: Any = None) -> dict[str, Any]:
    """The three loops of the module docstring (or ``loops`` of them); returns rows, ratios and the
    shapes used. ``barrier``: waited on just before each timed loop starts (several workers)."""
    import torch
    from sae_lens import HookedSAETransformer

    from saestore import protocol
    from saestore.bench.workloads import synthetic_attrs
    from saestore.extract.batches import ChunkSink
    from saestore.extract.config import ExtractConfig
    from saestore.extract.data import Document
    from saestore.extract.worker import AuthorWork, Extractor, WorkerStats, extract_author
    from saestore.writer import RunLayout, RunWriter, create_run, finalize_run

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not bench.small:
        bench = dataclasses.replace(QUICK_CPU)
    t0 = time.perf_counter()
    cfg = model_config(bench, device)
    model = HookedSAETransformer(cfg)
    model.tokenizer = number_tokenizer(cfg.d_vocab)  # what the worker encodes and decodes with
    model.eval()
    rng = np.random.default_rng(bench.seed)
    n_docs = bench.batch_size * bench.n_batches
    ids = rng.integers(_SPECIAL, cfg.d_vocab, size=(n_docs, bench.n_tok))
    bos = torch.full((n_docs, 1), 2, dtype=torch.long)
    input_ids = torch.cat([bos, torch.from_numpy(ids)], dim=1)
    calib = input_ids[: bench.batch_size].to(device)
    specs, saes = random_saes(model, bench, calib)
    build_s = time.perf_counter() - t0
    batches = [input_ids[i:i + bench.batch_size].to(device) for i in range(0, n_docs, bench.batch_size)]
    masks = [torch.ones_like(b) for b in batches]
    n_tokens = n_docs * bench.n_tok

    def timed(loop: Any) -> dict[str, Any]:
        loop(batches[:1], masks[:1])  # warm-up: kernels, allocator, first-use costs
        _sync(device)
        _peak_gpu_mb(device, reset=True)
        if barrier is not None:
            barrier.wait(timeout=900)  # run_scaling aborts it when a worker fails before it
        started = time.time()
        t = time.perf_counter()
        loop(batches, masks)
        _sync(device)
        s = time.perf_counter() - t
        return {"seconds": s, "tokens_per_s": n_tokens / s, "peak_gpu_mb": _peak_gpu_mb(device),
                "host_rss_mb": rss_mb(), "started": started, "ended": started + s, "n_tokens": n_tokens}

    @torch.inference_mode()
    def forward(bs: list[Any], ms: list[Any]) -> None:
        for b, m in zip(bs, ms, strict=True):
            model(b, attention_mask=m)

    @torch.inference_mode()
    def sae_loop(bs: list[Any], ms: list[Any]) -> None:
        for b, m in zip(bs, ms, strict=True):
            model.run_with_cache_with_saes(b, saes=saes, attention_mask=m, use_error_term=True,
                                           names_filter=lambda n: n.endswith(("hook_sae_acts_post",
                                                                              "hook_sae_input", "hook_sae_recons")))

    ecfg = ExtractConfig(model="tiny", layers=bench.layers, layer_types=bench.layer_types,
                         max_seq_len=bench.n_tok + 1, batch_size=bench.batch_size, chunk_docs=4,
                         use_error_term=True, dtype=bench.dtype, quiet=True)
    ex = Extractor.from_loaded(ecfg, specs, device, model, saes)
    texts = [" ".join(map(str, row)) for row in ids]
    storage = protocol.StorageInfo(format="sparse", value_dtype="float32", chunk_docs=4)
    writers: dict[int, tuple[Path, Any]] = {}
    for n_b in (1, len(batches)):  # the warm-up's run and the measured one, created before the timing
        n = n_b * bench.batch_size
        layout = RunLayout(authors=("random",), n_docs=(n,), n_tok=bench.n_tok, layer_types=bench.layer_types,
                           layers=bench.layers, n_features=bench.d_sae, storage=storage)
        path = work / f"gpu-{n_b}.zarr"
        create_run(str(path), layout, synthetic_attrs(layout, model="gemma-2-2b-random"), mode="overwrite")
        writers[n_b] = (path, RunWriter(str(path)))

    def saestore_loop(bs: list[Any], ms: list[Any]) -> None:
        _, writer = writers[len(bs)]
        docs = tuple(Document(doc_id=d, author="random", text=texts[d]) for d in range(len(bs) * bench.batch_size))

        def write(job: tuple[int, int, Any, Any]) -> None:
            a, c, dd, part = job
            writer.write_chunk(a, c, ex.chunk_data(dd, part, writer.layout))

        with ChunkSink(write) as sink:
            extract_author(ex, writer, AuthorWork(author_idx=0, author="random", docs=docs), WorkerStats(), None,
                           sink)
            sink.drain()

    funcs = {"forward": forward, "sae_loop": sae_loop, "saestore": saestore_loop}
    rows = {name: timed(funcs[name]) for name in loops}
    from saestore.writer import read_progress

    for path, _ in writers.values():
        finalize_run(str(path))
    progress = read_progress(writers[len(batches)][0])
    n_stored, nnz = int(progress[..., 1].sum()), int(progress[..., 2].sum())
    stored = {"n_tokens": n_stored, "nnz": nnz, "mean_l0": nnz / max(n_stored, 1) / len(specs)}
    shape = {"model": GEMMA + (" (small shapes)" if bench.small else ""), "d_model": cfg.d_model,
             "n_layers": cfg.n_layers, "d_vocab": cfg.d_vocab, **dataclasses.asdict(bench), "device": device,
             "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
             "n_tokens": n_tokens, "build_s": build_s}
    tps = {name: row["tokens_per_s"] for name, row in rows.items()}
    ratios = {f"{a}_over_{b}": tps[a] / tps[b] for a, b in (("saestore", "sae_loop"), ("sae_loop", "forward"),
                                                            ("saestore", "forward")) if a in tps and b in tps}
    return {"shape": shape, "rows": rows, "ratios": ratios, "stored": stored}


def _scaling_worker(bench: GpuBench, work: Path, device: str, n_cpu_workers: int, barrier: Any,
                    results: Any) -> None:
    if device == "cpu":  # the cores shared out, as --devices cpu:N does
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_cpu_workers))
    out = run_gpu_bench(bench, work, device=device, loops=("saestore",), barrier=barrier)
    results.put((device, out["rows"]["saestore"], out["stored"]))


def run_scaling(bench: GpuBench, work: Path, devices: list[str], single: dict[str, Any]) -> dict[str, Any]:
    """The saestore loop in one spawned process per device at once (see the module docstring);
    ``single``: the one-worker ``saestore`` row to compare with."""
    import multiprocessing as mp

    from saestore.errors import BenchError

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(devices)), ctx.Queue()
    n_cpu = sum(d == "cpu" for d in devices)
    procs = [ctx.Process(target=_scaling_worker, args=(bench, work / f"worker{i}", d, n_cpu, barrier, results))
             for i, d in enumerate(devices)]
    for p in procs:
        p.start()
    rows: list[Any] = []
    try:
        while len(rows) < len(procs):
            try:
                rows.append(results.get(timeout=1.0))
            except queue_mod.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:  # the others would wait at the barrier: break it
                    barrier.abort()
                    raise BenchError(f"a scaling worker failed (exit codes {[p.exitcode for p in procs]})") from None
    finally:
        for p in procs:
            if p.is_alive() and len(rows) < len(procs):
                p.terminate()
            p.join()
    span = max(r["ended"] for _, r, _ in rows) - min(r["started"] for _, r, _ in rows)
    together = sum(r["n_tokens"] for _, r, _ in rows) / span
    return {"devices": devices, "rows": [{"device": d, **r, **st} for d, r, st in rows], "seconds": span,
            "tokens_per_s": together, "ratios": {"workers_over_one": together / single["tokens_per_s"]}}
