# The two commands of the README: `make run` (the bot; with nothing configured, its demo)
# and `make test` (lint, types, tests). Both set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PIP := $(PY) -m pip install -q --disable-pip-version-check
# pytest-xdist workers, each with its own PostgreSQL server (tests/conftest.py). The suite
# mostly waits (on PostgreSQL, subprocesses, timers), so 4 workers were fastest on 2 cores.
# `make test` stays within 3 minutes on a fresh clone of a 2-core machine: a new slow test
# pays for itself.
TEST_WORKERS ?= 4

.PHONY: run test setup postgres lint bench

run: setup postgres
	$(PY) -m bot $(ARGS)

test: setup postgres
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# bytecode once, not in each of the workers starting at once
	$(PY) -m compileall -q -j 0 bot commands tests bench
	@# mypy checks while the tests run (its result prints when it ends); either failing fails
	$(VENV)/bin/mypy & mypy=$$!; \
	  $(VENV)/bin/pytest -q -n $(TEST_WORKERS); tests=$$?; \
	  wait $$mypy || { echo "mypy failed"; exit 1; }; exit $$tests

setup: $(STAMP)

# uv (from PyPI) installs in seconds what takes pip a quarter of a minute; pip if it cannot.
# Bytecode at install time, not in every test worker starting at once.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) uv && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]' \
	  || { $(PIP) --upgrade pip && $(PIP) -e '.[dev]'; }
	rm -f $(VENV)/.installed-*
	touch $@

postgres: setup
	@PY=$(PY) sh scripts/ensure-postgres.sh

bench: setup postgres
	$(PY) bench/ack_latency.py
	$(PY) bench/load.py
