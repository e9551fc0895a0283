# The two set-up commands of the README, and what they build on. Everything installs into a
# project-local virtual environment (.venv), made on first use: a stock machine whose system
# Python refuses pip installs works, and a fresh clone (CI) starts from an empty environment, so
# a dependency missing from pyproject.toml fails instead of hiding.
PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
PORT ?= 8001
OUT ?= out

.PHONY: install install-test demo test

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

install: $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e .

install-test: $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e '.[test]'

# Start the server on models/, explain the bundled photo into an overlay, stop the server.
demo: install
	$(VENV_PYTHON) scripts/demo.py --port $(PORT) --out $(OUT)

# The whole test suite (the slow end-to-end model checks included).
test: install-test
	$(VENV_PYTHON) -m pytest
