# Every target sets up .venv itself, so a fresh clone needs only `make quickstart` or `make test`.
# Torch is installed first with a pin: an open range (torch>=2.6) alone would pull a multi-GB CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install quickstart test test-cuda lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lmstack quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cuda" $(PYTEST_ARGS)

# GPU tests, one pytest process per file (a device-side assert poisons the process's CUDA context)
test-cuda: $(STAMP)
	$(BIN)/python tests/run_cuda.py

lint: $(STAMP)
	$(BIN)/ruff check lmstack tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
