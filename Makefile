# Two commands on a fresh machine: `make up` runs the system, `make test` installs and tests it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint up down status bench-publish bench-export bench-cleanup bench-federation proto clean

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

test: install lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Embedded Postgres under ./var, migrations, a demo seed and the API on 127.0.0.1:8080.
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

proto: install
	PATH=$(BIN):$$PATH bash scripts/gen_protos.sh

clean: down
	rm -rf var .pytest_cache .ruff_cache
