PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: services install test lint fmt example quickstart bench clean ci-gate

$(BIN)/python:
	$(PY) -m venv $(VENV)

services:  ## what the PostgreSQL study test needs (Debian, as root); without it that test skips and says why
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then echo "postgresql: installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -q postgresql >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1)) \
	  && echo "postgresql: installed" || echo "postgresql: could not be installed; the PostgreSQL study test will skip"; \
	else echo "postgresql: not installed (needs root and apt-get); the PostgreSQL study test will skip"; fi

install: $(BIN)/python  ## editable install with the tested versions pinned (hf: the Hugging Face folder tests need it)
	$(BIN)/pip install -q -e ".[dev,hf,llm,postgres]" -c constraints.txt

test: lint  ## what CI runs after make install: the default run and the system tier, in one session
	$(BIN)/python -m pytest -q -n 2 -m 'not slow'

lint:  ## style and types held by tools: ruff lint + format check (make fmt fixes what can be fixed), mypy on optcli/
	$(BIN)/ruff check optcli tests benchmarks
	$(BIN)/ruff format --check optcli tests benchmarks
	$(BIN)/mypy

fmt:
	$(BIN)/ruff check --fix optcli tests benchmarks
	$(BIN)/ruff format optcli tests benchmarks

example: install  ## digits CNN in every format optcli reads, plus .npz data, under build/example
	$(BIN)/python -m optcli.examples.digits build/example

quickstart: example
	$(BIN)/optcli run configs/digits_static_int8.yaml -o out/digits --overwrite

bench: install
	$(BIN)/python benchmarks/bench_digits_int8.py

clean:
	rm -rf build out .pytest_cache

# CI: optimize, publish the gates as JUnit XML, fail on a regression against a baseline report (a main-branch run).
#   make ci-gate RECIPE=configs/digits_static_int8.yaml OUT=out/ci BASELINE=baseline/report.json
RECIPE ?= configs/digits_static_int8.yaml
OUT ?= out/ci
BASELINE ?=
LIMITS ?= --max-latency-regression 0.05 --max-accuracy-drop 0.005 --max-size-growth 0.02

ci-gate:
	$(BIN)/optcli run $(RECIPE) -o $(OUT) --overwrite --quiet --junit $(OUT)/junit.xml
	$(if $(BASELINE),$(BIN)/optcli compare $(OUT)/report.json $(BASELINE) $(LIMITS) --junit $(OUT)/compare-junit.xml)
