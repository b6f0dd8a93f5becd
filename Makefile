# edgemodel: two commands matter — `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TESTBED_DIR ?= .testbed

.PHONY: venv system-deps demo engine-demo cluster-demo test lint generate testbed testbed-down binaries images images-arm64 bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Debian packages the test bed runs for real (installed where missing; needs root).
system-deps:
	bash tests/testbed/system-deps.sh

## Build (or reuse) the control-plane and node binaries; cold builds take minutes and are cached.
binaries: $(STAMP)
	$(BIN)/python -m tests.testbed build

## Build (or reuse) the images from images/*/Dockerfile for the real node; cached by their inputs.
images: $(STAMP) system-deps
	$(BIN)/python -m tests.testbed.images

## The same images for arm64 (built under emulation), the operator's too; the tests build what they run.
images-arm64: $(STAMP) system-deps
	$(BIN)/python -m tests.testbed.images arm64

## Every test: static checks, unit tests, integration tests on a real control plane. The arm64 images are
## built first where arm64 programs run here (under emulation they take minutes: not inside a test's timeout).
test: binaries images
	$(BIN)/python -m tests.testbed.images arm64 --if-emulated
	$(BIN)/python -m pytest

## The main job: one EdgeModel on two real architectures, this machine (amd64) and an arm64 node under
## emulation: built, served, shadowed, promoted and rolled back per class. ARM64_NODE=0: this machine only.
demo: binaries images
	$(BIN)/python -m tests.testbed story --dir $(TESTBED_DIR) $(if $(filter 0 no false,$(ARM64_NODE)),,--arm64-node)

## Without a cluster: build FP32 and INT8 engines of a real model, shadow one against the other, decide.
engine-demo: $(STAMP)
	$(BIN)/edgemodel demo

## The cluster side so far: test bed, CRD, examples/ applied, shown with kubectl.
cluster-demo: binaries
	$(BIN)/python -m tests.testbed demo --dir $(TESTBED_DIR)

## Start a test bed for a person; prints the KUBECONFIG line to use. REAL_NODE=1 adds the real node;
## ARM64_NODE=1 adds it and an arm64 node beside it, under emulation (qemu-user-static).
testbed: binaries
	$(BIN)/python -m tests.testbed up --dir $(TESTBED_DIR) $(if $(filter 1 yes true,$(REAL_NODE)),--real-node) \
		$(if $(filter 1 yes true,$(ARM64_NODE)),--arm64-node)

## Stop the test bed in TESTBED_DIR, and every test bed whose directory is gone (found by its record
## under /run and the real nodes' locks).
testbed-down: $(STAMP)
	$(BIN)/python -m tests.testbed down --dir $(TESTBED_DIR)

## Regenerate crds/ and docs/reference.md from the API models.
generate: $(STAMP)
	$(BIN)/python -m edgemodel_operator.api.generate
	cp crds/*.yaml charts/edgemodel/crds/

## Benchmarks (speed goals live here, not in tests); each prints one JSON object last.
bench: $(STAMP)
	$(BIN)/python bench/build.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/int8.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/operator.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

clean: testbed-down
	rm -rf $(VENV) $(TESTBED_DIR)
