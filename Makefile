# dimse-relay developer entry points. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: help bootstrap test test-agent lint bench clean
.PHONY: lab lab-destroy test-lab lint-ansible

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

bootstrap: ## install apt packages, the virtualenv and nats-server
	bash scripts/bootstrap.sh

test: bootstrap lint test-agent test-lab ## everything CI runs: lint, agent tests, lab tests

test-agent: bootstrap ## agent tests against real nats-server, DCMTK, Orthanc and pynetdicom
	$(PYTEST) tests

lint: bootstrap lint-ansible ## ruff, mypy, ansible-lint
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench
	$(VENV)/bin/mypy

bench: bootstrap ## direct DIMSE vs through the relay, side by side
	$(PY) bench/run.py

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache

lab: bootstrap ## boot the systemd-nspawn lab, deploy it with Ansible, relay a study both ways
	bash lab/up.sh
	$(VENV)/bin/ansible-playbook -i inventories/lab site.yml playbooks/lab_peers.yml
	bash lab/demo.sh

lab-destroy: ## power off and delete the lab hosts (the cached base image stays)
	bash lab/down.sh

test-lab: bootstrap ## Molecule on the lab: converge, idempotence, check mode, verify, destroy
	$(VENV)/bin/molecule test -s lab

lint-ansible: bootstrap ## ansible-lint (production profile) on the collection
	$(VENV)/bin/ansible-lint
