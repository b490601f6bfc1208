# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install is pinned to the exact versions of constraints.txt, build tools included
# (--build-constraint pins what pip puts into the isolated build of faceveil itself).
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test install test-install weights lint wheel-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) --build-constraint constraints.txt -e '.[demo]'
	touch $@

install: $(STAMP)

# Oracles for parity tests: CPU torch (installs offline from the local wheel) and facenet-pytorch
# without its dependencies (it would pull torchvision, which has no CPU wheel here).
$(VENV)/.test-installed: $(STAMP)
	$(PIP) --build-constraint constraints.txt -e '.[test,demo,attacks]'
	$(PIP) torch==2.13.0
	$(PIP) --no-deps facenet-pytorch==2.6.0
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
