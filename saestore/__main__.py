"""``python -m saestore``: ``info RUN``, ``validate``, ``runs list|show``, ``stats``, ``dashboard``, ``export``,
``extract ...`` (same as ``python -m saestore.extract``)."""

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
    return 1 if not report.ok else 3 if report.incomplete else 0


def _registry(args: argparse.Namespace):
    from pathlib import Path

    from saestore.registry import Registry, default_registry

    path = Path(args.registry) if args.registry else default_registry(args.output_dir)
    if not path.exists():
        raise SaestoreError(f"no run registry at {path}; pass --registry or --output_dir")
    return Registry(path)


def _cmd_runs(args: argparse.Namespace) -> int:
    from saestore.registry import shown_status

    reg = _registry(args)
    if args.action == "list":
        rows = reg.list(model=args.model, dataset=args.dataset)
        if not rows:
            print("no runs")
        for r in rows:
            tokens = f"{r.n_tokens:,}" if r.n_tokens is not None else "-"
            print(f"{shown_status(r):<11} {r.started_at}  {r.model:<24} {r.dataset:<10} {tokens:>12} tok  {r.path}")
        return 0
    if not args.run:
        raise SaestoreError("runs show needs a run path or name")
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
    val.set_defaults(func=_cmd_validate)
    runs = sub.add_parser("runs", help="the run registry: runs list [--model M --dataset D] | runs show RUN")
    runs.add_argument("action", choices=["list", "show"])
    runs.add_argument("run", nargs="?", help="run path or run name (for show)")
    runs.add_argument("--model")
    runs.add_argument("--dataset")
    runs.add_argument("--output_dir", default="runs", help="where the registry lives (default: runs)")
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
