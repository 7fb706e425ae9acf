"""What the test modules share: :mod:`~tests.helpers.needs` (what a test needs beyond the core
install, and the skips) and :mod:`~tests.helpers.stats_run` (the small synthetic statistics run and
the dense reference it was drawn from). Root attributes of synthetic runs and SAE-like data come
from the package itself (:func:`saestore.bench.workloads.synthetic_attrs`, :mod:`saestore.bench.synthetic`)."""
