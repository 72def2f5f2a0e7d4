# The two commands of the README:
#   make repro   build/refresh .venv, pull the embedded data (DVC, offline), run the whole pipeline
#   make test    build/refresh .venv, lint, then run every test (slow end-to-end ones included)
# Also: make lint (ruff check + format check), make format (apply them), make test-fast (the non-slow tests).
# .venv is rebuilt only when requirements.lock or pyproject.toml change.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coordexp-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: venv repro test test-fast lint format data clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

data: venv
	dvc pull --quiet data.dvc

repro: data
	dvc repro
	@dvc status

lint: venv
	ruff check .
	ruff format --check .

format: venv
	ruff check --fix .
	ruff format .

test: lint
	python -m pytest $(PYTEST_ARGS)

test-fast: venv
	python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
