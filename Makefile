# Two commands do all the set-up on a fresh machine (Python 3.11+ and make):
#   make demo   creates .venv, installs megadoc-jax, builds the demo data (once), runs the demo on CPU
#   make test   creates .venv, installs megadoc-jax with the test extras, runs ruff (lint, format check)
#               and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-seqio miniature clean

# The demo data (stores and synthetic stream) is built by the generation stage, once, into
# $MEGADOC_DEMO_DIR (default ~/.cache/megadoc_jax/demo); training only reads it.
demo: $(VENV)/.installed
	$(BIN)/python -m generation demo-data
	$(BIN)/python -m megadoc_jax.train
	$(BIN)/python -m megadoc_jax.evaluate --model runs/demo --store heldout=demo:heldout \
		--store stitched=demo:stitched --benchmarks tests/data/benchmarks --tasks arc_easy,piqa,sciq

# The whole study scaled down (docs/miniature.md): generation, megadocs, baselines, a sweep, evaluation and
# the report, into runs/miniature; rerunning continues where it stopped.
miniature: $(VENV)/.installed
	$(BIN)/python -m megadoc_jax.miniature --work-dir runs/miniature

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# The test extras add libtpu (jax[tpu]), so that tests compile real TPU programs ahead of time on CPU,
# and PyTorch, for the transformers generation backend. torch is pinned to the CPU build 2.13.0 first:
# an unpinned `torch` would pull a multi-GB CUDA build.
$(VENV)/.installed-dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,tpu,torch]"
	touch $@ $(VENV)/.installed

# seqio interop (docs/seqio.md): its own environment, because seqio pulls tensorflow, which the main one
# stays free of. The tests are in tests_seqio/, outside the main suite's testpaths.
SEQIO_VENV ?= .venv-seqio

test-seqio: $(SEQIO_VENV)/.installed
	$(SEQIO_VENV)/bin/python -m pytest -n 1 tests_seqio $(PYTEST_ARGS)

$(SEQIO_VENV)/.installed: pyproject.toml
	test -x $(SEQIO_VENV)/bin/python || $(PYTHON) -m venv $(SEQIO_VENV)
	$(SEQIO_VENV)/bin/python -m pip install -q --upgrade pip
	$(SEQIO_VENV)/bin/python -m pip install -q -e ".[dev,seqio]"
	touch $@

clean:
	rm -rf $(VENV) runs
