# make synth: set up everything, then synthesize with cdk-nag, the definition rules and cfn validation.
# make test:  set up everything, then run the whole test suite.
SHELL := /bin/bash
# The training image runs Python 3.12 (requirements-image.txt): use a 3.12 interpreter when this machine has
# one (on PATH or installed by pyenv), else python3.
IMAGE_PYTHON := $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12.*/bin/python3.12; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
PYTHON ?= $(or $(IMAGE_PYTHON),python3)
VENV := .venv
PY := $(VENV)/bin/python
# Packages go into .venv through uv (from PyPI, like pip): it resolves what pip resolves (the same versions,
# checked) and installs the ~4 GB of the training image's wheels in about 30 s instead of minutes.
UV := $(VENV)/bin/uv
UV_PIP := $(UV) pip install -q --python $(PY)
export PATH := $(CURDIR)/node_modules/.bin:$(CURDIR)/$(VENV)/bin:$(PATH)
export SAGEMAKER_SUPPRESS_V2_WARNING := 1
# No pip or uv cache: the training image's packages are ~4 GB of wheels that a cache would keep a second copy of
# (CI installs from nothing every time, so a cache only costs disk there).
export PIP_NO_CACHE_DIR := 1
export UV_NO_CACHE := 1
# Byte-compile at install as pip does: uv does not by default, and the image's environment for the emulated
# containers (PYTHONDONTWRITEBYTECODE=1) would then compile torch and transformers again in every process.
export UV_COMPILE_BYTECODE := 1

.PHONY: setup test-setup synth test local bootstrap deploy destroy clean

$(VENV)/.app: requirements.txt constructs/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv==0.13.9
	$(UV_PIP) -r requirements.txt
	touch $@

# A .venv made before uv was used here gets it too.
$(UV): $(VENV)/.app
	$(PY) -m pip install -q uv==0.13.9
	touch $@

# The construct package is installed as other teams install it (a wheel, not an editable link), so synth and
# the tests run what ships; any change to its sources or the trainer reinstalls it.
PACKAGE_SOURCES := $(shell find constructs/spot_training/ trainer/ -type f -not -path '*/__pycache__/*' 2>/dev/null)
$(VENV)/.package: $(VENV)/.app $(UV) $(PACKAGE_SOURCES)
	$(UV_PIP) --no-deps --reinstall ./constructs
	touch $@

# The training image's packages at its versions (torch 2.8.0 is a ~3 GB CUDA build from PyPI; it runs on CPU).
# Installed, they take ~7 GB, and pip holds the downloaded wheels beside them until it finishes (measured:
# `make test` from nothing peaks at 12.8 GB, 9.0 GB at the end): refuse in one line, before downloading,
# when the disk cannot hold that (a disk that fills half-way leaves a broken .venv).
TRAINER_DISK_GB ?= 12
$(VENV)/.trainer: $(VENV)/.package $(UV) requirements-image.txt
	@for d in $(VENV) "$${TMPDIR:-/tmp}"; do \
	  free=$$(df -P -BG "$$d" | awk 'NR==2 {print $$4+0}'); \
	  [ "$$free" -ge $(TRAINER_DISK_GB) ] || { echo "error: $$d: $${free} GB free; installing the training image's packages (requirements-image.txt) needs $(TRAINER_DISK_GB) GB (set TRAINER_DISK_GB to override)" >&2; exit 1; }; \
	done
	$(UV_PIP) -r requirements.txt -r requirements-image.txt
	touch $@

$(VENV)/.dev: $(VENV)/.trainer $(UV) requirements-dev.txt
	$(UV_PIP) -r requirements-dev.txt
	touch $@

.venv-checkov/.installed: requirements-checkov.txt $(UV)
	$(PYTHON) -m venv .venv-checkov
	$(UV) pip install -q --python .venv-checkov/bin/python -r requirements-checkov.txt
	touch $@

# Another team's environment: a fresh virtualenv holding the built wheel and only what its declared ranges
# resolve to (no pins, no torch); the suite synthesizes examples/team_app in it. Rebuilt from nothing when
# the package changes.
WHEEL_VENV := .venv-wheel
$(WHEEL_VENV)/.installed: constructs/pyproject.toml $(PACKAGE_SOURCES) $(UV)
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip wheel -q --no-deps -w $(WHEEL_VENV)/dist ./constructs
	$(UV) pip install -q --python $(WHEEL_VENV)/bin/python $(WHEEL_VENV)/dist/spot_training-*.whl
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.app $(VENV)/.package node_modules/.installed

synth: setup
	cdk synth --quiet
	@echo "Templates: $(CURDIR)/cdk.out/*.template.json"

# The four environments install side by side (the training image's packages dominate: torch 2.8.0 is 3 GB).
# Two pytest workers, one test file each at a time (requirements-dev.txt says why); PYTEST_XDIST= runs serially.
PYTEST_XDIST ?= -n 2 --dist loadfile
test:
	$(MAKE) -j4 test-setup
	$(PY) -m pytest -q $(PYTEST_XDIST) tests $(PYTEST_ARGS)

test-setup: setup $(VENV)/.dev .venv-checkov/.installed $(WHEEL_VENV)/.installed

# The deployed training step on this CPU: 2 emulated instances, one spot interruption, against a
# reference run without one; prints both summaries and whether they end bit-identically.
LOCAL_OUT ?= out/local
local: setup $(VENV)/.trainer
	$(VENV)/bin/spot-training local-run --steps 12 --out $(LOCAL_OUT)/reference
	$(VENV)/bin/spot-training local-run --steps 12 --interrupt-at-step 5 --out $(LOCAL_OUT)/interrupted
	$(VENV)/bin/spot-training compare-runs $(LOCAL_OUT)/reference $(LOCAL_OUT)/interrupted

bootstrap: setup
	cdk bootstrap

deploy: synth
	cdk deploy --all --require-approval broadening --outputs-file outputs.json

destroy: setup
	cdk destroy --all

clean:
	rm -rf $(VENV) .venv-checkov $(WHEEL_VENV) node_modules cdk.out out
