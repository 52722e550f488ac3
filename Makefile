# Lepton — the two commands:  `make demo`  and  `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export LEPTON_DATA_DIR ?= $(CURDIR)/.lepton
export PATH := $(BIN):$(PATH)
SCENARIO ?= banks
PIP_VERSION := 25.3

.PHONY: setup image demo test up down status lint bench-ingest bench-aggregate bench-round bench-quality clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "== installing pinned requirements into $(VENV)"
	$(BIN)/python -m pip install -q --disable-pip-version-check pip==$(PIP_VERSION)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/pip check
	@touch $@

setup: $(VENV)/.installed  ## create .venv with the pinned requirements

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

demo: setup  ## everything: docker (if installable), trainer image, stack, partners, drops, federated run, report
	-@scripts/dockerd.sh install
	-@scripts/dockerd.sh start
	@$(MAKE) --no-print-directory image
	$(BIN)/lepton up
	$(BIN)/lepton demo run --scenario $(SCENARIO)

test: setup image  ## lint, then the whole test suite against real services (started and stopped by the tests)
	$(BIN)/ruff check lepton_tasks plugins dags tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

down:  ## stop the embedded stack
	$(BIN)/lepton down

status:
	$(BIN)/lepton status

lint: setup
	$(BIN)/ruff check lepton_tasks plugins dags tests bench

bench-aggregate: setup
	bench/aggregate/run.sh

bench-ingest: setup
	$(BIN)/python bench/ingest/bench.py

bench-round: setup image
	$(BIN)/python bench/round/bench.py

bench-quality: setup
	$(BIN)/python bench/quality/banks.py

clean: down
	rm -rf .lepton
