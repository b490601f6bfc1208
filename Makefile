# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install test-install weights lint wheel-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

install: $(STAMP)

# Oracles for parity tests: CPU torch (installs offline from the local wheel) and facenet-pytorch
# without its dependencies (it would pull torchvision, which has no CPU wheel here).
$(VENV)/.test-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps facenet-pytorch==2.6.0
	touch $@

test-install: $(VENV)/.test-installed

weights: $(STAMP)
	$(BIN)/faceveil fetch-weights

demo: weights
	$(BIN)/faceveil demo --out out/demo

test: test-install weights
	$(BIN)/python -m pytest tests -q

lint: test-install
	$(BIN)/ruff check .

clean:
	rm -rf build dist *.egg-info out
