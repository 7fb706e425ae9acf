"""Benchmarks (``python -m saestore.bench``) and the synthetic SAE-like workloads they run on.

One module per concern: :mod:`~saestore.bench.synthetic` (the generator), :mod:`~saestore.bench.workloads`
(runs and one-SAE slices), :mod:`~saestore.bench.seed` (the seed's format, the package's one pickle),
:mod:`~saestore.bench.baselines` (the seed's files of a slice, a delphi-style cache),
one module per section (:mod:`~saestore.bench.sizes`, :mod:`~saestore.bench.write`,
:mod:`~saestore.bench.stats_speed`, :mod:`~saestore.bench.access`, :mod:`~saestore.bench.extraction`,
:mod:`~saestore.bench.pipeline`),
:mod:`~saestore.bench.codec_bytes` (the codec chain alone on one chunk, ``--codec``),
:mod:`~saestore.bench.gpu` (device speed on random Gemma-2-2b weights, ``--gpu``),
:mod:`~saestore.bench.child` (measured subprocesses), :mod:`~saestore.bench.run` (the driver) and
:mod:`~saestore.bench.report` (targets, machine, markdown). BENCHMARKS.md holds the last full run.
"""
