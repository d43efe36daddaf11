# The two newcomer commands: `make demo` (set up, then pretrain on the chapter's corpus) and
# `make test` (set up, then lint and run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

$(BIN)/gptcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/gptcli

demo: setup
	$(BIN)/gptcli train --epochs 10
	$(BIN)/gptcli sample --top-k 25 --temperature 1.4

lint: setup
	$(BIN)/ruff check gptcli tests benchmarks examples

test: lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
