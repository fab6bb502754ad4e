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

# pytest's exit 5 (no test collected, e.g. a -k that matches nothing) fails too, saying so.
NO_TESTS_HINT := || { s=$$?; [ $$s != 5 ] || echo "no test was selected (pytest exit 5): check PYTEST_ARGS" >&2; exit $$s; }

run: provision
	$(PY) -m pytest iotests -n $(JOBS) $(PYTEST_ARGS) $(NO_TESTS_HINT)

check: provision
	$(PY) -m pytest harness/tests iotests -n $(JOBS) $(PYTEST_ARGS) $(NO_TESTS_HINT)

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

# Fetch the default QEMU release and the guest kernel (cached; instant when present),
# so that downloads show their progress.  A user-given QEMU (QEMU_PROG, or --qemu-build /
# --qemu-prog in PYTEST_ARGS) needs no QEMU download; --qemu-release in PYTEST_ARGS is
# fetched by the plugin.  No kernel is needed with --guest-kernel or -m "not guest".
QEMU_GIVEN = $(or $(QEMU_PROG),$(findstring --qemu-build,$(PYTEST_ARGS)),$(findstring \
  --qemu-prog,$(PYTEST_ARGS)),$(findstring --qemu-release,$(PYTEST_ARGS)))
KERNEL_NOT_NEEDED = $(or $(findstring --guest-kernel,$(PYTEST_ARGS)),$(findstring \
  not guest,$(PYTEST_ARGS)))

provision: setup
	@$(PY) -m harness.provision $(if $(QEMU_GIVEN),--no-qemu,$(QEMU_RELEASE)) \
	  $(if $(KERNEL_NOT_NEEDED),,--kernel)

clean:
	rm -rf $(VENV) artifacts .pytest_cache
