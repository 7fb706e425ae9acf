"""``python -m saestore validate RUN [--repair]``: check a run against PROTOCOL.md, chunk by chunk.

Checks: the root attributes (schema, version, layout); every array's presence, dimension names,
data type, chunk shape, fill value and codec chain; every stored chunk's checksum and
decodability; every progress marker against its chunks (valid-token and nonzero counts must
match what the chunks hold, so a missing or replaced chunk file is caught; SAE chunks that store no
value are named as the likely missing ones); and, for every written doc-chunk, the padding rules of
§2.5 on its per-token and per-document chunks (a missing chunk file reads as its fill value, which
breaks them wherever the doc-chunk has tokens). ``--repair`` clears the markers of the shards holding bad doc-chunks,
so rerunning the extraction recomputes exactly those.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from saestore import chunkio, protocol
from saestore.errors import SaestoreError
from saestore.nonzeros import SparseActs, combine_summaries, summarize
from saestore.reader import is_sparse_variable, read_chunk_acts, run_group
from saestore.writer import RunLayout, consolidate, finalize_run, read_layout


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
    n_doc_chunks: int = 0
    """doc-chunks holding at least one document (what a complete run has finished)."""
    n_done: int = 0
    """of those, the finished ones (progress marker set when validate read the markers)."""
    status: str | None = None
    writer: str | None = None
    """'being written by pid … on host …' while a live process holds the run's lock."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def incomplete(self) -> bool:
        return self.n_done < self.n_doc_chunks

    def format(self) -> str:
        lines = [f"validate {self.path}: {self.n_chunks_checked} chunks and {self.n_markers_checked} progress "
                 f"markers checked, {len(self.problems)} problem(s)"]
        if self.incomplete:
            lines.append(f"incomplete: {self.n_done} of {self.n_doc_chunks} doc-chunks done (status {self.status}"
                         + (f", {self.writer}" if self.writer else "") + "); only finished doc-chunks were checked")
        lines += [f"  {p}" for p in self.problems]
        if self.repaired:
            lines.append(f"repaired: cleared {len(self.repaired)} marker(s): "
                         + ", ".join(f"{a!r} doc-chunk {c}" for a, c in self.repaired)
                         + "; run the extraction again (same command, or --resume) to recompute them")
        if not self.ok:
            lines.append("FAILED")
        elif self.incomplete:
            lines.append("INCOMPLETE: what is finished is valid; "
                         + ("the writer is still running" if self.writer else "rerun the extraction to finish it"))
        else:
            lines.append("OK")
        return "\n".join(lines)


def run_specs(group: zarr.Group, attrs: protocol.RunAttrs) -> tuple[protocol.VariableSpec, ...]:
    """The variables this run must hold, from the variable table (its layer types and options)."""
    layer_types = tuple(lt for lt in protocol.LAYER_TYPES if lt in attrs.saes)
    return protocol.run_variables(layer_types, options=protocol.stored_options(group))


def _required(spec: protocol.VariableSpec, version: str) -> bool:
    """Whether a store of protocol ``version`` must hold ``spec`` (variables are added in minor versions)."""
    return _required_since(spec.since, version)


def _required_since(since: str, version: str) -> bool:
    return tuple(map(int, since.split("."))) <= tuple(map(int, version.split(".")))


def _check_array(arr: zarr.Array, spec: protocol.VariableSpec, storage: protocol.StorageInfo) -> list[str]:
    """What breaks the table's rules for ``spec`` in ``arr``'s metadata (PROTOCOL.md §2.2–§2.4)."""
    meta = arr.metadata.to_dict()
    if tuple(meta.get("dimension_names") or ()) != spec.dims:
        return [f"dimension_names {meta.get('dimension_names')} != {list(spec.dims)}"]
    out = []
    want_dtype = spec.data_type(storage)
    if meta["data_type"] != want_dtype:
        out.append(f"data_type {meta['data_type']} != {want_dtype}")
    grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = meta["codecs"]
    want_shard = spec.shard_shape(tuple(arr.shape), storage)
    sharding = codecs[0]["configuration"] if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed" else None
    if sharding is not None:
        chunks, codecs = tuple(sharding["chunk_shape"]), list(sharding["codecs"])
        index = [(c["name"], c.get("configuration", {})) for c in sharding["index_codecs"]]
        if want_shard is not None and grid != want_shard:
            out.append(f"shard shape {grid} breaks the sharding rule (PROTOCOL.md §2.3: {want_shard})")
        if index != [("bytes", {"endian": "little"}), ("crc32c", {})] or sharding.get("index_location", "end") != "end":
            out.append(f"shard index {index} at {sharding.get('index_location')} is not bytes (little) + crc32c at "
                       "the end (PROTOCOL.md §2.3)")
    else:
        chunks = grid
    if (sharding is None) != (want_shard is None):
        out.append("sharded, but PROTOCOL.md §2.3 says unsharded" if want_shard is None else
                   f"not sharded; PROTOCOL.md §2.3 says shards of {want_shard}")
    if chunks != spec.chunk_shape(tuple(arr.shape), storage.chunk_docs):
        out.append(f"chunk shape {chunks} breaks the chunking rule (PROTOCOL.md §2.3)")
    names = [c["name"] for c in codecs]
    want = [name for name, _ in spec.codecs(storage)]
    if names != want:
        out.append(f"codec chain {names} != {want}")
    elif want[0] == "saestore.sparse_coo":
        try:
            protocol.validate_json(codecs[0], "sparse_coo_codec")
        except SaestoreError as e:
            out.append(str(e))
    if meta["fill_value"] != spec.fill_value:
        out.append(f"fill_value {meta['fill_value']} != {spec.fill_value}")
    return out


def _check_layout(group: zarr.Group, attrs: protocol.RunAttrs, where: str) -> list[Problem]:
    problems = []
    options = protocol.stored_options(group)
    for name in protocol.COORDS:
        if name in protocol.OPTIONAL_COORDS and protocol.OPTIONAL_COORDS[name] not in options:
            continue  # an optional coordinate comes with its option's variables (PROTOCOL.md §2.7)
        if name not in group and _required_since(protocol.COORDS_SINCE.get(name, "1.0"), attrs.protocol_version):
            problems.append(Problem(kind="layout", where=name, message="coordinate array is missing"))
    for spec in run_specs(group, attrs):
        try:
            arr = group[spec.name] if spec.name in group else None
        except (ValueError, TypeError, KeyError) as e:  # metadata zarr cannot parse (e.g. a bad codec entry)
            problems.append(Problem(kind="layout", where=spec.name, message=f"unreadable metadata: {e}"))
            continue
        if arr is None:
            if _required(spec, attrs.protocol_version):
                problems.append(Problem(kind="layout", where=spec.name, message="variable is missing"))
            continue
        problems += [Problem(kind="layout", where=spec.name, message=m) for m in _check_array(arr, spec, attrs.storage)]
    if protocol.PROGRESS_PATH not in group:
        problems.append(Problem(kind="layout", where=protocol.PROGRESS_PATH, message="progress array is missing"))
    elif _required_since("1.2", attrs.protocol_version):  # chains and progress layout exact since 1.2
        for name in (*protocol.COORDS, protocol.PROGRESS_PATH):
            if name in group:
                problems += [Problem(kind="layout", where=name, message=m) for m in _check_plain(group, name, attrs)]
    return problems


def _check_plain(group: zarr.Group, name: str, attrs: protocol.RunAttrs) -> list[str]:
    """A coordinate's or the progress array's metadata against §2.1, §3 and §5.1."""
    meta = group[name].metadata.to_dict()
    dtype = "string" if meta["data_type"] == "string" else meta["data_type"]
    names = [c["name"] for c in meta["codecs"]]
    want = [n for n, _ in protocol.plain_codecs(dtype)]
    out = [] if names == want else [f"codec chain {names} != {want}"]
    if name == protocol.PROGRESS_PATH:
        grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        want_grid = (1, attrs.storage.chunks_per_shard, len(protocol.PROGRESS_FIELDS))
        if grid != want_grid:
            out.append(f"chunk shape {grid} != {want_grid} (one chunk per author and shard, PROTOCOL.md §3)")
        if list(meta.get("attributes", {}).get("fields", [])) != list(protocol.PROGRESS_FIELDS):
            out.append(f"attribute 'fields' != {list(protocol.PROGRESS_FIELDS)}")
    elif tuple(meta.get("dimension_names") or ()) != (name,):
        out.append(f"dimension_names {meta.get('dimension_names')} != [{name!r}]")
    return out


def _grid(arr: zarr.Array) -> list[tuple[int, ...]]:
    chunks = arr.chunks
    counts = [math.ceil(s / c) for s, c in zip(arr.shape, chunks, strict=True)]
    return [tuple(int(i) for i in idx) for idx in np.ndindex(*counts)]


def _block(arr: zarr.Array, coords: tuple[int, ...], keep: int | None = None) -> np.ndarray:
    """(Inner) chunk ``coords`` of ``arr``, up to the array edge, as its last ``keep`` axes (all by default)."""
    region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, arr.chunks, arr.shape, strict=True))
    block = np.asarray(arr[region])
    return block if keep is None else block.reshape(block.shape[-keep:])


def _is_fill(values: np.ndarray, spec: protocol.VariableSpec) -> np.ndarray:
    if spec.fill_value == "NaN":
        return np.isnan(values)
    return np.asarray(values == spec.fill_value, dtype=bool)


def _token_problems(group: zarr.Group, specs: Sequence[protocol.VariableSpec], a: int, c: int, cd: int,
                    n_docs: int, n_layers: int) -> list[str]:
    """PROTOCOL.md §2.5 on one written doc-chunk's per-token and per-document chunks: every variable's
    ``at_padding``/``at_missing`` rule from the variable table, plus the rules tying ``valid_mask``,
    ``token``, ``doc_length`` and ``text`` together. A chunk file that is missing reads as its fill
    value, which breaks these rules wherever the doc-chunk has tokens."""
    valid = _block(group["valid_mask"], (a, c, 0), 2).astype(bool)
    exists = np.arange(valid.shape[0]) < n_docs - c * cd
    out = []

    def check(ok: np.ndarray, name: str, rule: str) -> None:
        if not ok.all():
            out.append(f"{name} breaks '{rule}' at {int((~ok).sum())} position(s) (its chunk file may be missing "
                       "or replaced)")

    blocks: dict[str, np.ndarray] = {}
    for spec in specs:
        rule, where, mask = ((spec.at_padding, "padding", valid) if spec.at_padding
                             else (spec.at_missing, "missing documents", exists))
        if rule is None or spec.name not in group:
            continue
        layered = "layer" in spec.dims
        trailing = len(spec.dims) - spec.dims.index("doc")  # doc, then tok and metric if it has them
        for li in range(n_layers) if layered else (None,):
            coords = (a, *(() if li is None else (li,)), c, *(0,) * (trailing - 1))
            values = _block(group[spec.name], coords, trailing)
            blocks.setdefault(spec.name, values)
            fill = _is_fill(values, spec)
            if fill.ndim > mask.ndim:  # per-token metrics: a token is padding-like only if all of them are
                fill = fill.all(axis=tuple(range(mask.ndim, fill.ndim)))
            label = spec.name if li is None else f"{spec.name} (layer position {li})"
            if rule == "exactly":
                check(fill == ~mask, label, f"{spec.fill_value!r} exactly at {where}")
            else:
                check(fill | mask, label, f"{spec.fill_value!r} at {where}")
    token = blocks.get("token", _block(group["token"], (a, c, 0), 2))
    if valid.any() and (token[valid] == "").all():
        out.append("token is empty at every valid token (its chunk file may be missing or replaced)")
    if "char_start" in blocks and "char_end" in blocks:  # §2.7: the token spans tile each document's text
        start, end = blocks["char_start"], blocks["char_end"]
        follows = np.ones_like(valid)
        follows[:, 1:] = ~valid[:, 1:] | (start[:, 1:] == end[:, :-1])
        check(follows & (~valid | (start <= end)), "char_start/char_end", "each span starts where the one before ended")
    doc_length = _block(group["doc_length"], (a, c), 1)
    check(doc_length == valid.sum(axis=-1), "doc_length", "the number of valid tokens")
    empty_text = np.asarray(_block(group["text"], (a, c), 1) == "", dtype=bool)
    check(np.where(exists, ~(empty_text & (doc_length > 0)), empty_text), "text",
          "empty exactly for missing documents")
    return out


@dataclass
class _Stored:
    """What the chunks of each (author, doc-chunk) actually hold, and which doc-chunks are bad."""

    nnz: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    n_valid: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    empty: dict[tuple[int, int], list[str]] = field(default_factory=lambda: defaultdict(list))
    """SAE chunks storing no value (the likely missing files when a marker disagrees)."""
    bad: set[tuple[int, int]] = field(default_factory=set)


def validate_run(path: str | Path, *, repair: bool = False) -> Report:
    """Check a run; with ``repair``, clear the progress markers of every bad doc-chunk."""
    path = str(path)
    report = Report(path=path, problems=[])
    try:
        group = run_group(path, use_consolidated=False)
        attrs = protocol.read_attrs(dict(group.attrs), where=path)
    except SaestoreError as e:  # RunNotFoundError: nothing there, or not a Zarr store
        report.problems.append(Problem(kind="attributes", where=path, message=str(e)))
        return report
    report.problems += _check_layout(group, attrs, path)
    if report.problems:
        return report
    try:
        layout = read_layout(group)
    except (ValueError, RuntimeError, SaestoreError) as e:  # a corrupt coordinate: nothing can be named or redone
        report.problems.append(Problem(kind="layout", where="author, layer, n_docs", message=(
            f"unreadable: {type(e).__name__}: {e}. Re-extraction cannot repair the run's coordinates: "
            "recreate it (extract ... --overwrite)")))
        return report
    from saestore.lock import format_holder, writer_state

    state, holder = writer_state(path)
    report.status = attrs.status
    report.writer = f"being written by {format_holder(holder)}" if state == "live" and holder else None
    specs = [spec for spec in run_specs(group, attrs) if spec.name in group]
    markers = _read_markers(group, layout)  # first: a live writer's later chunks are not checked
    report.n_doc_chunks = len(markers)
    report.n_done = sum(1 for m in markers.values() if not isinstance(m, Exception) and int(m[0]) == 1)
    pending = {key for key, m in markers.items() if isinstance(m, Exception) or int(m[0]) != 1}
    stored = _decode_chunks(group, specs, layout, report, pending)
    _check_markers(group, specs, layout, markers, stored, report)
    if repair and stored.bad:  # a rerun redoes whole shards (PROTOCOL.md §3): clear their markers
        k = layout.chunks_per_shard
        shards = {(a, c // k) for a, c in stored.bad}
        _repair(path, attrs, layout, {(a, c) for a, s in shards for c in layout.shard_chunks(a, s)}, report)
    return report


def _read_markers(group: zarr.Group, layout: RunLayout) -> dict[tuple[int, int], np.ndarray | Exception]:
    """Every doc-chunk's progress marker, read once (a snapshot), or the error reading it."""
    progress_arr = group[protocol.PROGRESS_PATH]
    try:
        progress = progress_arr[...]
    except (ValueError, RuntimeError):  # a marker chunk is corrupt: read them one by one
        progress = None
    out: dict[tuple[int, int], np.ndarray | Exception] = {}
    for dc in layout.doc_chunks():
        a, c = dc.author_idx, dc.chunk_idx
        try:
            out[(a, c)] = progress[a, c] if progress is not None else progress_arr[a, c]
        except (ValueError, RuntimeError) as e:
            out[(a, c)] = e
    return out


def _decode_chunks(group: zarr.Group, specs: Sequence[protocol.VariableSpec], layout: RunLayout,
                   report: Report, pending: set[tuple[int, int]]) -> _Stored:
    """Decode every chunk of every variable, except those of ``pending`` (unfinished) doc-chunks,
    which a live writer may be writing; count what each (author, doc-chunk) holds."""
    stored = _Stored()
    n_marked = layout.n_chunks_max
    for spec in specs:
        arr = group[spec.name]
        sparse_var = spec.is_sae and is_sparse_variable(arr)
        layered = spec.dims[:2] == ("author", "layer")
        for coords in _grid(arr):
            a = coords[0] if spec.dims[0] == "author" else None
            if spec.dims == protocol.SHARD_SUMMARY_DIMS:
                _check_shard_summary(group, spec, coords, layout, pending, stored, report)
                continue
            c = coords[2] if layered else (coords[1] if len(coords) > 1 else None)
            if (a, c) in pending:
                continue
            where = f"{spec.name} chunk {'/'.join(map(str, coords))}"
            if a is not None:
                where += f" (author {layout.authors[a]!r}" + (f", layer {layout.layers[coords[1]]}" if layered else "") \
                         + (f", doc-chunk {c})" if c is not None else ")")
            try:
                if spec.dims == protocol.SUMMARY_DIMS:
                    if mismatch := _summary_problem(group, spec, coords):
                        report.problems.append(Problem(kind="chunk", where=where, message=mismatch,
                                                       author_idx=a, doc_chunk=c))
                        stored.bad.add((a, c))
                        continue
                    count = 0
                elif sparse_var:
                    count = read_chunk_acts(arr, coords).nnz
                else:
                    block = _block(arr, coords)
                    count = int(np.count_nonzero(block)) if spec.is_sae else 0
                    if spec.name == "valid_mask":
                        stored.n_valid[(a, c)] += int(np.count_nonzero(block))
            except Exception as e:
                report.problems.append(Problem(kind="chunk", where=where, message=f"{type(e).__name__}: {e}",
                                               author_idx=a, doc_chunk=c))
                if a is not None and c is not None and c < n_marked:
                    stored.bad.add((a, c))
                continue
            report.n_chunks_checked += 1
            if spec.is_sae:
                stored.nnz[(a, c)] += count
                if count == 0:
                    stored.empty[(a, c)].append(
                        f"{spec.name} layer {layout.layers[coords[1]]} (chunk {'/'.join(map(str, coords))})")
    return stored


def _check_shard_summary(group: zarr.Group, spec: protocol.VariableSpec, coords: tuple[int, ...], layout: RunLayout,
                         pending: set[tuple[int, int]], stored: _Stored, report: Report) -> None:
    """§2.8: a finished shard's stored shard summary against its doc-chunks' summaries combined
    (:func:`~saestore.nonzeros.combine_summaries`; those are checked against the SAE chunks)."""
    a, li, s = coords[:3]
    chunks = list(layout.shard_chunks(a, s))
    if any((a, c) in pending for c in chunks):
        return
    where = f"{spec.name} chunk {'/'.join(map(str, coords))} (author {layout.authors[a]!r}, layer " \
            f"{layout.layers[li]}, shard {s})"
    try:
        have = _block(group[spec.name], coords, 2)
        lt = spec.name[: -len(protocol.shard_summary_name(""))]
        parts = group[protocol.summary_name(lt)][a, li, chunks[0]:chunks[-1] + 1] if chunks else None
        want = np.zeros_like(have) if parts is None else combine_summaries(parts)
        bad = int((~(have == want).all(axis=1)).sum())
        message = None if bad == 0 else (
            f"shard summary differs from its doc-chunks' summaries for {bad} feature(s) (PROTOCOL.md §2.8: "
            "stale or replaced); --repair recomputes the shard")
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
    if message is None:
        report.n_chunks_checked += 1
        return
    report.problems.append(Problem(kind="chunk", where=where, message=message, author_idx=a,
                                   doc_chunk=chunks[0] if chunks else None))
    stored.bad.update((a, c) for c in chunks)


def _summary_problem(group: zarr.Group, spec: protocol.VariableSpec, coords: tuple[int, ...]) -> str | None:
    """§2.8: a doc-chunk's stored summary against the one its decoded SAE chunk and valid mask give."""
    lt = spec.name[: -len(protocol.summary_name(""))]
    a, li, c = coords[:3]
    stored = _block(group[spec.name], coords, 2)
    sae = group[lt]
    if is_sparse_variable(sae):
        acts = read_chunk_acts(sae, (a, li, c, 0, 0))
    else:
        acts = SparseActs.from_dense(_block(sae, (a, li, c, 0, 0), 3))
    valid = _block(group["valid_mask"], (a, c, 0), 2).astype(bool)
    rows = valid.shape[0]
    if acts.n_docs != rows:  # the array edge: the chunk is stored at its nominal shape
        acts = acts.docs(0, rows)
    want = summarize(acts.at_valid(valid))
    if np.array_equal(stored, want):
        return None
    bad = int((~(stored == want).all(axis=1)).sum())
    return (f"summary differs from the decoded {lt} chunk for {bad} feature(s) (PROTOCOL.md §2.8: a chunk file was "
            "replaced or the summary is stale); --repair recomputes the shard")


def _check_markers(group: zarr.Group, specs: Sequence[protocol.VariableSpec], layout: RunLayout,
                   markers: dict[tuple[int, int], np.ndarray | Exception], stored: _Stored, report: Report) -> None:
    """Every set progress marker against what its doc-chunk's chunks hold, then §2.5 on that doc-chunk."""
    cd = layout.storage.chunk_docs
    for (a, c), marker in markers.items():
        where = f"author {layout.authors[a]!r} doc-chunk {c}"
        if isinstance(marker, Exception):
            report.problems.append(Problem(
                kind="marker", where=where, author_idx=a, doc_chunk=c,
                message=f"progress marker chunk {protocol.PROGRESS_PATH}/c/{a}/{c // layout.chunks_per_shard}/0 "
                        f"is unreadable: {type(marker).__name__}: {marker}"))
            stored.bad.add((a, c))
            continue
        done, marked_valid, marked_nnz, _ = (int(x) for x in marker)
        if not done:
            continue
        report.n_markers_checked += 1
        if (a, c) in stored.bad:
            continue
        n_valid, nnz, empty = stored.n_valid[(a, c)], stored.nnz[(a, c)], stored.empty[(a, c)]
        if marked_valid != n_valid or marked_nnz != nnz:
            suspects = f"; chunks storing no value: {', '.join(empty)}" if empty else ""
            report.problems.append(Problem(
                kind="marker", where=where, author_idx=a, doc_chunk=c,
                message=f"marker says {marked_valid} valid tokens and {marked_nnz} nonzeros, chunks hold "
                        f"{n_valid} and {nnz} (a chunk file is missing or was replaced)" + suspects))
            stored.bad.add((a, c))
            continue
        for message in _token_problems(group, specs, a, c, cd, layout.n_docs[a], len(layout.layers)):
            report.problems.append(Problem(kind="chunk", where=where, author_idx=a, doc_chunk=c, message=message))
            stored.bad.add((a, c))


def _repair(path: str, attrs: protocol.RunAttrs, layout: RunLayout, bad: set[tuple[int, int]],
            report: Report) -> None:
    """Clear the markers of the bad doc-chunks, so the next extraction recomputes exactly those."""
    from saestore.lock import RunLock

    with RunLock(path):  # no extraction may run while markers change
        # first say so: a repair killed half-way must not leave a run that claims to be complete
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
        group.attrs[protocol.ATTRS_KEY] = replace(
            attrs, status="failed", failed_authors=sorted({layout.authors[a] for a, _ in bad})).to_json()
        consolidate(path)
        writable = zarr.open_array(path, path=protocol.PROGRESS_PATH, mode="r+")
        k = layout.chunks_per_shard
        for a, s in sorted({(a, c // k) for a, c in bad}):  # one marker chunk per shard: remove it whole
            chunkio.delete_chunk(writable, (a, s, 0))
        report.repaired = [(layout.authors[a], c) for a, c in sorted(bad)]
        finalize_run(path)  # status becomes "failed", naming the authors to finish


def report_json(report: Report) -> dict[str, Any]:
    return {"path": report.path, "ok": report.ok, "n_chunks_checked": report.n_chunks_checked,
            "n_markers_checked": report.n_markers_checked, "status": report.status,
            "n_doc_chunks": report.n_doc_chunks, "n_done": report.n_done, "incomplete": report.incomplete,
            "writer": report.writer,
            "problems": [p.__dict__ for p in report.problems], "repaired": report.repaired}


def dumps(report: Report) -> str:
    return json.dumps(report_json(report), indent=2)
