# dimse-relay developer entry points. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help bootstrap test test-unit test-lab lint bench lab lab-destroy clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

bootstrap: ## install apt packages, the virtualenv and nats-server
	bash scripts/bootstrap.sh

test: bootstrap ## run the whole test suite (agent against real NATS and DCMTK, then the lab)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: bootstrap ## ruff, mypy, ansible-lint
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench
	$(VENV)/bin/mypy

bench: bootstrap ## direct DIMSE vs through the relay, side by side
	$(PY) bench/run.py
