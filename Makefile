# Two commands on a fresh machine: `make up` runs the system, `make test` installs and tests it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint browser up down status bench-publish bench-export bench-cleanup bench-federation bench-load proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: install lint browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Debian's Chromium for the browser test (tests/e2e): Playwright drives /usr/bin/chromium and never downloads
# a browser of its own. Installed once (needs root or sudo); quiet unless apt fails.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "installing Debian's chromium for the browser test (tests/e2e)"; \
	  log=$$(mktemp); \
	  if ! { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq chromium; } >"$$log" 2>&1; then \
	    tail -n 30 "$$log"; echo "make browser: could not install chromium (log: $$log)"; exit 1; \
	  fi; \
	  rm -f "$$log"; \
	fi

# Embedded Postgres under ./var, migrations, a demo seed, the API on 127.0.0.1:8080 and Airflow (UI on :8088).
up: install
	$(BIN)/enpipeline local up

down:
	@if [ -x $(BIN)/enpipeline ]; then $(BIN)/enpipeline local down; else echo "nothing to stop"; fi

status: install
	$(BIN)/enpipeline local status

bench-publish: install
	$(BIN)/python bench/publish_bench.py $(BENCH_ARGS)

bench-export: install
	$(BIN)/python bench/export_bench.py $(BENCH_ARGS)

bench-cleanup: install
	$(BIN)/python bench/cleanup_bench.py $(BENCH_ARGS)

bench-federation: install
	$(BIN)/python bench/federation_bench.py $(BENCH_ARGS)

bench-load: install
	$(BIN)/python bench/load_bench.py $(BENCH_ARGS)

proto: install
	PATH=$(BIN):$$PATH bash scripts/gen_protos.sh

clean: down
	rm -rf var .pytest_cache .ruff_cache
