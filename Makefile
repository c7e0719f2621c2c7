# make demo   -- the exchange with no servers: SQLite, an order generator, a live view (Ctrl-C stops it)
# make replay -- replay examples/session.jsonl through the core and print the events
# make run-local -- `exchange run` from nothing: PostgreSQL, Redis, a test Kafka broker, a fresh database, the topics
# make test   -- lint (ruff, the import layers), type checks (mypy --strict), all tests (pytest); what CI runs
# make bench  -- the core benchmark

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo replay run-local test lint typecheck pytest services bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/exchange demo $(DEMO_ARGS)

replay: $(STAMP)
	$(VENV)/bin/exchange replay --config exchange/defaults/exchange.toml examples/session.jsonl

run-local: $(STAMP)
	VENV=$(VENV) bash scripts/run-local.sh

test: lint typecheck pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check exchange recovery tests bench
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy

services:
	@bash scripts/services.sh

pytest: $(STAMP) services
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/core.py --baseline
	$(PY) bench/core.py --memory

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
