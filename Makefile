# unibus: `make run` sets up a venv and runs the daemon; `make test` sets up and runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXAMPLE_VENV ?= .venv-example
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed-stamp
# Four workers, a test file each at a time (module fixtures stay together), the
# longest files first (LONGEST_FIRST in tests/conftest.py; --no-loadscope-reorder keeps
# that order, which pytest-xdist 3.8 would replace with the files' test counts). Most
# tests wait on daemons and clusters: on 2 cores four workers took pytest from 9:41
# with three to 8:22-8:31 here (README.md).
PYTEST_ARGS ?= -n 4 --dist loadfile --no-loadscope-reorder
DATA_DIR ?= ./local_files

.PHONY: install run test test-fast test-example wheel-check bench bench-clean lint readme clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/membershipd serve --data-dir $(DATA_DIR)

# The whole suite, as CI runs it: unit + integration tests (slow ones included),
# the example plugin's own tests, and a regular (non-editable) wheel install.
# The last two are independent and mostly wait on pip: they run side by side
# (about 20 s sooner on 2 cores), each one's output kept together.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) -j2 --output-sync=target test-example wheel-check

# Locally: skip the slow cluster/large-blob tests.
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

$(EXAMPLE_STAMP): pyproject.toml examples/unibus-hello-plugin/pyproject.toml examples/unibus-audit-plugin/pyproject.toml
	$(PYTHON) -m venv $(EXAMPLE_VENV)
	$(EXAMPLE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EXAMPLE_VENV)/bin/python -m pip install --quiet -e . -e 'examples/unibus-hello-plugin[test]' \
		-e 'examples/unibus-audit-plugin[test]'
	touch $(EXAMPLE_STAMP)

# Each example plugin's own tests, with both examples installed (as a user would have them).
test-example: $(EXAMPLE_STAMP)
	cd examples/unibus-hello-plugin && ../../$(EXAMPLE_VENV)/bin/python -m pytest -q
	cd examples/unibus-audit-plugin && ../../$(EXAMPLE_VENV)/bin/python -m pytest -q

wheel-check: install
	bash .ci/wheel-check

# Every bench/bench_*.py; each writes its own section of docs/benchmarks.md. On a CPU with
# SHA extensions (x86), the blob bench runs again as on one without (its own section).
bench: install
	set -e; for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done
	if grep -qw sha_ni /proc/cpuinfo 2>/dev/null; then echo "== bench/bench_blobs.py --no-sha-ext"; \
		$(PY) bench/bench_blobs.py --no-sha-ext; fi

# The earlier releases bench/baseline.py built under bench/.baselines/ (worktrees and venvs).
bench-clean:
	$(PYTHON) bench/baseline.py clean

lint: install
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check core plugins tests bench migrations examples

# README.md's flag table of membershipd serve, from the option table (core/options.py).
readme: install
	$(PY) -m unibus.options --write-readme README.md

clean:
	rm -rf $(VENV) $(EXAMPLE_VENV) build dist *.egg-info .pytest_cache
