# Quick start (see README.md):
#   make run    set up .venv and run the main experiment on its default preset
#   make test   set up .venv and run the fast test suite (CPU, a few minutes)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup setup-test run test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
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
