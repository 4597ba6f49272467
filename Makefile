# Quick start (see README.md):
#   make run    set up .venv and run the main experiment on its default preset
#   make test   set up .venv and run the fast test suite (CPU, a few minutes)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup setup-test run test test-slow clean

setup: $(VENV)/.installed

# jax's build for this machine's accelerator: the cuda12 extra where `nvidia-smi -L`
# lists a GPU, the tpu extra on a TPU VM, the CPU build otherwise (it says which).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	extra=$$($(PYTHON) cnn_jax/accelerator.py --extra) && \
	  $(PY) -m pip install --quiet -e ".[dev$${extra:+,$$extra}]"
	touch $@

# The tests also build PyTorch reference networks (weight conversion).
setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,torch]"
	touch $@

# The main experiment on its default preset: `paper` on a GPU/TPU, `quick` on a CPU.
run: setup
	$(PY) -m experiments.plain_vs_resnet

test: setup-test
	$(PY) -m pytest -n 2 -q

test-slow: setup-test
	$(PY) -m pytest -n 2 -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
