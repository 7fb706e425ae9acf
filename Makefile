# Two entry points (see README): `make demo` (set up + extract the built-in corpus with the tiny
# model + look at the result) and `make test` (set up + run the whole test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo/tiny/demo.zarr

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

demo: setup
	$(BIN)/python -m saestore.extract --model tiny --dataset_name demo --layers 1 3 \
		--layer_types res mlp att --sae_features_width 1k --devices cpu:2 --setting baseline \
		--max_seq_len 128 --use_error_term --output_dir runs --run_name demo
	$(BIN)/python -m saestore info $(RUN)
	$(BIN)/python -c "import xarray as xr; print(xr.open_zarr('$(RUN)'))"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m saestore.bench

clean:
	rm -rf runs bench_out .pytest_cache
