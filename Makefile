# Two entry points (README): `make bench` runs the benchmark against the baseline,
# `make test` runs the test suite.  Both set themselves up: a local venv with the
# dev stack (requirements-dev.txt) and an editable install of the package.
#
# FBP_SYSTEM_PYTHON=1 skips the venv and uses `python3` as it is (a machine with
# torch preinstalled and no network, e.g. the GPU box): only the package itself is
# installed, with --no-deps.

VENV ?= .venv
ifeq ($(FBP_SYSTEM_PYTHON),1)
PY := python3
SETUP_STAMP := .system-python.stamp
else
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.fbp-setup.stamp
endif

PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench bench-pytest gpu-check setup clean

setup: $(SETUP_STAMP)

$(VENV)/.fbp-setup.stamp: requirements-dev.txt pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	FBP_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# Triton 3.6 (the GPU machine's version) beside the dev stack, for the compile check
	# of every kernel with both versions (tests/test_triton_gpu_compile.py); not imported
	# unless PYTHONPATH points at it.
	$(PY) -m pip install -q --no-deps --target $(VENV)/triton-3.6 triton==3.6.0
	touch $@

.system-python.stamp: pyproject.toml setup.py
	FBP_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# On a lent GPU (no network): the GPU tests and the benchmark in one call, logs under
# $OUT.  Uses the machine's python3 (torch preinstalled); see scripts/gpu_check.sh.
gpu-check:
	OUT="$(OUT)" bash scripts/gpu_check.sh

# Regression-tracking suite (pytest-benchmark); never part of `make test`.
bench-pytest: setup
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .system-python.stamp
