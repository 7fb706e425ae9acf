"""``python -m saestore.bench [--quick] [--out DIR]``: every benchmark on the same data, one report.

Sections: 1 bytes per nonzero (synthetic and a tiny-model run; saestore vs the seed's files and a
delphi-style cache), 2 write throughput and peak RSS (saestore writer vs the seed's save path),
3 statistics throughput (sparse dask vs dense ``xr.open_zarr`` vs the seed), 4 one-document
random reads, 5 storage share and peak RSS of a real extraction, 6 storage overlapping a simulated
device (the worker loop with a fixed-latency forward), 7 files of an unsharded and a sharded run,
8 statistics at corpus scale (``--tokens N``: summaries vs full scan vs the seed, pruned top-k). Prints the markdown report and
writes ``bench.json`` and ``bench.md`` to DIR (default ``bench_out/``). BENCHMARKS.md holds the last
full run. ``--docs``, ``--n-tok``, ``--features``, ``--l0``, ``--chunk-docs`` and ``--stats-growth``
resize the synthetic workload (e.g. ``--only stats --docs 4 --n-tok 256``). ``--codec`` instead
measures the codec chain alone on one synthetic chunk (:mod:`saestore.bench.codec_bytes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from saestore.bench.run import FULL, QUICK, SECTIONS, run_benchmarks
from saestore.errors import BenchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saestore.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (under two minutes on 2 cores; the test suite's smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for bench.json and bench.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and files under DIR/work")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sizes = parser.add_argument_group("sizes", "override the synthetic workload of the chosen mode "
                                      "(--chunk-docs, --n-tok, --features and --l0 also size --codec's chunk)")
    sizes.add_argument("--docs", type=_positive(int), help="documents per author")
    sizes.add_argument("--n-tok", type=_positive(int), help="token positions per document")
    sizes.add_argument("--features", type=_positive(int), help="SAE width")
    sizes.add_argument("--l0", type=_positive(float), help="mean active features per real token")
    sizes.add_argument("--chunk-docs", type=_positive(int), help="documents per doc-chunk")
    sizes.add_argument("--stats-growth", type=_positive(int),
                       help="the larger run of sections 3 and 4 has this many times the documents per author")
    sizes.add_argument("--tokens", type=_positive(int),
                       help="token positions of section 8's run (statistics at corpus scale; default 10M, "
                            "--quick 200k)")
    codec = parser.add_argument_group("codec chain", "bytes per nonzero and throughput of the sparse codec chain on "
                                      "one synthetic chunk, against dense, naive COO, the seed's CSR and the bound")
    codec.add_argument("--codec", action="store_true",
                       help="run only this (no extra needed): print the table, write codec_bytes.json to DIR")
    codec.add_argument("--repeat", type=_positive(int), default=5, help="timing repetitions, best reported (default 5)")
    codec.add_argument("--check", action="store_true", help="exit 1 if a bytes-per-nonzero target is missed")
    gpu = parser.add_argument_group("device speed", "extraction vs the bare SAE loop and the bare forward on random "
                                    "Gemma-2-2b weights with 12 random 16k SAEs (saestore.bench.gpu)")
    gpu.add_argument("--gpu", action="store_true",
                     help="run only this: on the first GPU, or on small shapes on the CPU (also with --quick); "
                          "with two or more GPUs also one worker per GPU at once (with --quick on the CPU: two "
                          "CPU workers); prints one line per ratio, writes gpu.json to DIR")
    objstore = parser.add_argument_group("object storage", "a run written to and read from a local S3 server "
                                         "(moto, on 127.0.0.1) next to local disk (saestore.bench.objstore)")
    objstore.add_argument("--objstore", action="store_true",
                          help="run only this: print the table, write objstore.json to DIR (also with --quick)")
    args = parser.parse_args(argv)
    if args.codec:
        return _codec(args)
    from saestore.extras import MissingExtraError, require

    try:
        require("bench", what="python -m saestore.bench")
    except MissingExtraError as e:
        print(f"saestore.bench: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("numba", "asyncio", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
    warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3 specification.*")
    if args.gpu:
        return _gpu(args)
    if args.objstore:
        return _objstore(args)
    t0 = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    workload = {k: v for k, v in (("n_docs", args.docs), ("n_tok", args.n_tok), ("n_features", args.features),
                                  ("l0", args.l0), ("chunk_docs", args.chunk_docs)) if v is not None}
    cfg = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, **workload),
                              stats_growth=args.stats_growth or cfg.stats_growth,
                              scale_tokens=args.tokens or cfg.scale_tokens)
    try:
        report = run_benchmarks(cfg, args.out, sections=tuple(args.only), keep=args.keep)
    except BenchError as e:
        print(f"saestore.bench: error: {e}", file=sys.stderr)
        return 1
    print((args.out / "bench.md").read_text(encoding="utf-8"))
    n_miss = sum(not t["passed"] for t in report["targets"])
    print(f"{len(report['targets']) - n_miss}/{len(report['targets'])} targets met; "
          f"report in {args.out}/bench.json and bench.md ({time.perf_counter() - t0:.0f} s)")
    return 0


def _positive(kind: type) -> object:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _codec(args: argparse.Namespace) -> int:
    from saestore.bench.codec_bytes import markdown, measure_codec

    sizes = {k: v for k, v in (("n_docs", args.chunk_docs), ("n_tok", args.n_tok), ("n_features", args.features),
                               ("l0", args.l0)) if v is not None}
    try:
        doc = measure_codec(**sizes, repeat=args.repeat)
    except BenchError as e:
        print(f"saestore.bench: error: {e}", file=sys.stderr)
        return 1
    print(markdown(doc))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_bytes.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if doc["missed"]:
        print(f"targets missed: {doc['missed']}", file=sys.stderr)
    return 1 if (args.check and doc["missed"]) else 0



def _gpu(args: argparse.Namespace) -> int:
    import json
    import tempfile

    import torch

    from saestore.bench.gpu import FULL_GPU, QUICK_CPU, run_gpu_bench, run_scaling

    args.out.mkdir(parents=True, exist_ok=True)
    bench = QUICK_CPU if args.quick else FULL_GPU
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = [f"cuda:{i}" for i in range(n_gpus)] if n_gpus >= 2 else ["cpu", "cpu"] if args.quick else []
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        res = run_gpu_bench(bench, Path(work))
        if devices:
            if n_gpus:
                torch.cuda.empty_cache()  # the first worker's device serves a scaling worker next
            res["scaling"] = run_scaling(bench, Path(work) / "scaling", devices, res["rows"]["saestore"])
            res["ratios"].update(res["scaling"]["ratios"])
    sh = res["shape"]
    print(f"{sh['model']} on {sh['gpu'] or sh['device']}: {len(sh['layer_types']) * len(sh['layers'])} SAEs of "
          f"{sh['d_sae']:,} features, batch {sh['batch_size']} x {sh['n_tok'] + 1} tokens, {sh['n_tokens']:,} tokens")
    for name, row in res["rows"].items():
        gpu_mb = f", peak GPU {row['peak_gpu_mb']:,.0f} MiB" if row["peak_gpu_mb"] is not None else ""
        print(f"{name}: {row['tokens_per_s']:,.0f} tokens/s{gpu_mb}, host RSS {row['host_rss_mb']:,.0f} MiB")
    if "scaling" in res:
        sc = res["scaling"]
        print(f"saestore on {len(sc['devices'])} workers ({', '.join(sc['devices'])}) at once: "
              f"{sc['tokens_per_s']:,.0f} tokens/s together")
    else:
        print("one GPU or none: the several-worker scaling is not measured (it needs two GPUs)")
    for name, value in res["ratios"].items():
        print(f"{name}: {value:.3f}")
    (args.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


def _objstore(args: argparse.Namespace) -> int:
    import tempfile

    from saestore.bench.objstore import FULL_OBJSTORE, QUICK_OBJSTORE, markdown, measure_objstore

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=args.out) as work:
            res = measure_objstore(QUICK_OBJSTORE if args.quick else FULL_OBJSTORE, Path(work))
    except BenchError as e:
        print(f"saestore.bench: error: {e}", file=sys.stderr)
        return 1
    print(markdown(res))
    (args.out / "objstore.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
