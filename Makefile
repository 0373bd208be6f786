# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Re-installs only when the project's metadata changes; idempotent.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# Compile the digits recipe end to end (under a minute on 2 idle CPU cores) into runs/digits/.
demo: setup
	$(BIN)/cstar compile specs/digits.cstar --out runs/digits --force

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check cstar_dsl tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info
