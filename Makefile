# trueup: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_PORT ?= 3000

.PHONY: install stack stack-down stack-status test unit lint demo demo-shop demo-stop prepare seed clean

install: $(VENV)/.installed

# Pinned install: constraints.txt holds every package version of a resolved environment.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# the browser tests use Debian's chromium (Playwright's own download is not used)
	test -x /usr/bin/chromium || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }
	touch $@

stack: install
	scripts/stack up

stack-down:
	scripts/stack down

stack-status:
	scripts/stack status

prepare: stack
	$(BIN)/python -m examples.prepare --config examples/trueup.yaml

seed: stack
	$(BIN)/python -m examples.seed --config examples/trueup.yaml

# The whole suite: unit, integration (real Postgres, Kafka, RabbitMQ) and end-to-end (Dagster),
# in TEST_WORKERS processes (pytest-xdist), each taking a whole test file at a time: most tests
# wait on brokers, daemons and timers, so two share two cores well. Every test has its own
# databases, topics and queues; a file's tests share its module fixtures.
TEST_WORKERS ?= 2
test: stack
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

unit: install
	$(BIN)/python -m pytest tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The shop runs (relay, billing consumer, ledger in the background: .stack/demo/), traffic and
# faults go through it, then Dagster's UI starts on the result.
demo: demo-shop
	mkdir -p .dagster_home
	cp examples/dagster.yaml .dagster_home/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/.dagster_home TRUEUP_CONFIG=examples/trueup.yaml \
	  $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(DEMO_PORT)

demo-shop: stack
	TRUEUP_LOG_LEVEL=warning $(BIN)/python -m examples.shop.demo --config examples/trueup.yaml

# Stops only the demo's workers (by the pids in .stack/demo/), never the stack.
demo-stop:
	$(BIN)/python -m examples.shop.demo stop

clean:
	rm -rf $(VENV) .dagster_home .mypy_cache .ruff_cache
