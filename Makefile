PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/switchyard up

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy schemas router workers
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy schemas router workers

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_transport.py
	$(BIN)/python bench/bench_fleet.py
	$(BIN)/python bench/bench_pull.py
	$(BIN)/python bench/bench_door.py
	$(BIN)/python bench/bench_select.py
	$(BIN)/python bench/bench_health.py
	$(BIN)/python bench/bench_limits.py
	$(BIN)/python bench/bench_rate_leases.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_budget.py
	$(BIN)/python bench/bench_tracing.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
