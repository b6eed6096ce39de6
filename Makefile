# Newcomer entry points: `make setup`, then `make run`; `make test` runs the default test suite.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run lint test test-all check-base team-check

setup:  ## create .venv and install the project with pinned dependencies (about 4 minutes)
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/datencoder --help > /dev/null

run:  ## the main job on the embedded toy default: the Prefect retrain flow (docs/orchestration.md)
	$(BIN)/datencoder pipeline

lint:  ## ruff (its rules: [tool.ruff] in pyproject.toml)
	$(BIN)/ruff check .

test:  ## ruff, then the default suite (fast; heavier tests are marked slow)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-all:
	$(BIN)/pytest -q -m "slow or not slow"

team-check:  ## the team stack (infra/compose.yaml) rehearsed as local processes on loopback; one JSON line (docs/team.md)
	$(BIN)/python infra/team_check.py
