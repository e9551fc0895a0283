# The two set-up commands of the README, and what they build on.
PYTHON ?= python3
PORT ?= 8001
OUT ?= out

.PHONY: install install-test demo test

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e '.[test]'

# Start the server on models/, explain the bundled photo into an overlay, stop the server.
demo: install
	$(PYTHON) scripts/demo.py --port $(PORT) --out $(OUT)

# The whole test suite (the slow end-to-end model checks included).
test: install-test
	$(PYTHON) -m pytest
