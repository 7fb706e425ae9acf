"""Generator of the cross-version fixture runs in tests/fixtures/runs/.

Each ``P/zarr-X.Y.zarr`` is the synthetic statistics run (tests/helpers/stats_run.py, seed 0, sparse)
written through the writer API with zarr X.Y installed, in protocol version P (``1.1/``: archived
stores of the last 1.1 writer, kept so that every newer reader is held to them; ``1.2/``: archived
stores of the last 1.2 writer; ``1.3/``: the current writer). tests/test_compat.py reads every one of
them with whatever zarr is installed and checks it against the reference it was drawn from, so a
store written on one zarr line must read identically on every other (CI runs zarr 3.1 on Python
3.11 and the newest zarr on Python 3.13).

Run it once per zarr line that writes a new fixture (refuses to overwrite)::

    python -m tests.make_run_fixtures          # from the repository root: writes tests/fixtures/runs/<protocol>/zarr-<installed>.zarr
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import zarr

from saestore.protocol import PROTOCOL_VERSION

from tests.helpers.stats_run import write_run

FIXTURES = Path(__file__).parent / "fixtures" / "runs" / PROTOCOL_VERSION


def fixture_name(version: str = zarr.__version__) -> str:
    return "zarr-" + ".".join(version.split(".")[:2]) + ".zarr"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=FIXTURES)
    args = p.parse_args()
    target = args.out / fixture_name()
    if target.exists():
        print(f"{target} exists; not overwriting (delete it first to regenerate on purpose)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_run(tmp)
    tmp.rename(target)
    n = sum(1 for f in target.rglob("*") if f.is_file())
    print(f"wrote {target} ({n} files) with zarr {zarr.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
