# make synth: set up everything, then synthesize with cdk-nag, the definition rules and cfn validation.
# make test:  set up everything, then run the whole test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/node_modules/.bin:$(CURDIR)/$(VENV)/bin:$(PATH)
export SAGEMAKER_SUPPRESS_V2_WARNING := 1

.PHONY: setup synth test deploy destroy clean

$(VENV)/.app: requirements.txt constructs/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.app requirements-dev.txt trainer/requirements.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.venv-checkov/.installed: requirements-checkov.txt
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q -r requirements-checkov.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.app node_modules/.installed

synth: setup
	cdk synth --quiet
	@echo "Templates: $(CURDIR)/cdk.out/*.template.json"

test: setup $(VENV)/.dev .venv-checkov/.installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

deploy: synth
	cdk deploy --all --require-approval broadening --outputs-file outputs.json

destroy: setup
	cdk destroy --all

clean:
	rm -rf $(VENV) .venv-checkov node_modules cdk.out
