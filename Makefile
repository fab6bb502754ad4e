# The two commands: `make run` (the suite against the default QEMU, with a summary) and
# `make check` (the harness's self-tests and the suite).  Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
# e.g. make run PYTEST_ARGS='--qemu-build ~/qemu/build'   or   QEMU_RELEASE=10.0
PYTEST_ARGS ?=
QEMU_RELEASE ?= $(or $(CBW_QEMU_RELEASE),11.1)
export CBW_QEMU_RELEASE := $(QEMU_RELEASE)

.PHONY: run check lint setup provision bench clean

run: provision
	$(PY) -m pytest iotests -n $(JOBS) $(PYTEST_ARGS)

check: provision
	$(PY) -m pytest harness/tests iotests -n $(JOBS) $(PYTEST_ARGS)

# Static checks, pinned in pyproject.toml (dev extra).
lint: setup
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy

bench: provision
	$(PY) bench/run.py

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing Debian's python3-venv"; \
	  rm -rf $(VENV); apt-get update -qq && apt-get install -y -qq python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $@

# Fetch the default QEMU release and the guest kernel (cached; instant when present).
# A user-given QEMU (QEMU_PROG or --qemu-build in PYTEST_ARGS) needs no QEMU download.
provision: setup
	@$(PY) -m harness.provision $(if $(QEMU_PROG),--no-qemu,$(QEMU_RELEASE)) --kernel

clean:
	rm -rf $(VENV) artifacts .pytest_cache
