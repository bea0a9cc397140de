# Two entry points for a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres,mqtt,delta,faust]'
	touch $(STAMP)

setup: $(STAMP)

## The quickstart: generator → clean → river model → Parquet, on the embedded broker.
run: $(STAMP)
	@echo "Parquet output: ./output/quickstart   live metrics: http://127.0.0.1:9108/metrics"
	$(BIN)/streamflow run examples/quickstart.yaml --until-idle $${UNTIL_IDLE:-5}
	@$(BIN)/python -c "import duckdb; print('rows in ./output/quickstart:', duckdb.sql(\"SELECT count(*) FROM read_parquet('output/quickstart/**/*.parquet')\").fetchall()[0][0])"

## The whole test suite (slow soak and benchmark runs are excluded by the default markers).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 3

bench: $(STAMP)
	$(BIN)/python -m benchmarks core --json benchmarks/results/core.json

clean:
	rm -rf $(VENV) output .pytest_cache .ruff_cache
