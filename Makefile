# Two commands for a fresh machine: `make demo` (the ShapesSG job) and `make test`.
# Each creates .venv with pip if it is missing, installing the exact versions CI uses
# (constraints.txt); pyproject.toml holds the version ranges.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
# 2 workers fit the 2-core CI machine; set PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 2

.PHONY: demo test lint clean

$(VENV)/.runtime: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e ".[test]"
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m rig_jax.tools.shapes_demo --config=configs/shapes.py:demo

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --maxschedchunk=1 tests

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache runs
