# Two commands do all the set-up on a fresh clone:
#   make sweep   install, start a local Ray cluster if none is running, submit the default sweep
#   make test    install, run the test suite
#   make test-fast  the unit tests only (no services, no Ray cluster), while editing
PYTHON ?= python3
# The CPU build of PyTorch; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP := .cache/installed-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])').stamp
RAY_DASHBOARD ?= http://127.0.0.1:8265
# The local cluster runs with token authentication; every client (ray status, ray job submit, the
# job's driver) sends the token from ~/.ray/auth_token, which cluster-up creates when it is missing.
export RAY_AUTH_MODE ?= token
SWEEP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install services sweep test test-fast cluster-up cluster-down auth-token constraints

# Installs (editable) unless the stamp is newer than pyproject.toml AND the installed package is
# this checkout (another clone's editable install would otherwise be tested instead).
INSTALLED_HERE := cd / && $(PYTHON) -c 'import cpm_model, os, sys; \
	sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(cpm_model.__file__))) != sys.argv[1])' \
	"$(realpath $(CURDIR))" 2>/dev/null

# Every package at the version in constraints.txt (the same file a cluster's nodes install from).
install:
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ] && [ $(STAMP) -nt constraints.txt ] && \
		($(INSTALLED_HERE)); then :; else \
		echo "installing PyTorch ($(TORCH_SPEC)) and this project (editable, with test extras)"; \
		$(PYTHON) -m pip install --quiet -c constraints.txt "$(TORCH_SPEC)" && \
		$(PYTHON) -m pip install --quiet -c constraints.txt -e ".[test]" && \
		mkdir -p .cache && touch $(STAMP); fi

# After changing pyproject.toml's dependencies: pin what the tested environment has.
constraints:
	$(PYTHON) tools/freeze_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# `ray start --head` refuses token mode without a token, and only `ray.init()` would create one:
# make it here (once, readable by this user only) unless the shell already supplies a token.
auth-token:
	@if [ -z "$${RAY_AUTH_TOKEN:-}$${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$$HOME/.ray/auth_token" ]; then \
		(umask 077 && ray get-auth-token --generate >/dev/null 2>&1) || \
			{ echo "could not create ~/.ray/auth_token (ray get-auth-token --generate)"; exit 1; }; \
		echo "created a Ray authentication token in ~/.ray/auth_token"; fi

# Start a single-node Ray head here unless one is reachable (the job then runs in this directory).
cluster-up: install auth-token
	@ray status >/dev/null 2>&1 || ray start --head --include-dashboard=true --disable-usage-stats

cluster-down:
	ray stop

sweep: cluster-up
	RAY_ADDRESS=$(RAY_DASHBOARD) ray job submit -- $(PYTHON) pipeline/sweep.py $(SWEEP_ARGS)

# Debian packages the tests run for real: chromium (the MLflow UI test; browsers cannot be
# downloaded by the test tools) and a PostgreSQL server (the MLflow store on a database server).
services:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# Two pytest workers (pytest-xdist): most of the suite waits on services and Ray start-up, not
# the CPU. --dist loadgroup keeps each xdist_group on one worker (tests sharing a module's server
# or first sweep; the tests that start `ray start` heads, one at a time); tests/conftest.py orders
# the slow tests first. The tests marked `alone` run afterwards, one at a time: beside other sweeps
# on a loaded machine they fail on timing. PYTEST_WORKERS=0 runs everything in this one process.
# (Exit status 5 is pytest's "nothing selected", e.g. PYTEST_ARGS naming one file.)
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

test: install services
	$(PYTHON) -m pytest -q $(XDIST) -m "not alone" --durations=20 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PYTHON) -m pytest -q -m alone --durations=5 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The unit tests only (no services, no Ray cluster, no command in a subprocess): for the edit-test loop.
test-fast: install
	$(PYTHON) -m pytest -q $(XDIST) -m "not integration" --durations=10 $(PYTEST_ARGS)
