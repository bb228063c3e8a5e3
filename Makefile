# `make demo` runs the pipeline on the built-in phantom (stage B by flow matching, which scores better than
# the paper's GAN at the demo budget: README, BENCHMARKS.md), `make test` the test suite, `make test-slow` the
# whole-pipeline tests. Each creates (or reuses) the local virtual environment .venv and installs the
# project into it at the versions pinned in requirements/constraints.txt (pyproject.toml has the floors).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
DEMO_DIR ?= runs/demo
DATA_DIR ?= $(CURDIR)/data

.PHONY: setup demo test test-slow lint bench clean-demo

# The install goes through uv (pinned in the constraints, brought into the venv by pip): 40-50 s where pip
# took ~85 s on 2 cores, most of it compiling the bytecode on one core (these machines set
# PYTHONDONTWRITEBYTECODE, so what is not compiled at install time is compiled again by every process).
# The same packages at the same versions either way; `make INSTALLER=pip setup` installs with pip.
INSTALLER ?= uv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),pip)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
else
	$(PY) -m pip install -q -c $(CONSTRAINTS) uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c $(CONSTRAINTS) -e ".[dev]"
endif
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	SYNTH_DATA_DIR=$(DATA_DIR) $(PY) -m data_builders build phantom/demo --data_dir=$(DATA_DIR)
	SYNTH_DATA_DIR=$(DATA_DIR) $(PY) launch.py --config configs/phantom.py:demo,generator=flow --workdir $(DEMO_DIR)

# A persistent compilation cache for the run: tests, subprocesses and the notebook kernel compile many
# identical programs, and each is then compiled once. Fresh per run, removed afterwards. The processes
# share it at once, and JAX writes an entry in place: only with a size limit does it lock entries
# (with filelock), so a reader never deserialises a half-written executable (the likely cause of a
# worker's abort and the hang that followed in CI).
JAX_CACHE_ENV = JAX_COMPILATION_CACHE_DIR=$$cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5 \
  JAX_COMPILATION_CACHE_MAX_SIZE=17179869184

test: setup
	@cache=$$(mktemp -d); $(JAX_CACHE_ENV) \
	  $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder; status=$$?; rm -rf $$cache; exit $$status

# The whole-pipeline runs: the phantom's quickstart notebook and flow pipeline (tests/test_pipeline.py), the
# other families on their dummy data (tests/test_families.py), stage=compare. Tests are handed out one by one,
# except an xdist group's, which share a trained workdir and stay on one worker (`--dist loadgroup`).
test-slow: setup
	@cache=$$(mktemp -d); $(JAX_CACHE_ENV) \
	  $(PY) -m pytest -q -n 2 --dist loadgroup -m slow; status=$$?; rm -rf $$cache; exit $$status

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m benchmarks.input_pipeline
	$(PY) -m benchmarks.loop_overhead

clean-demo:
	rm -rf $(DEMO_DIR)
