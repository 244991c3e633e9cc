PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt

.PHONY: demo test test-fast bench clean

# Idempotent: re-runs pip only when setup.cfg or the constraints change.
$(BIN)/focaldet: setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

.venv: $(BIN)/focaldet

demo: .venv
	$(BIN)/python scripts/demo.py

test: .venv
	$(BIN)/python -m pytest -q --durations=15

test-fast: .venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: .venv
	$(BIN)/focaldet bench

clean:
	rm -rf $(VENV) build *.egg-info
