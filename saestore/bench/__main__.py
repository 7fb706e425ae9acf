"""``python -m saestore.bench [--quick] [--out DIR]``: every benchmark on the same data, one report.

Sections: 1 bytes per nonzero (synthetic and a tiny-model run; saestore vs the seed's files and a
delphi-style cache), 2 write throughput and peak RSS (saestore writer vs the seed's save path),
3 statistics throughput (sparse dask vs dense ``xr.open_zarr`` vs the seed), 4 one-document
random reads, 5 storage share and peak RSS of a real extraction. Prints the markdown report and
writes ``bench.json`` and ``bench.md`` to DIR (default ``bench_out/``). BENCHMARKS.md holds the last
full run.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
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
    t0 = time.perf_counter()
    try:
        report = run_benchmarks(QUICK if args.quick else FULL, args.out, sections=tuple(args.only), keep=args.keep)
    except BenchError as e:
        print(f"saestore.bench: error: {e}", file=sys.stderr)
        return 1
    print((args.out / "bench.md").read_text(encoding="utf-8"))
    n_miss = sum(not t["passed"] for t in report["targets"])
    print(f"{len(report['targets']) - n_miss}/{len(report['targets'])} targets met; "
          f"report in {args.out}/bench.json and bench.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
