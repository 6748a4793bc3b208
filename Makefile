# Two commands on a fresh machine: `make quickstart` and `make test` (`make test-all` adds the slow tier: what CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The pins (torch, torchvision, lpips, ray) live in pins.txt, read here and by cluster/Dockerfile. torch, torchvision
# and lpips go in ONE pip command, or pip replaces torch behind our back. GPU users may override:
#   make install PINS="torch==2.11.0 torchvision==0.26.0 lpips==0.1.4 --index-url https://download.pytorch.org/whl/cu128"
PINS ?= $(shell sed -e 's/\#.*//' pins.txt)

.PHONY: quickstart test test-all test-fast lint install clean print-pins browser

$(VENV)/.installed: pyproject.toml Makefile pins.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PINS)
	$(PIP) install -q -e ".[dev]" $(PINS)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/oftsr run quickstart

lint: install
	$(VENV)/bin/ruff check oftsr pipelines tests benchmarks
	$(VENV)/bin/ruff format --check oftsr pipelines tests benchmarks

# The page test drives Debian's chromium (headless). Installed here when missing and we may (root and apt-get);
# otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing chromium (Debian) for the page test"; \
	      (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        --no-install-recommends chromium >/dev/null) || echo "could not install chromium: the page test will skip"; \
	    else echo "no chromium and no root apt-get: the page test will skip"; fi; }

# The fast tier: everything but the `slow` tests (20 minutes on a 2-core machine; docs/testing.md).
test: install lint browser
	$(PY) -m pytest -q -m "not slow"

# Both tiers: the full-budget quickstart's knob verdict, the cluster in a box, the fault drills. CI runs this.
test-all: install lint browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q tests/core tests/pipelines/test_tree.py tests/pipelines/test_overrides.py tests/pipelines/test_progress.py tests/pipelines/test_shipped.py tests/test_pins.py

print-pins:
	@echo $(PINS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
