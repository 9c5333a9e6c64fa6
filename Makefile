# The two commands of the README: `make run` (the bot; with nothing configured, its demo)
# and `make test` (lint, types, tests). Both set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test setup postgres lint bench

run: setup postgres
	$(PY) -m bot $(ARGS)

test: setup postgres
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

postgres: setup
	@PY=$(PY) sh scripts/ensure-postgres.sh

bench: setup postgres
	$(PY) bench/ack_latency.py
	$(PY) bench/load.py
