# Two entry points for a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# The tests' MLflow tracking server, in a virtualenv of its own: the full mlflow package pins
# pyarrow below 26, whose 24 and 25 crash in pyarrow.compute here; the pipeline needs the
# client only (the mlflow extra: mlflow-skinny).
MLFLOW_SERVER = $(VENV)/mlflow-server
# DuckDB's Iceberg reader for the tests (tests/readers/duckdb_iceberg.py): DuckDB 1.5.5 with its
# iceberg and avro extensions from PyPI, as ours is newer than any extension published there.
DUCKDB_ICEBERG = $(VENV)/duckdb-iceberg
TEST_TOOLS = $(VENV)/.test-tools

.PHONY: setup run test test-cluster kafka services lint bench bench-peers clean fuzz

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres,mqtt,delta,faust,iceberg,reports,mlflow]'
	touch $(STAMP)

setup: $(STAMP)

## What only the tests use, each in a virtualenv of its own (not needed by `make run`).
$(TEST_TOOLS): $(STAMP)
	$(PYTHON) -m venv $(MLFLOW_SERVER)
	$(MLFLOW_SERVER)/bin/pip install --quiet 'mlflow>=3.1,<4'
	$(PYTHON) -m venv $(DUCKDB_ICEBERG)
	$(DUCKDB_ICEBERG)/bin/pip install --quiet duckdb-extension-iceberg==1.5.5 duckdb-extension-avro==1.5.5
	touch $(TEST_TOOLS)

## The quickstart: generator → clean → river model → Parquet, on the embedded broker. Its
## Parquet folder starts empty (QUICKSTART_APPEND=1 keeps earlier runs' files, and counts them);
## its dead letters go to dead-letters.jsonl beside it, as the embedded broker ends with the run.
QUICKSTART_OUTPUT ?= ./output/quickstart
export QUICKSTART_OUTPUT
LAKE = $(QUICKSTART_OUTPUT)/sensors.scored

run: $(STAMP)
	@if [ "$(QUICKSTART_APPEND)" = 1 ]; then \
	  echo "appending to $(LAKE): the row count includes earlier runs"; \
	else rm -rf "$(LAKE)"; echo "starting from an empty $(LAKE) (QUICKSTART_APPEND=1 appends)"; fi
	@echo "Parquet output: $(LAKE)   dead letters: $(QUICKSTART_OUTPUT)/dead-letters.jsonl   lineage: $(QUICKSTART_OUTPUT)/lineage.ndjson   dashboard: http://127.0.0.1:$${STREAMFLOW_METRICS_PORT:-9108}/"
	$(BIN)/streamflow run examples/quickstart.yaml --until-idle $${UNTIL_IDLE:-5} \
	  --dlq-file "$(QUICKSTART_OUTPUT)/dead-letters.jsonl"
	@$(BIN)/python -c 'import duckdb, pathlib, sys; files = sorted(map(str, pathlib.Path(sys.argv[1]).rglob("*.parquet"))); print(f"rows in {sys.argv[1]}:", duckdb.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0] if files else 0)' "$(LAKE)"

## Debian's PostgreSQL, Mosquitto, Prometheus and Chromium, when missing (as root; else a warning).
services:
	@bash tests/install_services.sh

## Apache Kafka's jars (version pinned in tests/kafka/pom.xml) into ~/.cache/streamflow, checked.
kafka: $(STAMP)
	@if command -v java >/dev/null && command -v mvn >/dev/null; then \
	  $(BIN)/python -m tests.kafka_broker fetch; \
	else echo "no Java 17+ and Maven here: the tests use Docker's Kafka or the embedded Tansu"; fi

## The whole suite on Apache Kafka (slow soaks and benchmarks are excluded by the default markers),
## then a smoke subset on the embedded Tansu broker, so that `bootstrap: embedded` stays covered.
TANSU_SMOKE = tests/integration/test_transport_contract.py tests/integration/test_quickstart.py

## Idle workers take tests still queued on busy ones (worksteal): with xdist's default, one
## worker once ran its queue alone for the last 7 of 17 minutes.
test: $(STAMP) $(TEST_TOOLS) services kafka
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 3 --dist worksteal
	STREAMFLOW_TEST_BROKER=tansu $(BIN)/pytest -q -n 3 --dist worksteal $(TANSU_SMOKE)

## Broker failures on a three-node Kafka cluster under a 200,000-event pipeline (about 3 minutes).
test-cluster: $(STAMP) $(TEST_TOOLS) services kafka
	$(BIN)/pytest -q -s -m slow tests/integration/test_kafka_cluster.py

## Atheris fuzzing of the decoders and a processor stage (issue 13) for FUZZ_SECONDS (default 60);
## crashes are written to output/fuzz-crash-*, the corpus grows in output/fuzz-corpus.
fuzz: $(STAMP)
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install --quiet atheris
	@mkdir -p output
	PYTHONPATH=. $(BIN)/python tests/fuzz/fuzz_decoders.py -max_total_time=$${FUZZ_SECONDS:-60} \
	  -artifact_prefix=output/fuzz- -rss_limit_mb=4096 -timeout=60

bench: $(STAMP)
	$(BIN)/python -m benchmarks core --json benchmarks/results/core.json

## The peers `python -m benchmarks clean|model|latency` compares with (Quix Streams, Bytewax),
## pinned in benchmarks/peers/requirements.txt, in a venv of their own: their pins never bend ours.
PEERS_VENV = .venv-peers
bench-peers: $(STAMP)
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r benchmarks/peers/requirements.txt

clean:
	rm -rf $(VENV) $(PEERS_VENV) output .pytest_cache .ruff_cache
