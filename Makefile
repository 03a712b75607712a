# Two commands for everything: `make run` (the worker on test_input.json) and `make test`.
# Both create the virtual environment on first use; requirements are pinned (torch==2.13.0).
VENV ?= .venv
PY := $(VENV)/bin/python
TINY_DIR ?= /tmp/sdxl-lightning-tiny

.PHONY: run test lint clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

# TINY=1: run on a tiny random model built on the spot (no GPU, no hub access, noise images).
run: $(VENV)/.installed
ifdef TINY
	$(PY) builder/make_tiny_model.py $(TINY_DIR)
	MODEL_DIR=$(TINY_DIR) $(PY) handler.py
else
	$(PY) handler.py
endif

# PYTEST_ARGS='-m "not slow"' skips the long fuzz and load proofs (CI runs everything).
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
