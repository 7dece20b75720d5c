# Entry points: make demo | make test | make lint | make bench
# Every target sets up what it needs (OS packages, .venv, a project-private SoftHSM token).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOFTHSM_DIR := $(CURDIR)/.softhsm

export HSM_KEYS_SOFTHSM_DIR := $(SOFTHSM_DIR)
export SOFTHSM2_CONF := $(SOFTHSM_DIR)/softhsm2.conf
export HSM_KEYS_TOKEN_LABEL ?= hsm-keys-dev
export HSM_KEYS_PIN_FILE ?= $(SOFTHSM_DIR)/user.pin

.PHONY: setup os-packages venv token test lint demo bench clean

setup: os-packages venv token

os-packages:
	@bash scripts/ensure-os-packages.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[dev,cli]'
	@touch $@

token: os-packages
	@bash softhsm/setup-token.sh --dev >/dev/null

test: setup tests/policy/node_modules
	$(BIN)/python -m pytest

# Test-only IAM policy evaluator (node); installed from its lock file when missing.
tests/policy/node_modules: tests/policy/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd tests/policy && npm ci --silent --no-audit --no-fund && touch node_modules; \
	else echo "npm not found: install node and npm (>= 18) to run the IAM policy tests (tests/policy)" >&2; fi

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

demo: setup
	$(BIN)/hsm-keys demo

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(SOFTHSM_DIR) .pytest_cache .mypy_cache .ruff_cache
