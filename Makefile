# Two commands set everything up on a fresh machine:
#   make run    a virtualenv with the stages, then the whole pipeline on the tiny default model (CPU)
#   make test   the same virtualenv, Azurite for the Azure ML tests, then lint and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is CPU-only where a local wheel provides it; elsewhere point pip at the CPU index, e.g.
#   make run PIP_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PIP_TORCH ?= torch==2.13.0

.PHONY: setup run test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH)
	$(PY) -m pip install -q -e '.[stages,azure,dev]'
	# AutoAWQ (a pure-Python sdist) for the AWQ reader's test; its GPU-only requirements are not needed for that.
	$(PY) -m pip install -q --no-deps --no-build-isolation autoawq==0.2.9
	touch $@

run: setup
	$(VENV)/bin/olivepress run

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	bash scripts/install-azurite.sh
	$(PY) -m pytest
