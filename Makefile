# SFLLM: `make run` serves the default model, `make test` runs the suite. Both set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
WORKER_PORT ?= 50051
METRICS_PORT ?= 9400
MODEL ?=

.PHONY: install run test test-gpu lint proto bench-cpu bench-gateway bench-serve deploy-test clean

install: $(STAMP)

# torch is pinned to the CPU wheel these machines carry; a looser pin would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: install
	@bash scripts/run.sh "$(MODEL)" "$(HOST)" "$(PORT)" "$(WORKER_PORT)" "$(METRICS_PORT)"

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

lint: install
	$(VENV)/bin/ruff check .

proto: install
	bash scripts/gen_protos.sh

bench-cpu: install
	$(PY) bench/cpu.py

bench-gateway: install
	$(PY) bench/gateway_overhead.py

# Against a running stack (make run): the gateway's OpenAI API on $(HOST):$(PORT).
bench-serve: install
	$(PY) bench/serve.py --base-url http://$(HOST):$(PORT)/v1 --num-prompts 200 --input-len 64:512 \
	  --output-len 32:128 --max-concurrency 16 --json bench_serve.json --plot bench_serve.png

# The images and the compose stack, built and run for real (needs Docker; minutes); not part of `make test`.
# deploy/README.md: on machines with a registry and an index, DEPLOY_TEST_ARGS="--base-image python:3.11-slim --pip-from index".
deploy-test: install
	$(PY) scripts/deploy_test.py $(DEPLOY_TEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
