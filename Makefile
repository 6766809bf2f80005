# The README's quick start: `make demo` and `make test`, each self-sufficient on a
# fresh machine (creates .venv and installs what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m ppllava_jax.demo --out out/demo

# Two workers, each taking whole files (their module and session fixtures are built once):
# much of the suite is single-threaded XLA compilation, so two cores run it in ~12 min, not ~19.
test: $(VENV)/.test
	$(PY) -m pytest -n 2 --dist loadfile tests

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade; the format) and mypy over
# the package; configured in pyproject.toml. `ruff format .` and `ruff check --fix .` fix
# most of what it finds.
lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.test
	$(PY) benchmarks/pooling.py --scale

clean:
	rm -rf $(VENV) out .pytest_cache
