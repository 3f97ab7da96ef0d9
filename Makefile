# Every target sets itself up from nothing: a .venv with torch==$(TORCH_VERSION) installed first,
# then the project and its extras. Where the package index serves torch's CUDA build (PyPI on
# Linux x86-64), that is the multi-GB CUDA build; TORCH_INDEX=<a CPU wheel index> picks another.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install test test-gpu gpu-check bench bench-full kernel-report example clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test,bench,examples]"
	touch $(STAMP)

install: $(STAMP)

# CPU test suite: the reference everywhere, the Triton kernels in Triton's interpreter.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# On a CUDA machine: the same tests on the real kernels (no interpreter), in a process per core
# (up to 16).
test-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m bench.gpu_check --tests-only --tests tests --test-timeout 1200

# On a CUDA machine whose torch is already installed (no network, no venv): GPU tests, a quick
# benchmark of every provider in bf16 and fp32, and a host/kernel time profile per shape.
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m bench.gpu_check

bench: $(STAMP)
	$(PY) -m bench.run

bench-full: $(STAMP)
	$(PY) -m bench.run --full

# SCS network against its conv2d twin on scikit-learn's 8x8 digits (CPU, reference backend, 10-25 s);
# EXAMPLE_ARGS passes options, e.g. EXAMPLE_ARGS="--device cuda --channels-last --amp bf16".
example: $(STAMP)
	$(PY) examples/train_digits.py $(EXAMPLE_ARGS)

# Ahead-of-time compile of every shipped kernel config for sm_80 / sm_90: registers, spills, mma count.
kernel-report: $(STAMP)
	$(PY) -m scd_triton.kernels.report

clean:
	rm -rf $(VENV) build *.egg-info
