# Two entry points for a fresh clone (see README): `make repro` and `make test`.
PYTHON ?= python3.11
# extra pip options for setup, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" for the CPU torch
PIP_ARGS ?=
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup repro test lab clean-venv

# Install the pinned environment into .venv (re-done when pyproject.toml or this recipe changes). The lab extra
# is part of it: the tests start the JupyterLab server `make lab` runs (tests/pipelines/test_lab.py).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=25"
	$(VENV)/bin/python -m pip install --quiet $(PIP_ARGS) -e ".[dev,lab]"
	touch $@

# The main job: every pipeline stage with params.yaml's profile (quick by default: ~45 min on 2 cores), then README's
# result blocks rewritten from reports/metrics (a test fails when they disagree).
repro: setup
	python pipelines/run_notebook.py --check-profile  # before dvc repro, which removes a stage's outputs first
	dvc repro
	python pipelines/readme_results.py

# The test suite; it fetches the embedded model and corpus first (DVC stages), since tests use the real ones.
test: setup
	dvc repro prepare_corpus
	python -m pytest

# JupyterLab with the project's environment as kernel "Python (bsbr)". Jupyter refuses to start as root (the
# default user in containers) without --allow-root, so root (effective uid 0) gets it; nobody else does.
lab: setup
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name bsbr --display-name "Python (bsbr)"
	jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

clean-venv:
	rm -rf $(VENV)
