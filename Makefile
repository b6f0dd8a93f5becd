# edgemodel: two commands matter — `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TESTBED_DIR ?= .testbed

.PHONY: venv demo cluster-demo test lint generate testbed testbed-down binaries bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Build (or reuse) the control-plane binaries; cold builds take minutes and are cached.
binaries: $(STAMP)
	$(BIN)/python -m tests.testbed build

## Every test: static checks, unit tests, integration tests on a real control plane.
test: binaries
	$(BIN)/python -m pytest

## The main job: build FP32 and INT8 engines of a real model, shadow one against the other, decide.
demo: $(STAMP)
	$(BIN)/edgemodel demo

## The cluster side so far: test bed, CRD, examples/ applied, shown with kubectl.
cluster-demo: binaries
	$(BIN)/python -m tests.testbed demo --dir $(TESTBED_DIR)

## Start a test bed for a person; prints the KUBECONFIG line to use.
testbed: binaries
	$(BIN)/python -m tests.testbed up --dir $(TESTBED_DIR)

testbed-down: $(STAMP)
	$(BIN)/python -m tests.testbed down --dir $(TESTBED_DIR)

## Regenerate crds/ and docs/reference.md from the API models.
generate: $(STAMP)
	$(BIN)/python -m edgemodel_operator.api.generate
	cp crds/*.yaml charts/edgemodel/crds/

## Benchmarks (speed goals live here, not in tests); each prints one JSON object last.
bench: $(STAMP)
	$(BIN)/python bench/build.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/operator.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

clean: testbed-down
	rm -rf $(VENV) $(TESTBED_DIR)
