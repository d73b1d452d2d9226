# Set-up is part of every target: a fresh machine needs only Python 3.11 and these two commands.
#   make demo   tiny model through every stage on the shipped/generated demo data (CPU when there is no GPU)
#   make test   the test suite (what .ci/run runs)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_DATA := dataset/.complete

.PHONY: demo test setup data clean
.DEFAULT_GOAL := demo

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(INSTALLED)

$(DEMO_DATA): $(INSTALLED) scripts/make_demo_data.py
	$(PY) scripts/make_demo_data.py --out_dir dataset
	touch $@

data: $(DEMO_DATA)

demo: $(DEMO_DATA)
	bash launch/run_pipeline.sh

test: $(DEMO_DATA)
	$(PY) -m pytest -q

clean:
	rm -rf out .cache dataset
