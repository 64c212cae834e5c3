# Two entry points for a fresh machine: `make demo` and `make test`. Each creates the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_model.py
