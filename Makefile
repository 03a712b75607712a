# Two commands for everything: `make run` (the worker on test_input.json) and `make test`.
# Both create the virtual environment on first use; requirements are pinned (torch==2.13.0).
VENV ?= .venv
PY := $(VENV)/bin/python
TINY_DIR ?= /tmp/sdxl-lightning-tiny

.PHONY: run serve serve-http test test-fast test-unit lint clean gpu-wheels gpu-rehearse

$(VENV)/.installed: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

# TINY=1: run on a tiny random model built on the spot (no GPU, no hub access, noise images).
run: $(VENV)/.installed
ifdef TINY
	$(PY) -m builder.make_tiny_model $(TINY_DIR)
	MODEL_DIR=$(TINY_DIR) $(PY) handler.py
else
	$(PY) handler.py
endif

# Local servers on 127.0.0.1:$(PORT): the real model where MODEL_DIR or the baked folder holds it,
# else the tiny random one (built on the spot).
PORT ?= 8000
BAKED := models/sdxl-lightning
SERVE_MODEL = $(or $(MODEL_DIR),$(if $(wildcard $(BAKED)/unet),$(BAKED),$(TINY_DIR)))

# RunPod's local test API (the SDK's --rp_serve_api): POST /runsync, POST /run, POST /status/<id>.
serve: $(VENV)/.installed
	@test "$(SERVE_MODEL)" != "$(TINY_DIR)" || $(PY) -m builder.make_tiny_model $(TINY_DIR)
	@echo "RunPod's local test API: http://127.0.0.1:$(PORT) (model folder $(SERVE_MODEL))"
	MODEL_DIR=$(SERVE_MODEL) $(PY) handler.py --rp_serve_api --rp_api_host 127.0.0.1 \
		--rp_api_port $(PORT)

# HTTP mode (a load-balancing endpoint's server): /ping, /v1/generate, OpenAI and A1111 routes.
serve-http: $(VENV)/.installed
	@test "$(SERVE_MODEL)" != "$(TINY_DIR)" || $(PY) -m builder.make_tiny_model $(TINY_DIR)
	@echo "HTTP mode: http://127.0.0.1:$(PORT) (model folder $(SERVE_MODEL))"
	MODEL_DIR=$(SERVE_MODEL) WORKER_MODE=http HOST=127.0.0.1 PORT=$(PORT) $(PY) handler.py

# Every kind: tests/unit, tests/integration and the slow tests/e2e proofs (what CI runs).
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast kinds: tests/unit and tests/integration (tiny model), without the e2e proofs.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Pure tests only: no torch, no model.
test-unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The GPU benchmark's wheels (bench/gpu/wheels/, carried to the GPU machine; bench/RESULTS.md,
# "GPU"), and a rehearsal of its install and run here on the CPU (needs PyPI, no GPU).
gpu-wheels: $(VENV)/.installed
	PYTHON=$(PY) bash bench/gpu/wheels.sh

gpu-rehearse: $(VENV)/.installed
	VENV=$(VENV) bash bench/gpu/rehearse.sh

clean:
	rm -rf $(VENV) .pytest_cache
