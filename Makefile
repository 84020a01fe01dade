# The two commands of the README: `make demo` and `make test`. Both set up .venv first;
# the set-up is skipped when pyproject.toml and constraints.txt have not changed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test faults bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/prefcurate demo --out demo-out

test: setup
	PREFECT_HOME=$$(mktemp -d) $(VENV)/bin/python -m pytest

# The fault suite alone (tests marked `faults`): kill -9 at every commit step of every writer, bad inputs.
faults: setup
	PREFECT_HOME=$$(mktemp -d) $(VENV)/bin/python -m pytest -m faults -q tests/test_faults.py

bench: setup
	$(VENV)/bin/python benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
