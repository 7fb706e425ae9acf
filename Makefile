# Two entry points (see README): `make demo` (set up + extract the built-in corpus with the tiny
# model + look at the result) and `make test` (set up + lint + the whole test suite on Python 3.11
# with torch and zarr 3.1, then the torch-free suite on Python 3.13 with the newest zarr).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo/tiny/demo.zarr
# the Python 3.13 leg: pyenv's 3.13 or a working python3.13 on PATH; REQUIRE_PY313=1 (CI) fails when there is none
PYTHON313 ?= $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python3.13 2>/dev/null) $$(command -v python3.13); do $$p -c "import sys" 2>/dev/null && echo $$p && break; done)
VENV313 ?= .venv313
BIN313 := $(VENV313)/bin

.PHONY: setup setup313 demo test lint test311 test313 bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# everything: torch (the CPU wheel), the model stack and the test tools
setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

demo: setup
	$(BIN)/python -m saestore.extract --model tiny --dataset_name demo --layers 1 3 \
		--layer_types res mlp att --sae_features_width 1k --devices cpu:2 --setting baseline \
		--max_seq_len 128 --use_error_term --output_dir runs --run_name demo
	$(BIN)/python -m saestore info $(RUN)
	$(BIN)/python -c "import xarray as xr; print(xr.open_zarr('$(RUN)'))"

test: lint test311 test313

lint: setup
	$(BIN)/ruff check saestore tests scripts examples

test311: setup
	$(BIN)/python -m pytest -q

# the core install (no torch) + test tools, newest zarr/xarray/dask/numcodecs/sparse pip resolves
setup313:
	@set -e; \
	if [ -z "$(PYTHON313)" ]; then \
		if [ -n "$(REQUIRE_PY313)" ]; then echo "no Python 3.13 found (set PYTHON313=...)"; exit 1; fi; \
		echo "no Python 3.13 found: skipping the 3.13 leg (set PYTHON313=... to run it)"; \
	else \
		[ -x $(BIN313)/python ] || $(PYTHON313) -m venv $(VENV313); \
		$(BIN313)/python -c "import sys; assert sys.version_info[:2] == (3, 13), sys.version"; \
		$(BIN313)/pip install -q --upgrade pip; \
		$(BIN313)/pip install -q --upgrade --upgrade-strategy eager -e ".[test]"; \
		if $(BIN313)/python -c "import torch" 2>/dev/null; then echo "the 3.13 leg must not have torch"; exit 1; fi; \
	fi

test313: setup313
	@set -e; \
	if [ -n "$(PYTHON313)" ]; then \
		$(BIN313)/python -c "import sys, zarr; print('Python', sys.version.split()[0], 'zarr', zarr.__version__)"; \
		$(BIN313)/python -m pytest -q -p no:cacheprovider; \
	fi

bench: setup
	$(BIN)/python -m saestore.bench

clean:
	rm -rf runs bench_out .pytest_cache
