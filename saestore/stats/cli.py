"""``python -m saestore stats RUN --stat NAME ... --out FILE``: compute one statistic of a run and
write it as netCDF (``.nc``), Zarr (``.zarr``), CSV (``.csv``) or Parquet (``.parquet``).

Local runs use dask's threaded scheduler with a progress bar; ``--scheduler ADDRESS`` (or the
``SAESTORE_SCHEDULER`` environment variable) connects a ``distributed.Client`` to an existing
cluster instead. ``RUN`` is a path or an fsspec URL (``file://…``, ``s3://…``).

Heavy imports (xarray, dask) happen only when the command runs, so registering the sub-command
costs nothing for the other commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saestore.stats._registry import BY_NAME, RANK_BY, cli_stats

log = logging.getLogger(__name__)

__all__ = ["register", "main", "make_parser", "STATS", "compute_stat", "write_result"]

#: --stat name → (function in saestore.stats, variable to keep or None for the whole Dataset).
STATS: dict[str, tuple[str, str | None]] = cli_stats()
FORMATS = (".nc", ".zarr", ".csv", ".parquet")
# which optional arguments each function accepts (besides layer_type and the selection)
_NO_SELECTION_FEATURE = {"cooccurrence"}


def _doc_arg(text: str) -> slice | list[int]:
    """``START:STOP`` or ``I,J,K``."""
    try:
        if ":" in text:
            start, stop = text.split(":", 1)
            return slice(int(start) if start else None, int(stop) if stop else None)
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--doc takes START:STOP or I,J,K, not {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``stats`` command's arguments."""
    p.add_argument("run", help="run path or fsspec URL (file://…)")
    p.add_argument("--stat", required=True, choices=sorted(STATS), help="the statistic to compute")
    p.add_argument("--out", required=True, help="output file: .nc, .zarr, .csv or .parquet (by extension)")
    p.add_argument("--by", choices=["author", "pooled"], default="pooled",
                   help="keep authors apart or pool them (default: pooled)")
    p.add_argument("--layer_type", nargs="+", help="layer type(s): res, mlp, att (default: all in the run)")
    p.add_argument("--layer", nargs="+", type=int, help="layer number(s) (default: all)")
    p.add_argument("--author", nargs="+", help="author name(s) (default: all)")
    p.add_argument("--doc", type=_doc_arg, help="document positions: START:STOP or I,J,K (default: all)")
    p.add_argument("--feature", nargs="+", type=int,
                   help="feature id(s); for cooccurrence the query feature(s) (default: all)")
    p.add_argument("--k", type=int, default=10, help="top_examples: examples per feature; top_tokens, "
                   "top_author_features: entries per feature / author (default: 10)")
    p.add_argument("--top_k", type=int, help="cooccurrence: only each query's top-k partners (default: every "
                   "feature, a dense queries x features result)")
    p.add_argument("--rank_by", choices=list(RANK_BY), default=RANK_BY[0],
                   help="cooccurrence --top_k: what ranks the partners (default: jaccard)")
    p.add_argument("--window", type=int, default=5, help="top_examples: tokens each side (default: 5)")
    p.add_argument("--full_text", action="store_true", help="top_examples to .csv/.parquet: add each example's "
                   "full document text (default: the context window only, one row per example)")
    p.add_argument("--threshold", type=float, default=0.1, help="dense: frequency threshold (default: 0.1)")
    p.add_argument("--q", nargs="+", type=float, help="quantiles / l0_summary: the quantiles")
    p.add_argument("--over", choices=["active", "valid"], default="active", help="quantiles: over active or all "
                   "valid tokens (default: active)")
    p.add_argument("--min_count", type=int, default=1, help="top_tokens: minimum occurrences of a token")
    p.add_argument("--alpha", type=float, default=0.5, help="author specificity: smoothing (default: 0.5)")
    p.add_argument("--scheduler", default=os.environ.get("SAESTORE_SCHEDULER"),
                   help="dask.distributed scheduler address (default: $SAESTORE_SCHEDULER, else local threads)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``stats`` sub-command to an ``argparse`` sub-parsers object; the parsed namespace's
    ``func(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser("stats", help="compute a feature statistic of a run and write it to a file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saestore stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def compute_stat(ds: Any, args: argparse.Namespace) -> Any:
    """The lazy result of ``--stat`` on ``ds`` with the command-line selection."""
    from saestore import stats

    fn_name, variable = STATS[args.stat]
    fn: Callable[..., Any] = getattr(stats, fn_name)
    kw: dict[str, Any] = {"author": args.author, "layer": args.layer, "doc": args.doc}
    by = None if args.by == "pooled" else args.by
    stat = BY_NAME[fn_name]
    if not stat.sae:  # token-level metrics: no SAE selection
        return fn(ds, author=args.author, **({"by": by} if stat.by else {}))
    if stat.by:  # the others are per author anyway (l0, doc_vectors, specificity)
        kw["by"] = by
    if fn_name in _NO_SELECTION_FEATURE and not args.feature:
        raise stats.StatsError("cooccurrence needs --feature (the query feature ids)")
    kw["feature"] = args.feature
    if fn_name == "top_examples":
        kw.update(k=args.k, window=args.window)
    elif fn_name == "top_tokens":
        kw.update(k=args.k, min_count=args.min_count)
    elif fn_name == "top_author_features":
        kw.update(k=args.k, alpha=args.alpha)
    elif fn_name == "author_specificity":
        kw.update(alpha=args.alpha)
    elif fn_name == "cooccurrence":
        kw.update(top_k=args.top_k, rank_by=args.rank_by)
    elif fn_name == "dense_features":
        kw.update(threshold=args.threshold)
    elif fn_name == "quantiles":
        kw.update(over=args.over)
        if args.q:
            kw["q"] = args.q
    elif fn_name == "l0_summary" and args.q:
        kw["q"] = args.q
    result = fn(ds, args.layer_type, **kw)
    return result[variable] if variable else result


def _to_dataset(result: Any, name: str) -> Any:
    import xarray as xr

    if isinstance(result, xr.DataArray):
        return result.to_dataset(name=result.name or name)
    return result


def _sparse_table(ds: Any) -> Any:
    """Long table of the nonzeros of sparse variables: dims as columns, one column per variable."""
    import numpy as np
    import pandas as pd

    frames = []
    for name, var in ds.data_vars.items():
        coo = var.data
        cols = {dim: ds[dim].values[coo.coords[i]] for i, dim in enumerate(var.dims)}
        frames.append(pd.DataFrame({**cols, name: coo.data}).set_index(list(var.dims)))
    out = pd.concat(frames, axis=1).fillna(0.0).reset_index()
    for c in ds.coords:
        if c not in out.columns and np.ndim(ds[c].values) == 0:
            out[c] = ds[c].values.item()
    return out


def _dim_order(ds: Any) -> list[str]:
    """Dims of the variable with the most dims first (its order), then any others."""
    widest = max(ds.data_vars.values(), key=lambda v: v.ndim).dims if ds.data_vars else ()
    return [*widest, *(d for d in ds.dims if d not in widest)]


def write_result(ds: Any, out: str | Path) -> str:
    """Write a computed Dataset by extension: .nc, .zarr, .csv or .parquet (a DataFrame: .csv or
    .parquet only). Returns the format."""
    import pandas as pd
    import sparse

    out = str(out)
    suffix = _out_format(out)
    is_sparse = not isinstance(ds, pd.DataFrame) and any(isinstance(v.data, sparse.SparseArray)
                                                         for v in ds.data_vars.values())
    if suffix in (".csv", ".parquet"):
        if isinstance(ds, pd.DataFrame):  # already a table (top_examples: one row per example)
            df = ds
        elif not ds.dims:  # a pooled scalar (e.g. bits_per_byte): one row, one column per variable
            df = pd.DataFrame([{str(k): v.values.item() for k, v in {**ds.coords, **ds.data_vars}.items()}])
        else:
            df = _sparse_table(ds) if is_sparse else ds.to_dataframe(dim_order=_dim_order(ds)).reset_index()
        if suffix == ".csv":
            df.to_csv(out, index=False)
        else:
            df.columns = [str(c) for c in df.columns]
            for c in df.columns:
                if df[c].dtype == object:
                    df[c] = df[c].astype(str)
            df.to_parquet(out, index=False)
        return suffix
    if is_sparse:
        ds = ds.map(lambda v: v.copy(data=v.data.todense()) if isinstance(v.data, sparse.SparseArray) else v)
    if suffix == ".zarr":
        ds.to_zarr(out, mode="w", consolidated=True)
    else:
        _to_netcdf(ds, out)
    return suffix


def _to_netcdf(ds: Any, out: str) -> None:
    """netCDF4 through netCDF4 or h5netcdf when installed, else netCDF3 (scipy): int64 becomes
    int32 where it fits and strings are stored as UTF-8 character arrays."""
    import importlib.util

    import numpy as np

    for engine, module in (("netcdf4", "netCDF4"), ("h5netcdf", "h5netcdf")):
        if importlib.util.find_spec(module):
            ds.to_netcdf(out, engine=engine)
            return
    ds = ds.copy()
    for name in list(ds.variables):
        v = ds[name]
        if v.dtype == np.int64:
            ds[name] = v.astype(np.int32) if (v.size == 0 or np.abs(v.values).max() < 2**31) else v.astype(np.float64)
        elif v.dtype == bool:
            ds[name] = v.astype(np.int8)
        elif v.dtype.kind in "OU":
            ds[name] = v.astype(str).astype(object)
            ds[name].encoding["_Encoding"] = "utf-8"
    for k in list(ds.attrs):
        if isinstance(ds.attrs[k], bool):
            ds.attrs[k] = int(ds.attrs[k])
    ds.to_netcdf(out, engine="scipy")


def _compute(result: Any, scheduler: str | None) -> Any:
    if scheduler:
        from distributed import Client, progress

        with Client(scheduler) as client:
            log.info("computing on the cluster at %s (dashboard: %s)", scheduler, client.dashboard_link)
            future = client.compute(result)
            if sys.stderr.isatty():
                progress(future)
            return future.result()
    from dask.diagnostics import ProgressBar

    with ProgressBar(out=sys.stderr, minimum=1.0):
        return result.compute(scheduler="threads")


def require_extras(out: str, scheduler: str | None) -> None:
    """Before anything is computed: the extras that ``--out`` and ``--scheduler`` need (one-line error)."""
    import importlib.util

    from saestore.extras import require

    if str(out).endswith(".parquet"):
        require("io", "pyarrow", what="--out FILE.parquet")
    if str(out).endswith(".nc") and not any(importlib.util.find_spec(m) for m in ("netCDF4", "h5netcdf", "scipy")):
        require("io", "h5netcdf", what="--out FILE.nc")
    if scheduler:
        require("distributed", what="--scheduler")


def _out_format(out: str) -> str:
    """The format (suffix) of ``--out``, or a StatsError naming the ones there are."""
    from saestore.errors import StatsError

    suffix = next((s for s in FORMATS if str(out).endswith(s)), None)
    if suffix is None:
        raise StatsError(f"--out must end in one of {', '.join(FORMATS)}, got {out!r}")
    return suffix


def _check_out(out: str) -> None:
    """Before anything is computed: ``--out`` has a known format and, if local, a writable folder."""
    from saestore.errors import StatsError
    from saestore.location import is_url

    _out_format(out)
    if is_url(out):
        return
    parent = Path(out).expanduser().resolve().parent
    if not parent.is_dir():
        raise StatsError(f"cannot write {out}: the folder {parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise StatsError(f"cannot write {out}: the folder {parent} is not writable; choose another --out")


def open_finished(run: str) -> Any:
    """``open_run(run)`` for statistics: refused (StatsError) when no doc-chunk is finished (a run
    killed or failed before any: nothing to compute); on an incomplete run the reader's warning is
    said in one log line (statistics then cover the finished doc-chunks only)."""
    import warnings

    import zarr

    from saestore.errors import IncompleteRunWarning, StatsError
    from saestore.reader import doc_chunk_counts, open_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IncompleteRunWarning)
        ds = open_run(run)
    try:
        n_done, total = doc_chunk_counts(zarr.open_group(run, mode="r"))
    except (ValueError, RuntimeError, OSError, KeyError):  # damaged markers (validate names them): read as stored
        n_done, total = 1, 1
    if n_done == 0 and total:
        status = ds.attrs.get("saestore", {}).get("status")
        raise StatsError(f"{run} has no finished doc-chunk (status {status}, 0 of {total} done): there is nothing to "
                         "compute statistics of; rerun its extraction command to finish it")
    for w in caught:
        if issubclass(w.category, IncompleteRunWarning):
            log.warning("statistics of an incomplete run, over its finished doc-chunks only: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def run(args: argparse.Namespace) -> int:
    """Run the ``stats`` command from parsed arguments; returns the exit code."""
    require_extras(args.out, args.scheduler)
    _check_out(args.out)
    t0 = time.perf_counter()
    ds = open_finished(args.run)
    lazy = compute_stat(ds, args)
    result = _to_dataset(_compute(lazy, args.scheduler), args.stat)
    if args.stat == "top_examples" and _out_format(args.out) in (".csv", ".parquet"):
        from saestore.stats.examples import example_table

        result = example_table(result, text=args.full_text)  # one row per example, not per window token
    fmt = write_result(result, args.out)
    sizes = ", ".join(f"{k}: {v}" for k, v in getattr(result, "sizes", {"rows": len(result)}).items()) or "one value each"
    print(f"wrote {args.stat} ({sizes}) to {args.out} [{fmt[1:]}] in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m saestore.stats.cli RUN --stat NAME --out FILE ...`` (the ``stats`` command's
    arguments, without the word ``stats``)."""
    from saestore.errors import SaestoreError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except SaestoreError as e:
        print(f"saestore stats: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
