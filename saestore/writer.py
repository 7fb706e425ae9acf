"""Writing a run store: one coordinator creates everything, workers fill disjoint chunks.

The protocol (PROTOCOL.md, "Writing") in code:

* :func:`create_run` (coordinator) creates every array, coordinate and attribute, and
  consolidates metadata, before any worker starts;
* :class:`RunWriter` (one per worker process) writes only whole shards of its own authors (a
  shard: ``shard_docs`` documents of one author, PROTOCOL.md §2.3): SAE payloads, then per-token
  and per-document variables, then the progress markers of the shard's doc-chunks; on the sparse
  path it encodes chunk bytes itself from the nonzeros and assembles the shard (byte-identical to
  zarr's sharding pipeline) and never builds a dense chunk;
* :func:`finalize_run` (coordinator) sets the status and consolidates metadata once.

Nothing shared is read-modify-written by workers.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from fsspec.core import url_to_fs
from zarr.registry import get_codec_class

from saestore import chunkio, faults, protocol, sparse_coo
from saestore.errors import ConfigMismatchError, CorruptChunkError, ProtocolError, SaestoreError, StoreWriteError
from saestore.location import is_url
from saestore.nonzeros import SparseActs, combine_summaries, summarize
from saestore.protocol import RunAttrs, StorageInfo

log = logging.getLogger(__name__)

SPARSE_ZSTD_LEVEL, DENSE_ZSTD_LEVEL = protocol.SPARSE_ZSTD_LEVEL, protocol.DENSE_ZSTD_LEVEL
#: a local run is built at ``{path}{CREATING_SUFFIX}`` and renamed to ``{path}`` once complete
CREATING_SUFFIX = ".creating"
#: with ``--overwrite``, the old run is renamed to ``{path}{REPLACED_SUFFIX}`` once its replacement is
#: created, and deleted right after
REPLACED_SUFFIX = ".replaced"


@dataclass(frozen=True, kw_only=True)
class DocChunk:
    """One (author, doc-chunk): the unit of writing, progress and resume."""

    author_idx: int
    chunk_idx: int
    docs: range
    """the author's documents in it (``doc`` positions)."""
    span: range
    """the ``doc`` positions its chunks cover (``docs`` plus missing documents up to the chunk edge)."""


@dataclass(frozen=True, kw_only=True)
class RunLayout:
    """The shape of a run: who, how many documents, which SAEs, how it is chunked."""

    authors: tuple[str, ...]
    n_docs: tuple[int, ...]
    """documents per author (same order as ``authors``)."""
    n_tok: int
    """positions along ``tok`` (max_seq_len - 1: every stored token has a predecessor)."""
    layer_types: tuple[str, ...]
    layers: tuple[int, ...]
    n_features: int
    storage: StorageInfo
    loss_recovered: bool = False
    """whether the per-document loss-recovered variables exist (PROTOCOL.md §2.6)."""
    char_offsets: bool = False
    """whether each token's character span in ``text`` is stored (``char_start``/``char_end``, §2.7)."""
    doc_columns: tuple[str, ...] = ()
    """the source columns stored per document (``doc_meta`` along the ``doc_column`` coordinate, §2.7)."""
    logit_k: int = 0
    """output tokens stored per feature and direction (``T_logit_*`` along ``logit_rank``, §2.7); 0: none."""
    summaries: bool = True
    """whether the per-feature doc-chunk summaries ``T_summary`` exist (PROTOCOL.md §2.8; runs
    written before them have none)."""
    shard_summaries: bool = True
    """whether the shard summaries ``T_shard_summary`` exist with them (§2.8, since 1.3: a 1.2 run
    with summaries has none, and is resumed without them)."""

    def __post_init__(self) -> None:
        if not self.authors:
            raise SaestoreError("a run needs at least one author")
        if len(set(self.authors)) != len(self.authors):
            raise SaestoreError("author names must be unique")
        if len(self.n_docs) != len(self.authors) or min(self.n_docs) < 1:
            raise SaestoreError("every author needs at least one document")
        if self.n_tok < 1 or self.n_features < 1 or self.storage.chunk_docs < 1:
            raise SaestoreError("n_tok, n_features and chunk_docs must be positive")
        sd, cd = self.storage.shard_docs, self.storage.chunk_docs
        if sd is not None and (sd < cd or sd % cd):
            raise SaestoreError(f"shard_docs {sd} is not a multiple of chunk_docs {cd}: pass --shard_docs "
                                f"{max(cd, sd // cd * cd)} or {(sd // cd + 1) * cd}")
        bad = set(self.layer_types) - set(protocol.LAYER_TYPES)
        if bad or not self.layer_types:
            raise SaestoreError(f"layer types must be a non-empty subset of {protocol.LAYER_TYPES}, got {self.layer_types}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise SaestoreError(f"layers must be non-empty and unique, got {self.layers}")
        if len(set(self.doc_columns)) != len(self.doc_columns) or not all(c for c in self.doc_columns):
            raise SaestoreError(f"doc columns must be unique, non-empty names, got {list(self.doc_columns)}")

    @property
    def max_docs(self) -> int:
        return max(self.n_docs)

    def n_chunks(self, author_idx: int) -> int:
        """Doc-chunks holding author ``author_idx``'s documents."""
        return math.ceil(self.n_docs[author_idx] / self.storage.chunk_docs)

    @property
    def n_chunks_max(self) -> int:
        return math.ceil(self.max_docs / self.storage.chunk_docs)

    @property
    def options(self) -> tuple[str, ...]:
        """The extraction options that add variables (the table's ``when``)."""
        on = {"loss_recovered": self.loss_recovered, "char_offsets": self.char_offsets,
              "doc_columns": bool(self.doc_columns), "logit_effects": self.logit_k > 0,
              "summaries": self.summaries}
        return tuple(o for o in protocol.OPTIONS if on[o])

    def variables(self) -> tuple[protocol.VariableSpec, ...]:
        """Every variable of the run, from the variable table (schema/variables.json)."""
        specs = protocol.run_variables(self.layer_types, options=self.options)
        return specs if self.shard_summaries else tuple(v for v in specs if "shard" not in v.dims)

    @property
    def n_shards_max(self) -> int:
        return math.ceil(self.n_chunks_max / self.chunks_per_shard)

    def doc_chunks(self, author_idx: int | None = None) -> Iterator[DocChunk]:
        """Every (author, doc-chunk) holding documents, author by author (or of one author)."""
        authors = range(len(self.authors)) if author_idx is None else (author_idx,)
        for a in authors:
            for c in range(self.n_chunks(a)):
                yield DocChunk(author_idx=a, chunk_idx=c, docs=self.chunk_docs_range(a, c),
                               span=self.chunk_span(c))

    def chunk_span(self, chunk_idx: int) -> range:
        """The documents doc-chunk ``chunk_idx`` covers in every array, up to the array edge (``max_docs``)."""
        cd = self.storage.chunk_docs
        return range(chunk_idx * cd, min((chunk_idx + 1) * cd, self.max_docs))

    def chunk_docs_range(self, author_idx: int, chunk_idx: int) -> range:
        cd = self.storage.chunk_docs
        return range(chunk_idx * cd, min((chunk_idx + 1) * cd, self.n_docs[author_idx]))

    @property
    def chunks_per_shard(self) -> int:
        return self.storage.chunks_per_shard

    def shard_chunks(self, author_idx: int, shard_idx: int) -> range:
        """The doc-chunks of author ``author_idx`` in shard ``shard_idx``: written together, redone together."""
        k = self.chunks_per_shard
        return range(shard_idx * k, min((shard_idx + 1) * k, self.n_chunks(author_idx)))

    def shard_span(self, shard_idx: int) -> range:
        """The documents shard ``shard_idx`` covers in every array, up to the array edge (``max_docs``)."""
        k = self.chunks_per_shard
        return range(self.chunk_span(shard_idx * k).start,
                     self.chunk_span(min((shard_idx + 1) * k, self.n_chunks_max) - 1).stop)


@dataclass(frozen=True, kw_only=True)
class ChunkData:
    """Everything stored for one (author, doc-chunk); arrays cover the chunk's D real documents."""

    token_id_DT: np.ndarray
    token_DT: np.ndarray
    valid_DT: np.ndarray
    ce_loss_DT: np.ndarray
    entropy_DT: np.ndarray
    text_D: Sequence[str]
    doc_id_D: np.ndarray
    doc_length_D: np.ndarray
    n_truncated_D: np.ndarray
    acts: Mapping[tuple[str, int], SparseActs | np.ndarray]
    """(layer type, layer) → nonzeros, or a dense (D, T, F) array."""
    per_sae: Mapping[tuple[str, int], np.ndarray] = field(default_factory=dict)
    """(variable, layer) → (D, T) or (D,) values of a variable with a ``layer`` dim (§2.6)."""
    per_doc: Mapping[str, np.ndarray] = field(default_factory=dict)
    """variable → (D, T) or (D,) values of any other variable without a ``layer`` dim (§2.6: ``ce_clean``).
    A new per-token or per-document variable of the table needs nothing but its values here."""

    def variables(self) -> dict[str, np.ndarray]:
        """variable → values of every variable without a ``layer`` dim (named fields, then ``per_doc``)."""
        return {"valid_mask": self.valid_DT, "token_id": self.token_id_DT, "token": self.token_DT,
                "ce_loss": self.ce_loss_DT, "entropy": self.entropy_DT,
                "text": np.asarray(self.text_D, dtype=object), "doc_id": self.doc_id_D,
                "doc_length": self.doc_length_D, "n_truncated": self.n_truncated_D, **self.per_doc}


def zarr_codecs(chain: Sequence[protocol.Codec]) -> dict[str, Any]:
    """A codec chain of the variable table as ``create_array``'s ``serializer`` and ``compressors``."""
    serializer, *compressors = (get_codec_class(name).from_dict({"name": name, "configuration": config})
                                for name, config in chain)
    return {"serializer": serializer, "compressors": compressors}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def consolidate(path: str) -> None:
    """Consolidate the run's metadata (PROTOCOL.md §2), which the protocol requires: zarr's warning
    that consolidated metadata is not part of the Zarr v3 specification is not news to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(path)


def run_exists(path: str) -> bool:
    """Whether something is at a run's path (a local folder, or objects under a URL)."""
    if is_url(path):
        fs, root = url_to_fs(path)
        return bool(fs.exists(root))
    return Path(path).exists()


def _half_made(path: str, layout: RunLayout) -> bool:
    """A store under a URL that holds nothing but this layout's arrays and no root ``saestore``
    attribute: creation writes the root attributes last, so a run that has them was created
    completely, and anything holding other nodes is not ours to remove."""
    try:
        group = zarr.open_group(path, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False  # objects but no group: not a store saestore started, leave it (reopen names it)
    ours = {*protocol.COORDS, protocol.PROGRESS_PATH.split("/")[0],
            *(spec.name for spec in layout.variables())}
    return protocol.ATTRS_KEY not in group.attrs and set(group.keys()) <= ours


def _remove(path: str) -> None:
    if is_url(path):
        fs, root = url_to_fs(path)
        fs.rm(root, recursive=True)
    else:
        shutil.rmtree(path)


def create_run(
    path: str | Path,
    layout: RunLayout,
    attrs: RunAttrs,
    *,
    mode: str = "auto",
) -> RunAttrs:
    """Create (or reopen for resume) the run store at ``path``; coordinator only.

    ``mode``: ``auto`` creates a new run or resumes one with the same config hash; ``resume``
    requires an existing run with the same config; ``overwrite`` replaces whatever is at ``path``
    (a local one only once the new run is created, so a failed creation leaves it untouched).
    An OS error while creating (disk full, read-only) is a :class:`StoreWriteError`, and nothing is left.
    A run with a different configuration is refused with :class:`ConfigMismatchError`.
    Returns the attributes now in the store.
    """
    path = str(path)
    if mode not in ("auto", "resume", "overwrite"):
        raise SaestoreError(f"mode must be auto, resume or overwrite, not {mode!r}")
    replacing = False
    if run_exists(path) and is_url(path) and _half_made(path, layout):
        # a URL has no atomic rename: a creation killed before its root attributes left this (the
        # caller holds the lease, so its creator is gone); remove it and create the run anew
        log.warning("removing %s, left by a creation that was interrupted", path)
        _remove(path)
    if run_exists(path):
        if mode != "overwrite":
            return _reopen(path, layout, attrs)
        if is_url(path):  # an object store has no rename: the old run goes first
            log.warning("overwriting %s", path)
            _remove(path)
        else:
            replacing = True
    elif mode == "resume":
        raise SaestoreError(f"--resume: no run at {path}; drop --resume to start it")
    # A local store is built next to its path and renamed into place when complete, so a process
    # killed while creating it leaves no half-made run at `path` (which a rerun could not resume),
    # and an overwritten run stays whole until its replacement exists.
    # The caller holds the run lock, so a leftover build folder is a dead process's: remove it.
    final_path, local = path, not is_url(path)
    if local:
        path = path.rstrip("/") + CREATING_SUFFIX
        if Path(path).exists():
            log.warning("removing %s, left by a creation that was interrupted", path)
            shutil.rmtree(path)

    try:
        return _create(path, final_path, layout, attrs, local=local, replacing=replacing)
    except BaseException as e:  # disk full, read-only, Ctrl-C: nothing is left, an overwritten run is untouched
        if local and Path(path).exists():
            shutil.rmtree(path, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        raise StoreWriteError(
            f"creating {final_path} failed: {type(e).__name__}: {e}. Nothing was written"
            + (" and the existing run is untouched" if replacing else "")
            + "; free space or choose a writable --output_dir, then rerun") from e


def _create(path: str, final_path: str, layout: RunLayout, attrs: RunAttrs, *, local: bool,
            replacing: bool) -> RunAttrs:
    """Build the run at ``path`` and, for a local run, rename it to ``final_path``."""
    # "w-" refuses a path with data; a URL reaches here only once nothing is there (checked above,
    # under the lease), and zarr's own fsspec instance may still list what was just removed
    group = zarr.open_group(path, mode="w-" if local else "w", zarr_format=3)
    cd = layout.storage.chunk_docs
    A, L, D, T, F = len(layout.authors), len(layout.layers), layout.max_docs, layout.n_tok, layout.n_features

    def coord(name: str, values: np.ndarray, dtype: Any) -> None:
        codecs = zarr_codecs(protocol.plain_codecs("string" if dtype is str else dtype))
        arr = group.create_array(name, shape=values.shape, dtype=dtype, chunks=values.shape, **codecs,
                                 dimension_names=[name], fill_value=None if dtype is str else 0)
        arr[...] = values
        faults.point("create_array")

    coord("author", np.array(layout.authors, dtype=object), str)
    coord("layer", np.array(layout.layers, dtype=np.int64), "int64")
    coord("doc", np.arange(D, dtype=np.int64), "int64")
    coord("tok", np.arange(T, dtype=np.int64), "int64")
    coord("feature", np.arange(F, dtype=np.int64), "int64")
    coord("metric", np.array(list(protocol.QUALITY_METRICS), dtype=object), str)
    if layout.doc_columns:  # an optional coordinate (PROTOCOL.md §2.7): column names are values, never paths
        coord("doc_column", np.array(layout.doc_columns, dtype=object), str)
    if layout.logit_k:
        coord("logit_rank", logit_ranks(layout.logit_k), "int64")
    if layout.summaries:
        coord("summary", np.array(list(protocol.SUMMARY_FIELDS), dtype=object), str)

    sizes = {"author": A, "layer": L, "doc": D, "tok": T, "feature": F, "metric": len(protocol.QUALITY_METRICS),
             "doc_column": len(layout.doc_columns), "logit_rank": 2 * layout.logit_k,
             "doc_chunk": layout.n_chunks_max, "shard": layout.n_shards_max, "summary": len(protocol.SUMMARY_FIELDS)}
    for spec in layout.variables():
        shape = tuple(sizes[d] for d in spec.dims)
        dtype = spec.data_type(layout.storage)
        group.create_array(spec.name, shape=shape, chunks=spec.chunk_shape(shape, cd),
                           shards=spec.shard_shape(shape, layout.storage),
                           dtype=str if dtype == "string" else dtype, fill_value=spec.zarr_fill_value,
                           dimension_names=list(spec.dims), attributes={"long_name": spec.meaning},
                           **zarr_codecs(spec.codecs(layout.storage)))
        faults.point("create_array")
    group["n_docs"][...] = np.array(layout.n_docs, dtype=np.int32)
    progress = zarr.open_group(path, mode="a", path=protocol.PROGRESS_PATH.rsplit("/", 1)[0])
    progress.create_array(protocol.PROGRESS_PATH.rsplit("/", 1)[1], shape=(A, layout.n_chunks_max, len(protocol.PROGRESS_FIELDS)),
                          chunks=(1, layout.chunks_per_shard, len(protocol.PROGRESS_FIELDS)), dtype="int64", fill_value=0,
                          dimension_names=["author", "doc_chunk", "field"], **zarr_codecs(protocol.plain_codecs("int64")),
                          attributes={"fields": list(protocol.PROGRESS_FIELDS)})
    attrs = replace(attrs, status="running", created_at=_now(), finalized_at=None,
                    library_versions=protocol.library_versions(), run_id=uuid.uuid4().hex)
    protocol.validate_json(attrs.to_json(), "run_attributes")
    faults.point("create_array")
    group.attrs[protocol.ATTRS_KEY] = attrs.to_json()
    consolidate(path)
    if local:
        if replacing:  # the old run is set aside, the new one put in its place, then the old one deleted
            aside = final_path.rstrip("/") + REPLACED_SUFFIX
            if Path(aside).exists():
                shutil.rmtree(aside)
            log.warning("overwriting %s", final_path)
            os.rename(final_path, aside)
            os.rename(path, final_path)
            shutil.rmtree(aside)
        else:
            os.rename(path, final_path)  # atomic: the run appears complete or not at all
    return attrs


def existing_run(path: str | Path, layout: RunLayout, attrs: RunAttrs) -> RunAttrs | None:
    """The attributes of the run at ``path`` if there is one with this configuration and layout (None
    if nothing is there); refuses another configuration or layout as a resume would. Reads only."""
    path = str(path)
    if not run_exists(path) or (is_url(path) and _half_made(path, layout)):  # create_run redoes a half-made one
        return None
    return _check_existing(path, layout, attrs)


def is_finalized(path: str | Path) -> bool:
    """Whether the run's metadata is consolidated (finalizing ends with it; a writer killed between
    writing the final attributes and consolidating left a run to finalize again)."""
    try:
        zarr.open_group(str(path), mode="r", use_consolidated=True)
    except (ValueError, FileNotFoundError, KeyError):
        return False
    return True


def _check_existing(path: str, layout: RunLayout, attrs: RunAttrs) -> RunAttrs:
    try:
        group = zarr.open_group(path, mode="r", use_consolidated=False)
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as e:
        raise ProtocolError(
            f"{path} exists but is not a saestore run ({e}); choose another --run_name or pass --overwrite"
        ) from e
    old = protocol.read_attrs(dict(group.attrs), where=path)
    if old.config_hash != attrs.config_hash:
        changed = sorted(k for k in set(old.config) | set(attrs.config) if old.config.get(k) != attrs.config.get(k))
        raise ConfigMismatchError(
            f"{path} holds a run with a different configuration (differs in: {', '.join(changed)}); "
            "rerun with the same arguments to resume, choose another --run_name, or pass --overwrite"
        )
    try:
        stored = read_layout(group)
    except (ValueError, TypeError, KeyError) as e:  # array metadata that zarr or a codec refuses
        raise ProtocolError(f"{path} has array metadata saestore cannot read ({e}); pass --overwrite to recreate "
                            "the run") from e
    # a 1.2 run created before token offsets or (shard) summaries were stored is resumed as it is (without them)
    if stored != replace(layout, char_offsets=stored.char_offsets, summaries=stored.summaries,
                         shard_summaries=stored.shard_summaries):
        raise ConfigMismatchError(
            f"{path} has the same configuration but another layout (the dataset changed?); pass --overwrite"
        )
    return old


def _reopen(path: str, layout: RunLayout, attrs: RunAttrs) -> RunAttrs:
    old = _check_existing(path, layout, attrs)
    new = replace(old, status="running", finalized_at=None, failed_authors=[],
                  run_id=old.run_id or uuid.uuid4().hex)  # a store created before run ids gets one
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    group.attrs[protocol.ATTRS_KEY] = new.to_json()
    faults.point("reopen")
    consolidate(path)
    log.info("resuming %s", path)
    return new


def read_layout(group: zarr.Group) -> RunLayout:
    """Rebuild the layout from a run group (coordinates, ``n_docs`` and attributes)."""
    attrs = protocol.read_attrs(dict(group.attrs))
    layer_types = tuple(lt for lt in protocol.LAYER_TYPES if lt in group)
    return RunLayout(
        authors=tuple(str(a) for a in group["author"][...]),
        n_docs=tuple(int(n) for n in group["n_docs"][...]),
        n_tok=int(group["tok"].shape[0]),
        layer_types=layer_types,
        layers=tuple(int(x) for x in group["layer"][...]),
        n_features=int(group["feature"].shape[0]),
        storage=attrs.storage,
        **_stored_options(group),
    )


def _stored_options(group: zarr.Group) -> dict[str, Any]:
    """The RunLayout fields of the extraction options a group holds (PROTOCOL.md §2.7)."""
    options = protocol.stored_options(group)
    return {"loss_recovered": "loss_recovered" in options, "char_offsets": "char_offsets" in options,
            "doc_columns": tuple(str(c) for c in group["doc_column"][...]) if "doc_columns" in options else (),
            "logit_k": int(group["logit_rank"].shape[0]) // 2 if "logit_effects" in options else 0,
            "summaries": "summaries" in options,
            # with summaries: whether the 1.3 shard summaries are there too (without: as a new layout says)
            "shard_summaries": "summaries" not in options
            or any(protocol.shard_summary_name(lt) in group for lt in protocol.LAYER_TYPES)}


def logit_ranks(k: int) -> np.ndarray:
    """The ``logit_rank`` coordinate (PROTOCOL.md §2.7): ``1 … k`` (largest first), then ``-1 … -k``
    (smallest first)."""
    return np.concatenate([np.arange(1, k + 1), -np.arange(1, k + 1)]).astype(np.int64)


def read_progress(path: str | Path) -> np.ndarray:
    """The progress markers as an int64 array (author, doc_chunk, field)."""
    arr = zarr.open_array(str(path), path=protocol.PROGRESS_PATH, mode="r")
    return _read_markers(arr, ..., str(path))


def _read_markers(arr: zarr.Array, selection: Any, path: str) -> np.ndarray:
    try:
        return arr[selection]
    except (ValueError, RuntimeError) as e:  # crc32c or zstd refused a marker chunk
        raise CorruptChunkError(
            f"progress markers of {path} are unreadable ({e}); run `python -m saestore validate {path} --repair`, "
            "then the extraction again") from e


def finalize_run(path: str | Path, *, failed_authors: Sequence[str] = (), interrupted: bool = False) -> RunAttrs:
    """Coordinator: set ``status`` from the progress markers and consolidate metadata once: ``complete``
    when every doc-chunk is done, else ``interrupted`` (a signal stopped the run) or ``failed``."""
    path = str(path)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    layout = read_layout(group)
    done = read_progress(path)[..., 0] == 1
    incomplete = [a for i, a in enumerate(layout.authors) if not done[i, : layout.n_chunks(i)].all()]
    failed = sorted(set(failed_authors) | set(incomplete))
    attrs = protocol.read_attrs(dict(group.attrs), where=path)
    status = "complete" if not failed else "interrupted" if interrupted else "failed"
    attrs = replace(attrs, status=status, finalized_at=_now(), failed_authors=failed)
    group.attrs[protocol.ATTRS_KEY] = attrs.to_json()
    faults.point("finalize_attrs")
    consolidate(path)
    return attrs


@dataclass
class _OpenShard:
    """The doc-chunks of one (author, shard) received so far, held until the shard's last one."""

    author_idx: int
    shard_idx: int
    sae: dict[tuple[str, int], dict[int, bytes]] = field(default_factory=dict)
    """(layer type, layer) → inner-chunk position → serializer bytes (absent: no value stored)."""
    values: dict[tuple[str, int | None], dict[int, np.ndarray]] = field(default_factory=dict)
    """(variable, layer or None) → doc-chunk → its documents' values."""
    markers: dict[int, tuple[int, int]] = field(default_factory=dict)
    """doc-chunk → (valid tokens, nonzeros) for its progress marker."""


class RunWriter:
    """A worker's handle on a run: writes whole shards of its authors' doc-chunks, then their markers.

    :meth:`write_chunk` takes one (author, doc-chunk) at a time, in order; SAE chunks are encoded at
    once (only their bytes are held), and when the last doc-chunk of a shard arrives the whole shard
    of every variable is stored, then the markers of all its doc-chunks in one write (PROTOCOL.md §3,
    §6). Host memory therefore holds at most one shard's encoded SAE chunks and per-token values.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.group = zarr.open_group(self.path, mode="r+", use_consolidated=False)
        self.layout = read_layout(self.group)
        self.arrays = {spec.name: self.group[spec.name] for spec in self.layout.variables()}
        self.progress = zarr.open_array(self.path, path=protocol.PROGRESS_PATH, mode="r+")
        self._open: _OpenShard | None = None

    def done_chunks(self, author_idx: int) -> set[int]:
        """Doc-chunks of this author whose progress marker is set and whose whole shard is done (a
        shard is redone whole: PROTOCOL.md §3)."""
        marks = _read_markers(self.progress, (author_idx, slice(None), 0), self.path)
        done = {int(c) for c in np.flatnonzero(marks == 1)}
        n_shards = math.ceil(self.layout.n_chunks(author_idx) / self.layout.chunks_per_shard)
        return {c for s in range(n_shards) for chunks in [self.layout.shard_chunks(author_idx, s)]
                if all(x in done for x in chunks) for c in chunks}

    def write_chunk(self, author_idx: int, chunk_idx: int, data: ChunkData) -> None:
        """Take one (author, doc-chunk); store its shard when it is the shard's last doc-chunk.

        The doc-chunks of a shard must arrive in order; one of another shard drops the doc-chunks held
        for an unfinished shard (they have no marker and are redone by a rerun). A failing write (disk
        full, I/O error) raises :class:`StoreWriteError` naming the payload; that shard is left without
        markers, and every doc-chunk with a marker is untouched.
        """
        layout = self.layout
        docs = layout.chunk_docs_range(author_idx, chunk_idx)
        n_d, n_t = len(docs), layout.n_tok
        if n_d == 0:
            raise SaestoreError(f"chunk {chunk_idx} of author {layout.authors[author_idx]!r} has no documents")
        if data.valid_DT.shape != (n_d, n_t):
            raise SaestoreError(f"chunk data covers {data.valid_DT.shape}, expected {(n_d, n_t)}")
        given = data.variables()
        unknown = sorted({*given, *(name for name, _ in data.per_sae)} - set(self.arrays))
        if unknown:
            raise SaestoreError(f"{', '.join(unknown)}: not a variable of this run (PROTOCOL.md §2.2, §2.6)")
        k = layout.chunks_per_shard
        shard_idx, pos = divmod(chunk_idx, k)
        shard = self._open
        expected = layout.shard_chunks(author_idx, shard_idx)[0] if shard is None or \
            (shard.author_idx, shard.shard_idx) != (author_idx, shard_idx) else max(shard.markers) + 1
        if chunk_idx != expected:
            raise SaestoreError(f"doc-chunk {chunk_idx} of author {layout.authors[author_idx]!r} arrived out of order: "
                                f"the doc-chunks of a shard are written in order, from {expected}")
        if shard is None or (shard.author_idx, shard.shard_idx) != (author_idx, shard_idx):
            if shard is not None:
                log.debug("dropping the unfinished shard %d of author %r", shard.shard_idx,
                          layout.authors[shard.author_idx])
            shard = self._open = _OpenShard(author_idx=author_idx, shard_idx=shard_idx)
        nnz = 0
        for (lt, layer), acts in data.acts.items():
            raw, count = self._sae_bytes(acts)
            nnz += count
            chunks = shard.sae.setdefault((lt, layer), {})
            if raw is not None:
                chunks[pos] = raw
            if layout.summaries:  # §2.8: from the values as stored, at valid tokens, before the marker
                shard.values.setdefault((protocol.summary_name(lt), layer), {})[chunk_idx] = \
                    self._summary(acts, data.valid_DT)[None]
        for spec in layout.variables():
            if not spec.is_sae:
                for layer, values in self._values_of(spec, given, data):
                    shard.values.setdefault((spec.name, layer), {})[chunk_idx] = values
        shard.markers[chunk_idx] = (int(np.count_nonzero(data.valid_DT)), nnz)
        if chunk_idx == layout.shard_chunks(author_idx, shard_idx)[-1]:
            self._open = None
            self._store_shard(shard)

    def needs_logit_effects(self, layer_type: str) -> bool:
        """Whether this run stores logit effects and those of ``layer_type``'s SAEs are not all written."""
        name = f"{layer_type}_logit_token_id"
        if not self.layout.logit_k or name not in self.arrays:
            return False
        return bool((self.arrays[name][...] == -1).any())

    def write_logit_effects(self, layer_type: str, token_id_LFK: np.ndarray, token_LFK: np.ndarray,
                            value_LFK: np.ndarray) -> None:
        """Store the logit effects ``(layer, feature, logit_rank)`` of every SAE of ``layer_type`` (§2.7), each
        variable whole (one chunk, one write: no read-modify-write), values before ids: ids that are
        written mean the rest is. Every worker computes the same ones, so a second write changes nothing."""
        for suffix, values in (("token", token_LFK), ("value", value_LFK), ("token_id", token_id_LFK)):
            self._guarded(f"{layer_type}_logit_{suffix}", 0, "(no doc-chunk)",
                          partial(self.arrays[f"{layer_type}_logit_{suffix}"].__setitem__, Ellipsis, values))

    def _sae_bytes(self, acts: SparseActs | np.ndarray) -> tuple[bytes | None, int]:
        """The serializer bytes of one SAE chunk (None: no value, the chunk is absent) and its nonzeros."""
        cd, n_t, n_f = self.layout.storage.chunk_docs, self.layout.n_tok, self.layout.n_features
        if acts.shape[1:] != (n_t, n_f) or acts.shape[0] > cd:
            raise StoreWriteError(f"nonzeros of shape {acts.shape} do not fit a ({cd}, {n_t}, {n_f}) chunk")
        if self.layout.storage.format == "sparse":
            if not isinstance(acts, SparseActs):
                acts = SparseActs.from_dense(np.asarray(acts))
            raw = sparse_coo.encode_rows(cd * n_t, n_f, acts.rows, acts.cols, acts.values,
                                         self.layout.storage.value_dtype)
            stored = sparse_coo.read_header(raw).nnz  # after rounding to value_dtype (underflow drops values)
            # like zarr with write_empty_chunks=False: a chunk storing no value is absent
            return (raw if stored else None), stored
        if isinstance(acts, SparseActs):
            acts = acts.to_dense()
        dtype = np.dtype(self.layout.storage.value_dtype).newbyteorder("<")
        full = np.zeros((cd, n_t, n_f), dtype=dtype)
        full[: acts.shape[0]] = acts
        count = int(np.count_nonzero(full))
        return (full.tobytes() if count else None), count

    def _summary(self, acts: SparseActs | np.ndarray, valid_DT: np.ndarray) -> np.ndarray:
        """The §2.8 summary ``(F, len(SUMMARY_FIELDS))`` of one SAE chunk: of its values as stored
        (rounded to ``value_dtype``) at valid tokens."""
        if not isinstance(acts, SparseActs):
            acts = SparseActs.from_dense(np.asarray(acts))
        acts = acts.at_valid(valid_DT)
        _, readback = sparse_coo.quantize(acts.values, self.layout.storage.value_dtype)
        acts = replace(acts, values=readback).where(readback != 0)
        return summarize(acts)

    def _store_shard(self, shard: _OpenShard) -> None:
        """Every payload of one (author, shard), then the markers of its doc-chunks (PROTOCOL.md §3)."""
        layout = self.layout
        a, s, k = shard.author_idx, shard.shard_idx, layout.chunks_per_shard
        chunks = layout.shard_chunks(a, s)
        span = layout.shard_span(s)
        what = f"doc-chunks {chunks[0]}–{chunks[-1]}" if len(chunks) > 1 else f"doc-chunk {chunks[0]}"
        for (lt, layer), inner in shard.sae.items():
            arr, li = self.arrays[lt], layout.layers.index(layer)
            if layout.storage.shard_docs is None:  # a 1.1 store: one chunk, stored alone
                write = (partial(chunkio.write_chunk, arr, (a, li, s, 0, 0), inner[0]) if inner
                         else partial(chunkio.delete_chunk, arr, (a, li, s, 0, 0)))
            else:
                write = partial(chunkio.write_shard, arr, (a, li, s, 0, 0), inner)
            self._guarded(f"{lt} layer {layer}", a, what, write)
            faults.point("payload")
        # every other variable is written over the whole shard up to the array edge (no partial writes)
        for spec in layout.variables():
            if "shard" in spec.dims:  # §2.8: the shard's doc-chunk summaries combined, one chunk
                lt = next(t for t in layout.layer_types if protocol.shard_summary_name(t) == spec.name)
                for (name, layer), by_chunk in shard.values.items():
                    if name == protocol.summary_name(lt):
                        rolled = combine_summaries(np.concatenate([by_chunk[c] for c in sorted(by_chunk)]))
                        self._guarded(f"{spec.name} layer {layer}", a, what, partial(
                            self.arrays[spec.name].__setitem__, (a, layout.layers.index(layer), s), rolled))
                        faults.point("payload")
                continue
            for (name, layer), by_chunk in shard.values.items():
                if name != spec.name:
                    continue
                arr = self.arrays[name]
                index = (a,) if layer is None else (a, layout.layers.index(layer))
                # along doc: the shard's documents; along doc_chunk (§2.8 summaries): its doc-chunks
                by_doc = "doc" in spec.dims
                region = span if by_doc else range(s * k, min((s + 1) * k, layout.n_chunks_max))
                full = np.full((len(region), *arr.shape[len(index) + 1:]), spec.zarr_fill_value,
                               dtype=object if spec.dtype == "string" else spec.dtype)
                for c, values in by_chunk.items():
                    start = (c * layout.storage.chunk_docs if by_doc else c) - region.start
                    full[start : start + len(values)] = values
                label = name if layer is None else f"{name} layer {layer}"
                if layout.storage.shard_docs is not None:
                    # zarr writes into a sharded array by merging into the stored shard (reading it back,
                    # damaged or not); remove it first, so that the shard is written whole
                    key = (*index, s, *(0,) * (arr.ndim - len(index) - 1))
                    self._guarded(label, a, what, partial(chunkio.delete_chunk, arr, key))
                self._guarded(label, a, what, partial(arr.__setitem__, (*index, slice(region.start, region.stop)), full))
                faults.point("payload")
        faults.point("before_marker")
        first = s * k
        markers = np.zeros((min(first + k, layout.n_chunks_max) - first, len(protocol.PROGRESS_FIELDS)), np.int64)
        now = time.time_ns()
        for c, (n_valid, nnz) in shard.markers.items():
            markers[c - first] = (1, n_valid, nnz, now)
        if len(markers) < k:  # the edge chunk: write it whole too (zarr would merge into the stored one)
            self._guarded("progress markers", a, what, partial(chunkio.delete_chunk, self.progress, (a, s, 0)))
        self._guarded("progress markers", a, what,
                      partial(self.progress.__setitem__, (a, slice(first, first + len(markers))), markers))
        faults.point("after_marker")

    @staticmethod
    def _values_of(spec: protocol.VariableSpec, given: Mapping[str, np.ndarray],
                   data: ChunkData) -> list[tuple[int | None, np.ndarray]]:
        """(layer or None, values) of ``spec`` in ``data``; variables the table always stores must be given."""
        if "doc" not in spec.dims:  # per-author variables (n_docs) are written once, by create_run
            return []
        if "layer" in spec.dims:
            return [(layer, values) for (name, layer), values in data.per_sae.items() if name == spec.name]
        if spec.name in given:
            return [(None, given[spec.name])]
        raise SaestoreError(f"chunk data lacks {spec.name}, which this run stores" +
                            ("" if spec.when is None else f" (its option {spec.when!r} is on)"))

    def _guarded(self, what: str, author_idx: int, chunks: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as e:
            raise StoreWriteError(
                f"writing {what} of author {self.layout.authors[author_idx]!r} {chunks} to {self.path} "
                f"failed: {e} (every doc-chunk with a progress marker is intact)"
            ) from e
