# Two commands do all the set-up on a fresh clone:
#   make sweep   install, start a local Ray cluster if none is running, submit the default sweep
#   make test    install, run the test suite
PYTHON ?= python3
# The CPU build of PyTorch; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP := .cache/installed-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])').stamp
RAY_DASHBOARD ?= http://127.0.0.1:8265
# A new local Ray cluster turns on token authentication; its clients must send the token.
export RAY_AUTH_MODE ?= token
SWEEP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install browser sweep test cluster-up cluster-down

# Installs (editable) unless the stamp is newer than pyproject.toml AND the installed package is
# this checkout (another clone's editable install would otherwise be tested instead).
INSTALLED_HERE := cd / && $(PYTHON) -c 'import cpm_model, os, sys; \
	sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(cpm_model.__file__))) != sys.argv[1])' \
	"$(realpath $(CURDIR))" 2>/dev/null

install:
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ] && ($(INSTALLED_HERE)); then :; else \
		echo "installing PyTorch ($(TORCH_SPEC)) and this project (editable, with test extras)"; \
		$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)" && \
		$(PYTHON) -m pip install --quiet -e ".[test]" && \
		mkdir -p .cache && touch $(STAMP); fi

# Start a single-node Ray head here unless one is reachable (the job then runs in this directory).
cluster-up: install
	@ray status >/dev/null 2>&1 || ray start --head --include-dashboard=true --disable-usage-stats

cluster-down:
	ray stop

sweep: cluster-up
	RAY_ADDRESS=$(RAY_DASHBOARD) ray job submit -- $(PYTHON) pipeline/sweep.py $(SWEEP_ARGS)

# The MLflow UI test drives Debian's chromium (browsers cannot be downloaded by the test tools).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: install browser
	$(PYTHON) -m pytest -q --durations=20 $(PYTEST_ARGS)
