"""Typed errors. Every error saestore raises for bad input, bad data or a bad store derives from
:class:`SaestoreError`; its message names the thing at fault and what would fix it."""

from __future__ import annotations


class SaestoreError(Exception):
    """Base class of every error saestore raises on purpose."""


class CodecError(SaestoreError):
    """Base class of sparse-codec errors."""


class CodecEncodeError(CodecError, ValueError):
    """An array cannot be encoded faithfully (NaN/inf, value overflow, unsorted or duplicate
    sparse indices, a shape the format cannot represent)."""


class CodecConfigError(CodecError, ValueError):
    """A codec configuration, or an array the codec is asked to serve, that the format does not allow
    (unknown keys or value dtype, a non-float dtype, a fill value other than 0.0)."""


class CorruptChunkError(CodecError, ValueError):
    """Chunk bytes are malformed: truncated, wrong magic, inconsistent header, indices out of
    range or unsorted, or a checksum mismatch. Raised before any large allocation."""


class ProtocolError(SaestoreError):
    """A store does not follow PROTOCOL.md (missing arrays, wrong layout, invalid attributes)."""


class RunNotFoundError(ProtocolError, FileNotFoundError):
    """There is no run at the path: nothing there, or a folder that is not a Zarr store."""


class ProtocolVersionError(ProtocolError):
    """A store was written by a protocol major version this saestore cannot read."""


class ConfigMismatchError(SaestoreError):
    """A run already exists at the path with a different configuration."""


class RunLockedError(SaestoreError):
    """Another live writer holds the run's lock."""


class ExtractionConfigError(SaestoreError, ValueError):
    """An extraction request names a model, layer, layer type, SAE width or dataset column that
    does not exist, or a combination that cannot work."""


class DatasetError(SaestoreError, ValueError):
    """The dataset is missing, empty, lacks a required column or has no usable author."""


class WorkerFailedError(SaestoreError):
    """One or more extraction workers failed; the message names the authors left unfinished."""


class StoreWriteError(SaestoreError):
    """Writing to a run store failed (disk full, permissions, an I/O error). The message names what
    was being written; every doc-chunk whose progress marker is set is intact, so rerunning the same
    command once writes succeed again finishes the run."""


class StatsError(SaestoreError, ValueError):
    """A statistic was asked for something the run does not hold (an unknown author, layer, layer
    type or feature, an empty selection, a bad parameter)."""


class TorchReaderError(SaestoreError, ValueError):
    """A PyTorch reader was asked for something the run does not hold, or for impossible parameters."""


class PlotError(SaestoreError, ValueError):
    """A plot was handed data it cannot draw in one panel (select one SAE, author or feature first)."""


class MissingExtraError(SaestoreError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""


class BenchError(SaestoreError):
    """A benchmark could not run (missing baseline, failed measurement child, impossible workload)."""


class FaultSpecError(SaestoreError, ValueError):
    """``SAESTORE_FAULT`` names an unknown fault point or action, or a bad count or rank."""


class IncompleteRunWarning(UserWarning):
    """A run opened for reading is not complete (status ``running``, ``interrupted`` or ``failed``, PROTOCOL.md §7.1):
    its unfinished doc-chunks read as the fill value or partly written data."""
