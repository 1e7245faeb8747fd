# Two commands do all setup: `make run` (index a catalog and serve it) and `make test`.
# Each bootstraps the virtualenv with pinned dependencies on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench eval clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/vsearch serve

test: $(STAMP)
	bash scripts/test-deps.sh
	$(VENV)/bin/ruff check .
	VSEARCH_WEIGHTS=random $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/vsearch bench

clean:
	rm -rf $(VENV) vsearch-data
