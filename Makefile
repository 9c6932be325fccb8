# fedldt: the two commands of a fresh machine are `make run` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PILOT  ?= los_loop_3
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install run test clean

# Virtual environment with fedldt (editable) and its dependencies; constraints.txt pins torch
# 2.13.0 (the CPU build from pip's find-links here; on public PyPI see the README) and Flower 1.42.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# The main job: a federated run of a pilot on the simulation engine.
run: install
	$(PY) scripts/simulate.py pilot=$(PILOT) $(ARGS)

# The whole test suite, the real-data federated run included.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
