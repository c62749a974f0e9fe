# Two entry points, both self-contained from a fresh clone: `make study` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Rules call `python` and `torchrun`: they must be the virtualenv's.
export PATH := $(BIN):$(PATH)

.PHONY: study test lint report bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

study: $(VENV)/.installed  ## install, then run the default study in config.yaml
	$(BIN)/snakemake --cores all

test: $(VENV)/.installed  ## install, then run every test (unit and end-to-end)
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint

report: $(VENV)/.installed  ## the Snakemake HTML report of the last study run
	$(BIN)/snakemake --report report.html

bench: $(VENV)/.installed  ## conversion-speed benchmark against k-means-constrained (BENCH_FLAGS=--quick for a minute)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/split_speed.py --json results/benchmarks/split_speed.json $(BENCH_FLAGS)
