# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
ARGS ?=

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## pair a simulated thermostat and wall panel; ARGS=--auto-approve for headless runs
	$(VENV)/bin/iotauth demo $(ARGS)

test: $(STAMP)  ## the whole suite, browser tests included (soak runs excluded)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)  ## also the long soak and fuzz runs
	$(VENV)/bin/python -m pytest -q -m "soak or not soak"

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## the five benchmarks of docs/performance.md (~7 min); ARGS=--smoke, --profile, --what-if PATCH
	$(VENV)/bin/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
