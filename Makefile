# Every target builds its own virtual environment first: nothing needs to be installed beforehand.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: serve traffic replay test bench schema clean

# The main job: the example detection service on BentoML, collecting samples into var/dataset.
serve: $(VENV)/.installed
	EDGECATCH_CONFIG=bento_service/edgecatch.yaml $(BIN)/bentoml serve \
		bento_service.service:DetectionService --host $(HOST) --port $(PORT)

# Send the shipped test images to a running `make serve` and report what was collected and why.
traffic: $(VENV)/.installed
	$(BIN)/python bento_service/send_traffic.py --url http://$(HOST):$(PORT)

# Backtest the example policy on a recorded day of predictions.
replay: $(VENV)/.installed
	$(BIN)/edgecatch replay policies/examples/packages.yaml policies/examples/predictions.jsonl --seed 1

# The whole test suite (what .ci/run runs).
test: $(VENV)/.installed
	$(BIN)/python -m pytest

# The quick benchmarks (seconds each); the others (BentoML with wrk, the sidecar with Triton, the
# Redis limiter, delivery's memory run) have their commands in benchmarks/README.md.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_policy.py
	$(BIN)/python benchmarks/bench_delivery.py handoff --n 200000
	$(BIN)/python benchmarks/bench_delivery.py spool --n 2000

schema: $(VENV)/.installed
	$(BIN)/edgecatch schema > policies/schema.json

# The venv holds edgecatch with its BentoML and sidecar extras, the test tools, and Triton from the
# nvidia-pytriton wheel (install_triton.sh assembles its Python backend under var/).
$(VENV)/.installed: pyproject.toml sidecar/install_triton.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	sidecar/install_triton.sh $(VENV)
	touch $@

clean:
	rm -rf $(VENV) var
