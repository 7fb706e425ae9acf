"""``python -m saestore``: ``info RUN``, ``validate RUN``, ``runs list|show|add``, ``stats``, ``dashboard``,
``export``, ``extract ...`` (same as ``python -m saestore.extract``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from saestore.errors import SaestoreError


def _cmd_info(args: argparse.Namespace) -> int:
    from saestore.info import format_info, run_info

    info = run_info(args.run)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from saestore.validate import dumps, validate_run

    report = validate_run(args.run, repair=args.repair)
    print(dumps(report) if args.json else report.format())
    if report.repaired:
        _repaired_in_registry(args)
    return 1 if not report.ok else 3 if report.incomplete else 0


def _repaired_in_registry(args: argparse.Namespace) -> None:
    """After ``validate --repair``: the run's registry row takes the store's new status (on stderr)."""
    import sqlite3
    from pathlib import Path

    from saestore.registry import Registry, find_registry

    path = Path(args.registry) if args.registry else find_registry(args.run)
    if path is None or not path.exists():
        print("registry: none found above the run (pass --registry to update one)", file=sys.stderr)
        return
    try:
        record, _ = Registry(path).add(args.run, only_if_registered=True)
    except (OSError, sqlite3.Error) as e:
        print(f"registry {path}: could not be updated ({type(e).__name__}: {e})", file=sys.stderr)
        return
    print(f"registry {path}: " + (f"status {record.status}" if record else
                                  "the run is not registered (`python -m saestore runs add RUN` registers it)"),
          file=sys.stderr)


def _registry(args: argparse.Namespace, *, create: bool = False):
    from pathlib import Path

    from saestore.registry import REGISTRY_FILENAME, Registry, default_registry, find_registry

    if args.registry:
        path = Path(args.registry)
    elif args.output_dir is None and create:  # runs add: the registry above the run, else runs/
        path = find_registry(args.run) or Path("runs") / REGISTRY_FILENAME
    else:
        path = default_registry(args.output_dir or "runs")
    if not create and not path.exists():
        raise SaestoreError(f"no run registry at {path}; pass --registry or --output_dir")
    return Registry(path)


def _cmd_runs(args: argparse.Namespace) -> int:
    from saestore.registry import shown_status

    if args.action != "list" and not args.run:
        raise SaestoreError(f"runs {args.action} needs a run (a path, a run id or, for show, a run name)")
    if args.action == "add":
        from saestore.registry import read_run

        read_run(args.run)  # no run there: refused before a registry is created
    reg = _registry(args, create=args.action == "add")
    if args.action == "list":
        rows = reg.list(model=args.model, dataset=args.dataset)
        if not rows:
            print("no runs")
        for r in rows:
            tokens = f"{r.n_tokens:,}" if r.n_tokens is not None else "-"
            print(f"{shown_status(r):<11} {r.started_at}  {r.model:<24} {r.dataset:<10} {tokens:>12} tok  {r.path}")
        return 0
    if args.action == "add":
        rec, moved = reg.add(args.run)
        print(f"{'moved' if moved else 'registered'} {rec.path} (run id {rec.run_id or '-'}, status "
              f"{shown_status(rec)}) in {reg.path}" + (f"; it was at {moved}" if moved else ""))
        return 0
    rec = reg.get(args.run)
    shown = {**rec.__dict__, "status": shown_status(rec)}
    if shown["status"] != rec.status:
        shown["registry_status"] = rec.status
    print(json.dumps(shown, indent=2, sort_keys=True))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saestore", description="saestore: SAE activation run stores")
    sub = p.add_subparsers(dest="command", required=True)
    from saestore.stats.cli import register as register_stats

    register_stats(sub)
    from saestore.dashboard import register as register_dashboard

    register_dashboard(sub)
    from saestore.export import register as register_export

    register_export(sub)
    info = sub.add_parser("info", help="summary of a run: authors, docs, tokens, SAEs, nonzeros, L0, bytes, status")
    info.add_argument("run", help="run path (or fsspec URL)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    val = sub.add_parser("validate", help="check layout, schema, every chunk's checksum and every progress marker "
                         "of the finished doc-chunks; exit 0 complete and valid, 1 problems, 3 valid so far but "
                         "incomplete (being written, or interrupted)")
    val.add_argument("run", help="run path")
    val.add_argument("--repair", action="store_true",
                     help="clear the markers of bad doc-chunks so `extract` (same command or --resume) recomputes them")
    val.add_argument("--json", action="store_true", help="print JSON")
    val.add_argument("--registry", help="with --repair: the registry whose row of the run takes its new status "
                     "(default: the nearest saestore_runs.sqlite in a folder above the run)")
    val.set_defaults(func=_cmd_validate)
    runs = sub.add_parser("runs", help="the run registry: runs list [--model M --dataset D] | runs show RUN | "
                          "runs add PATH")
    runs.add_argument("action", choices=["list", "show", "add"],
                      help="list the runs; show one; add (or re-register) the run found at a path, e.g. a moved "
                           "or copied run (the row with its run id moves there)")
    runs.add_argument("run", nargs="?", help="show: any spelling of a run's path, its run id, or its run name; "
                      "add: the run's path")
    runs.add_argument("--model")
    runs.add_argument("--dataset")
    runs.add_argument("--output_dir", help="where the registry lives (default: runs; for add, the nearest "
                      "saestore_runs.sqlite above the run, else runs)")
    runs.add_argument("--registry", help="registry file (default: {output_dir}/saestore_runs.sqlite)")
    runs.set_defaults(func=_cmd_runs)
    sub.add_parser("extract", help="extract a run (python -m saestore extract --help)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["extract"]:
        from saestore.extras import MissingExtraError, require

        try:
            require("extract", what="python -m saestore extract")
        except MissingExtraError as e:
            print(f"saestore extract: error: {e}", file=sys.stderr)
            return 2
        from saestore.extract.launch import main as extract_main

        return extract_main(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except SaestoreError as e:
        print(f"saestore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` closed the pipe: stop quietly, as a killed-by-SIGPIPE tool would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
