# Two commands do all the set-up on a fresh machine (Python 3.11+ and make):
#   make demo   creates .venv, installs megadoc-jax, builds the demo data (once), runs the demo on CPU
#   make test   creates .venv, installs megadoc-jax with the test extras, runs ruff (lint, format check)
#               and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# --durations: the slowest tests in every run, to keep the suite inside its 20 minutes on 2 cores.
PYTEST_ARGS ?= --durations=15

.PHONY: demo test test-py312 test-seqio miniature clean

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

# The suite on Python 3.12 with the newest JAX that pip resolves there (docs/performance.md#python-and-jax-versions),
# in a second environment beside .venv. PYTHON312 is python3.12 when that runs, else pyenv's newest 3.12
# (pyenv's shim answers "command not found" unless 3.12 is an active version), else set it by hand.
# No torch here: PyPI's torch for 3.12 is the multi-GB CUDA build (the CPU build lies only on PyTorch's own
# index), so the torch parity tests skip in this environment; they run on 3.11.
VENV312 ?= .venv-py312
ifeq ($(origin PYTHON312),undefined)
PYTHON312 := $(shell python3.12 -c '' >/dev/null 2>&1 && echo python3.12)
ifeq ($(PYTHON312),)
PYENV312 := $(shell pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$$' | tail -n 1)
PYTHON312 := $(if $(PYENV312),$(shell pyenv root)/versions/$(PYENV312)/bin/python3.12,python3.12)
endif
endif

test-py312: $(VENV312)/.installed-dev
	$(VENV312)/bin/python -m pytest -n 2 $(PYTEST_ARGS)

$(VENV312)/.installed-dev: pyproject.toml
	@$(PYTHON312) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1 || { \
	  echo "make test-py312: PYTHON312=$(PYTHON312) is not a working Python 3.12; install Python 3.12 or" \
	    "name one: make test-py312 PYTHON312=/path/to/python3.12" >&2; exit 2; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -e ".[dev,tpu]"
	touch $@

clean:
	rm -rf $(VENV) $(VENV312) $(SEQIO_VENV) runs
