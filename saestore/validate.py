"""``python -m saestore validate RUN [--repair]``: check a run against PROTOCOL.md, chunk by chunk.

Checks: the root attributes (schema, version, layout); every array's presence, dimension names,
data type, chunk shape, fill value and codec chain; every stored chunk's checksum and
decodability; every progress marker against its chunks (valid-token and nonzero counts must
match what the chunks hold, so a missing or replaced chunk file is caught; SAE chunks that store no
value are named as the likely missing ones); and, for every written doc-chunk, the padding rules of
§2.5 on its per-token and per-document chunks (a missing chunk file reads as its fill value, which
breaks them wherever the doc-chunk has tokens). ``--repair`` clears the markers of bad doc-chunks,
so rerunning the extraction recomputes exactly those.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from saestore import protocol
from saestore.errors import SaestoreError
from saestore.reader import is_sparse_variable, read_sparse_chunk


@dataclass(frozen=True, kw_only=True)
class Problem:
    kind: str  # layout | attributes | chunk | marker
    where: str
    message: str
    author_idx: int | None = None
    doc_chunk: int | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.where}: {self.message}"


@dataclass
class Report:
    path: str
    problems: list[Problem]
    n_chunks_checked: int = 0
    n_markers_checked: int = 0
    repaired: list[tuple[str, int]] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"validate {self.path}: {self.n_chunks_checked} chunks and {self.n_markers_checked} progress "
                 f"markers checked, {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        if self.repaired:
            lines.append(f"repaired: cleared {len(self.repaired)} marker(s): "
                         + ", ".join(f"{a!r} doc-chunk {c}" for a, c in self.repaired)
                         + "; run the extraction again (same command, or --resume) to recompute them")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def _expected_chunks(dims: tuple[str, ...], cd: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if dims == protocol.SAE_DIMS:
        return (1, 1, cd, shape[3], shape[4])
    if dims == protocol.TOKEN_DIMS:
        return (1, cd, shape[2])
    if dims == protocol.DOC_DIMS:
        return (1, cd)
    return tuple(shape)


def _check_layout(group: zarr.Group, attrs: protocol.RunAttrs, where: str) -> list[Problem]:
    problems = []
    cd = attrs.storage.chunk_docs
    specs = [*protocol.VARIABLES, *(protocol.sae_variable(lt) for lt in attrs.saes)]
    for name in protocol.COORDS:
        if name not in group:
            problems.append(Problem(kind="layout", where=name, message="coordinate array is missing"))
    for spec in specs:
        try:
            arr = group[spec.name] if spec.name in group else None
        except (ValueError, TypeError, KeyError) as e:  # metadata zarr cannot parse (e.g. a bad codec entry)
            problems.append(Problem(kind="layout", where=spec.name, message=f"unreadable metadata: {e}"))
            continue
        if arr is None:
            problems.append(Problem(kind="layout", where=spec.name, message="variable is missing"))
            continue
        meta = arr.metadata.to_dict()
        if tuple(meta.get("dimension_names") or ()) != spec.dims:
            problems.append(Problem(kind="layout", where=spec.name,
                                    message=f"dimension_names {meta.get('dimension_names')} != {list(spec.dims)}"))
            continue
        want_dtype = spec.dtype
        if spec.name in protocol.LAYER_TYPES and attrs.storage.format == "dense" and attrs.storage.value_dtype == "float16":
            want_dtype = "float16"
        if meta["data_type"] != want_dtype:
            problems.append(Problem(kind="layout", where=spec.name, message=f"data_type {meta['data_type']} != {want_dtype}"))
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        if chunks != _expected_chunks(spec.dims, cd, tuple(arr.shape)):
            problems.append(Problem(kind="layout", where=spec.name,
                                    message=f"chunk shape {chunks} breaks the chunking rule (PROTOCOL.md §2.3)"))
        if spec.name in protocol.LAYER_TYPES:
            names = [c["name"] for c in meta["codecs"]]
            want = ["saestore.sparse_coo" if attrs.storage.format == "sparse" else "bytes", "zstd", "crc32c"]
            if names != want:
                problems.append(Problem(kind="layout", where=spec.name, message=f"codec chain {names} != {want}"))
            elif attrs.storage.format == "sparse":
                try:
                    protocol.validate_json(meta["codecs"][0], "sparse_coo_codec")
                except SaestoreError as e:
                    problems.append(Problem(kind="layout", where=spec.name, message=str(e)))
            if meta["fill_value"] != 0.0:
                problems.append(Problem(kind="layout", where=spec.name, message=f"fill_value {meta['fill_value']} != 0.0"))
    if protocol.PROGRESS_PATH not in group:
        problems.append(Problem(kind="layout", where=protocol.PROGRESS_PATH, message="progress array is missing"))
    return problems


def _grid(arr: zarr.Array) -> list[tuple[int, ...]]:
    chunks = arr.chunks
    counts = [math.ceil(s / c) for s, c in zip(arr.shape, chunks, strict=True)]
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*counts)]


def _block(arr: zarr.Array, coords: tuple[int, ...], keep: int) -> np.ndarray:
    """Chunk ``coords`` of ``arr`` as its last ``keep`` axes (zarr 3.1 drops the axes an integer block
    index selects, zarr >= 3.2 keeps them with length 1)."""
    block = np.asarray(arr.blocks[coords])
    return block.reshape(block.shape[-keep:])


def _token_problems(group: zarr.Group, a: int, c: int, cd: int, n_docs: int) -> list[str]:
    """PROTOCOL.md §2.5 on one written doc-chunk's per-token and per-document chunks. A chunk file that
    is missing reads as its fill value, which breaks these rules wherever the doc-chunk has tokens."""
    tok = {name: _block(group[name], (a, c, 0), 2) for name in ("valid_mask", "token_id", "token", "ce_loss", "entropy")}
    doc = {name: _block(group[name], (a, c), 1) for name in ("text", "doc_id", "doc_length", "n_truncated")}
    valid = tok["valid_mask"].astype(bool)
    exists = np.arange(valid.shape[0]) < n_docs - c * cd
    out = []

    def check(ok: np.ndarray, name: str, rule: str) -> None:
        if not ok.all():
            out.append(f"{name} breaks '{rule}' at {int((~ok).sum())} position(s) (its chunk file may be missing "
                       "or replaced)")

    check((tok["token_id"] >= 0) == valid, "token_id", "-1 exactly at padding")
    check(np.isnan(tok["ce_loss"]) == ~valid, "ce_loss", "NaN exactly at padding")
    check(np.isnan(tok["entropy"]) == ~valid, "entropy", "NaN exactly at padding")
    check(np.asarray(tok["token"][~valid] == "", dtype=bool), "token", "empty at padding")
    if valid.any() and (tok["token"][valid] == "").all():
        out.append("token is empty at every valid token (its chunk file may be missing or replaced)")
    check(doc["doc_length"] == valid.sum(axis=-1), "doc_length", "the number of valid tokens")
    check((doc["doc_id"] >= 0) == exists, "doc_id", "-1 exactly for missing documents")
    empty_text = np.asarray(doc["text"] == "", dtype=bool)
    check(np.where(exists, ~(empty_text & (doc["doc_length"] > 0)), empty_text), "text",
          "empty exactly for missing documents")
    check(exists | (doc["n_truncated"] == 0), "n_truncated", "0 for missing documents")
    return out


def validate_run(path: str | Path, *, repair: bool = False) -> Report:
    """Check a run; with ``repair``, clear the progress markers of every bad doc-chunk."""
    path = str(path)
    report = Report(path=path, problems=[])
    try:
        group = zarr.open_group(path, mode="r", use_consolidated=False)
        attrs = protocol.read_attrs(dict(group.attrs), where=path)
    except (SaestoreError, FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        report.problems.append(Problem(kind="attributes", where=path, message=str(e)))
        return report
    report.problems += _check_layout(group, attrs, path)
    if report.problems:
        return report
    try:
        authors = [str(a) for a in group["author"][...]]
        layers = [int(x) for x in group["layer"][...]]
        group["n_docs"][...]
    except (ValueError, RuntimeError) as e:  # a corrupt coordinate: nothing can be named, nor recomputed
        report.problems.append(Problem(kind="layout", where="author, layer, n_docs", message=(
            f"unreadable: {type(e).__name__}: {e}. Re-extraction cannot repair the run's coordinates: "
            "recreate it (extract ... --overwrite)")))
        return report
    cd = attrs.storage.chunk_docs
    # decode every chunk; per (author, doc-chunk): nonzeros and valid tokens actually stored
    nnz: dict[tuple[int, int], int] = defaultdict(int)
    n_valid: dict[tuple[int, int], int] = defaultdict(int)
    empty: dict[tuple[int, int], list[str]] = defaultdict(list)  # SAE chunks storing no value
    bad: set[tuple[int, int]] = set()
    progress_shape = zarr.open_array(path, path=protocol.PROGRESS_PATH, mode="r").shape
    layer_types = tuple(lt for lt in protocol.LAYER_TYPES if lt in attrs.saes)
    quality = [v.name for v in protocol.quality_variables(layer_types, "ce_clean" in group) if v.name in group]
    for name in [*layer_types, *(v.name for v in protocol.VARIABLES), *quality]:
        arr = group[name]
        sparse_var = name in protocol.LAYER_TYPES and is_sparse_variable(arr)
        layered = tuple(arr.metadata.dimension_names[:2]) == ("author", "layer")
        for coords in _grid(arr):
            a = coords[0] if arr.metadata.dimension_names[0] == "author" else None
            c = coords[2] if layered else (coords[1] if len(coords) > 1 else None)
            where = f"{name} chunk {'/'.join(map(str, coords))}"
            if a is not None:
                where += f" (author {authors[a]!r}" + (f", layer {layers[coords[1]]}" if layered else "") \
                         + (f", doc-chunk {c})" if c is not None else ")")
            try:
                if sparse_var:
                    block = read_sparse_chunk(arr, coords)
                    count = int(block.nnz)
                else:
                    block = arr.blocks[coords]
                    count = int(np.count_nonzero(block)) if name in protocol.LAYER_TYPES else 0
                    if name == "valid_mask":
                        n_valid[(a, c)] += int(np.count_nonzero(block))
            except Exception as e:
                report.problems.append(Problem(kind="chunk", where=where, message=f"{type(e).__name__}: {e}",
                                               author_idx=a, doc_chunk=c))
                if a is not None and c is not None and c < progress_shape[1]:
                    bad.add((a, c))
                continue
            report.n_chunks_checked += 1
            if name in protocol.LAYER_TYPES:
                nnz[(a, c)] += count
                if count == 0:
                    empty[(a, c)].append(f"{name} layer {layers[coords[1]]} (chunk {'/'.join(map(str, coords))})")
    progress_arr = zarr.open_array(path, path=protocol.PROGRESS_PATH, mode="r")
    try:
        progress = progress_arr[...]
    except (ValueError, RuntimeError):  # a marker chunk is corrupt: read them one by one below
        progress = None
    n_docs = group["n_docs"][...]
    for a, author in enumerate(authors):
        for c in range(math.ceil(int(n_docs[a]) / cd)):
            try:
                marker = progress[a, c] if progress is not None else progress_arr[a, c]
            except (ValueError, RuntimeError) as e:
                report.problems.append(Problem(
                    kind="marker", where=f"author {author!r} doc-chunk {c}", author_idx=a, doc_chunk=c,
                    message=f"progress marker chunk {protocol.PROGRESS_PATH}/c/{a}/{c}/0 is unreadable: "
                            f"{type(e).__name__}: {e}"))
                bad.add((a, c))
                continue
            done, marked_valid, marked_nnz, _ = (int(x) for x in marker)
            if not done:
                continue
            report.n_markers_checked += 1
            if (a, c) in bad:
                continue
            if marked_valid != n_valid[(a, c)] or marked_nnz != nnz[(a, c)]:
                suspects = f"; chunks storing no value: {', '.join(empty[(a, c)])}" if empty[(a, c)] else ""
                report.problems.append(Problem(
                    kind="marker", where=f"author {author!r} doc-chunk {c}", author_idx=a, doc_chunk=c,
                    message=f"marker says {marked_valid} valid tokens and {marked_nnz} nonzeros, chunks hold "
                            f"{n_valid[(a, c)]} and {nnz[(a, c)]} (a chunk file is missing or was replaced)"
                            + suspects))
                bad.add((a, c))
                continue
            for message in _token_problems(group, a, c, cd, int(n_docs[a])):
                report.problems.append(Problem(kind="chunk", where=f"author {author!r} doc-chunk {c}",
                                               author_idx=a, doc_chunk=c, message=message))
                bad.add((a, c))
    if repair and bad:
        from saestore.lock import RunLock
        from saestore.writer import finalize_run

        with RunLock(path):  # no extraction may run while markers change
            # first say so: a repair killed half-way must not leave a run that claims to be complete
            group = zarr.open_group(path, mode="r+", use_consolidated=False)
            group.attrs[protocol.ATTRS_KEY] = replace(
                attrs, status="failed", failed_authors=sorted({authors[a] for a, _ in bad})).to_json()
            zarr.consolidate_metadata(path)
            writable = zarr.open_array(path, path=protocol.PROGRESS_PATH, mode="r+")
            report.repaired = []
            for a, c in sorted(bad):
                writable[a, c] = np.zeros(len(protocol.PROGRESS_FIELDS), dtype=np.int64)
                report.repaired.append((authors[a], c))
            finalize_run(path)  # status becomes "failed", naming the authors to finish
    return report


def report_json(report: Report) -> dict[str, Any]:
    return {"path": report.path, "ok": report.ok, "n_chunks_checked": report.n_chunks_checked,
            "n_markers_checked": report.n_markers_checked,
            "problems": [p.__dict__ for p in report.problems], "repaired": report.repaired}


def dumps(report: Report) -> str:
    return json.dumps(report_json(report), indent=2)
