# Entry points, each self-contained from a fresh clone: `make study` and `make test` (CI runs these).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin

.PHONY: study test test-fast lint format report bench mlflow-server

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m moefy.native  # compiles the native looped kernel once (about 30 s); the Python loop runs where it cannot
	touch $@

study: $(VENV)/.installed  ## install, then run the default study in config.yaml
	$(BIN)/snakemake --cores all

test: $(VENV)/.installed  ## install, then run every test (unit and end-to-end), slowest 30 and total printed
	$(BIN)/python -m pytest

test-fast: $(VENV)/.installed  ## the unit tests alone, for the inner loop
	$(BIN)/python -m pytest -m "not e2e"

lint: $(VENV)/.installed  ## ruff (lint and format), snakefmt, snakemake --lint
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

format: $(VENV)/.installed  ## apply ruff format and snakefmt
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/snakefmt Snakefile rules

report: $(VENV)/.installed  ## the Snakemake HTML report of the last study run
	$(BIN)/snakemake --report report.html

bench: $(VENV)/.installed  ## conversion-speed benchmark against k-means-constrained (BENCH_FLAGS=--quick for a minute)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/split_speed.py --json results/benchmarks/split_speed.json $(BENCH_FLAGS)

MLFLOW_PORT ?= 5000
mlflow-server: $(VENV)/.installed  ## an MLflow tracking server on 127.0.0.1:$(MLFLOW_PORT), its runs and artifacts under results/mlflow-server/
	mkdir -p results/mlflow-server
	$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(abspath results/mlflow-server)/mlflow.db \
		--artifacts-destination $(abspath results/mlflow-server)/artifacts --serve-artifacts
