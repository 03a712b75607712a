# Two commands for everything: `make run` (the worker on test_input.json) and `make test`.
# Both create the virtual environment on first use; requirements are pinned (torch==2.13.0).
VENV ?= .venv
PY := $(VENV)/bin/python
TINY_DIR ?= /tmp/sdxl-lightning-tiny

.PHONY: run test test-fast test-unit lint clean gpu-wheels gpu-rehearse

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
