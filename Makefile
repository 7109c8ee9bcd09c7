# The two commands of the README's quick start, and what they stand on.
#   make quickstart   set up .venv and run the whole pipeline on the digits quickstart (CPU)
#   make test         set up .venv, build the test servers (cached), lint, type-check, run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv

.PHONY: quickstart test lint bench-cpu clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check uv
	$(UV) pip install --quiet --python $(PY) -e '.[dev]'
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/clusterfit run config=quickstart

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check clusterfit tests bench
	$(VENV)/bin/mypy

test: $(VENV)/.installed lint
	bash tests/infra/build_bins.sh
	$(PY) -m pytest

bench-cpu: $(VENV)/.installed
	$(PY) bench/cluster.py
	$(PY) bench/extract.py
	$(PY) bench/train.py
	$(PY) bench/run.py

clean:
	rm -rf runs bench/results
