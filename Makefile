# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch, torchvision and lpips go in ONE pip command, or pip replaces torch behind our back.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1 lpips==0.1.4

.PHONY: quickstart test test-fast lint install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/oftsr run quickstart

lint: install
	$(VENV)/bin/ruff check oftsr pipelines tests benchmarks
	$(VENV)/bin/ruff format --check oftsr pipelines tests benchmarks

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q tests/core tests/pipelines/test_tree.py tests/pipelines/test_overrides.py tests/pipelines/test_progress.py tests/pipelines/test_shipped.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
