"""Benchmarks and the synthetic SAE-like workloads they run on (:mod:`saestore.bench.synthetic`)."""
