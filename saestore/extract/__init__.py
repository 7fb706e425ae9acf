"""Extraction: run a model with SAEs over an author-labelled corpus into a run store."""

import time

#: when this package was first imported (``time.perf_counter()``): for ``python -m saestore.extract``,
#: the start of the command (all but the interpreter's own start-up), from which its wall time and
#: its start-up to the first batch are counted
STARTED = time.perf_counter()
