"""Measure, each in a fresh process, what the first sparse selection and a many-query co-occurrence cost.

    python scripts/measure_sparse_access.py RUN [--baseline CHECKOUT]

* first call of a feature-list selection through sparse (``ds.res.isel(...).sel(feature=[...])``,
  numba compiles sparse's indexing) vs the first ``ds.sae.to_csr`` of the same selection (numpy on
  the blocks' coordinates), and the ratio;
Each figure is the fastest of three fresh processes.

* ``cooccurrence`` with 1,000 query features (dense output) and with ``top_k=10``: wall time and
  peak resident memory; with ``--baseline`` also the dense one under another checkout of saestore
  (e.g. one before the batched kernel) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
import saestore, saestore.stats as st
what, run = sys.argv[1], sys.argv[2]
ds = saestore.open_run(run)
features = [int(f) for f in np.linspace(0, ds.sizes["feature"] - 1, 50).astype(int)]
queries = list(range(min(1000, ds.sizes["feature"])))
t = time.perf_counter()
if what == "sparse_sel":
    ds["res"].isel(author=0, layer=0).sel(feature=features).data.compute()
elif what == "to_csr":
    ds.sae.to_csr("res", author=str(ds.author.values[0]), layer=int(ds.layer.values[0]), feature=features)
elif what == "cooc_dense":
    st.cooccurrence(ds, feature=queries, by="author").compute()
elif what == "cooc_top_k":
    st.cooccurrence(ds, feature=queries, by="author", top_k=10).compute()
print(json.dumps({"s": time.perf_counter() - t, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


REPEAT = 3


def child(what: str, run: str, pythonpath: str | None = None) -> dict:
    """The fastest of REPEAT fresh processes (a shared machine's load only adds time)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    best: dict | None = None
    for _ in range(REPEAT):
        out = subprocess.run([sys.executable, "-c", CHILD, what, run], capture_output=True, text=True, env=env,
                             check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        best = got if best is None or got["s"] < best["s"] else best
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--baseline", help="a checkout of saestore to time the dense co-occurrence with")
    args = p.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    sel, csr = child("sparse_sel", args.run, here), child("to_csr", args.run, here)
    print(f"first feature-list selection through sparse: {sel['s']:.2f} s; first ds.sae.to_csr: {csr['s']:.2f} s "
          f"(ratio {sel['s'] / csr['s']:.0f}x)")
    rows = [("cooccurrence, 1,000 queries, dense output", child("cooc_dense", args.run, here)),
            ("cooccurrence, 1,000 queries, top_k=10", child("cooc_top_k", args.run, here))]
    if args.baseline:
        rows.insert(0, (f"cooccurrence, 1,000 queries, dense, {args.baseline}",
                        child("cooc_dense", args.run, args.baseline)))
    for name, r in rows:
        print(f"{name}: {r['s']:.1f} s, peak RSS {r['peak_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
