# Every target builds its own virtual environment first: nothing needs to be installed beforehand.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: replay test bench schema clean

# The main job until serving lands: backtest the example policy on a recorded day of predictions.
replay: $(VENV)/.installed
	$(BIN)/edgecatch replay policies/examples/packages.yaml policies/examples/predictions.jsonl --seed 1

# The whole test suite (what .ci/run runs).
test: $(VENV)/.installed
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_policy.py

schema: $(VENV)/.installed
	$(BIN)/edgecatch schema > policies/schema.json

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) var
