# `make run` and `make test` do all the set-up a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Running needs only the runtime dependencies; tests, lint and benchmarks add the `test` extra.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: run test check bench bench-quick bench-fairness clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/ratatoskr serve $(RUN_ARGS)

test: check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Lint, format and strict types: zero findings, or `make test` stops here.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Against Postfix (bench/run.py), then cluster mode: SQLite vs one and two PostgreSQL nodes
# (bench/cluster.py; needs the PostgreSQL of docs/cluster.md, `--dsn` to point elsewhere).
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/cluster.py $(CLUSTER_BENCH_ARGS)

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

# Another client's NOOP and end-of-DATA p50/p99 (ms) while hostile clients flood (issue 13).
bench-fairness: $(STAMP)
	$(BIN)/python bench/fairness.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var outbox .pytest_cache *.egg-info
