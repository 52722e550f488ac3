# Lepton — the two commands:  `make demo`  and  `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export LEPTON_DATA_DIR ?= $(CURDIR)/.lepton
export PATH := $(BIN):$(PATH)
SCENARIO ?= banks
PIP_VERSION := 25.3
# what ruff checks and formats; mypy's targets and per-package strictness are in pyproject.toml [tool.mypy]
LINT_PATHS := lepton_tasks plugins dags tests bench docker
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider
# `make test-unit`: the pure tests (no service, no Docker, no image) minus those marked slow (they train
# TensorFlow models or wait through real retries): about 45 s. UNIT_MARKERS="not integration and not docker"
# runs the slow ones too (about 2 min); `make test` runs everything.
UNIT_MARKERS ?= not integration and not docker and not slow

.PHONY: setup image demo test test-unit up down status lint bench-ingest bench-aggregate bench-round bench-quality bench-privacy clean

# requirements.txt: the runtime pins; requirements-dev.txt: the tools (pytest, ruff, mypy + stubs, coverage),
# installed into the same venv for development and CI, never into the runtime images.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "== installing pinned requirements (runtime + development tools) into $(VENV)"
	$(BIN)/python -m pip install -q --disable-pip-version-check pip==$(PIP_VERSION)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/pip check
	@touch $@

setup: $(VENV)/.installed  ## create .venv with the pinned runtime requirements and development tools

# The trainer image: built when a Docker daemon answers. In CI (CI=true) a missing daemon is an error.
image: setup
	@if timeout 10 docker info >/dev/null 2>&1; then \
		$(BIN)/lepton images build; \
	elif [ "$$CI" = "true" ]; then \
		echo "CI=true but no Docker daemon answers: run scripts/dockerd.sh install && scripts/dockerd.sh start" >&2; exit 1; \
	else \
		echo "== no Docker daemon: trainers will use the local runtime (scripts/dockerd.sh start to enable Docker)"; \
	fi

up: setup  ## start the embedded stack (OpenBao, SeaweedFS, Airflow) on 127.0.0.1
	$(BIN)/lepton up

demo: setup  ## everything: Docker, the trainer image, a coordinator + one site per partner (each its own stack), enrollment, drops, one federated run, the report
	-@scripts/dockerd.sh install
	-@scripts/dockerd.sh start
	@$(MAKE) --no-print-directory image
	$(BIN)/lepton demo topology --scenario $(SCENARIO)

test: setup  ## lint, then the whole test suite against real services (started and stopped by the tests), coverage
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory image
	$(PYTEST) --durations=15 --cov=lepton_tasks --cov-report=term:skip-covered

test-unit: setup  ## the pure tests only (tests/unit, tests/dags): no services, no Docker, no image build
	$(PYTEST) tests/unit tests/dags -m "$(UNIT_MARKERS)" --durations=5

down:  ## stop the demo's stacks (the coordinator and its sites) and the ingest-only development stack, if running
	@if [ -f "$(LEPTON_DATA_DIR)/topology/topology.json" ]; then $(BIN)/lepton topology down; fi
	$(BIN)/lepton down

status:
	$(BIN)/lepton status

lint: setup  ## ruff check, ruff format --check, mypy (strict on lepton_tasks/core and lepton_tasks/adapters)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

bench-aggregate: setup
	bench/aggregate/run.sh

bench-ingest: setup
	$(BIN)/python bench/ingest/bench.py

bench-round: setup
	$(BIN)/python bench/round/bench.py

bench-quality: setup
	PATH=$(BIN):$$PATH $(BIN)/python bench/quality/federated.py --seeds 1 2 3 --rounds 5

# secure aggregation vs plain FedAvg (pure, ~1 min); then DP-SGD utility on the banks data, seed 1 (starts its
# own OpenBao + SeaweedFS: `bao` and `weed` must be on PATH)
bench-privacy: setup
	$(BIN)/python bench/privacy/secagg_bench.py
	PATH=$(BIN):$$PATH $(BIN)/python bench/privacy/utility.py --seeds 1

clean: down
	rm -rf .lepton
