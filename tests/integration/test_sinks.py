"""The sinks through real pipelines: rows land once, tables evolve, upserts keep the last version,
bad records are dead-lettered with the reason, and an unreachable PostgreSQL is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connectors.sinks.postgres import PostgresConfig, PostgresSink
from streamflow.plugins import ComponentContext, TransientError
from streamflow.runtime.supervisor import is_transient
from tests.helpers import read_topic
from tests.sink_tables import (
    POSTGRES_DSN,
    append_records,
    committed_offsets,
    delta_rows,
    duckdb_rows,
    postgres_names,
    postgres_rows,
    run_to_sink,
    stage_counts,
    unique,
)

FIRST = [{"id": i, "name": f"device-{i}", "reading": i * 0.5} for i in range(40)]
# A field appears mid-stream: the second run's records carry ``score`` and a nested ``tags``.
SECOND = [{"id": i, "name": f"device-{i}", "reading": i * 0.5, "score": i, "tags": {"site": "x"}}
          for i in range(40, 60)]


def assert_reconciled(runner: Any, dead_letters: int) -> None:
    counts = stage_counts(runner)
    assert counts["in"] == counts["out"] + counts["filtered"] + counts["dead_lettered"], counts
    assert counts["dead_lettered"] == dead_letters


def check_landed_once_with_new_columns(rows: Any) -> None:
    ids = rows.column("id").to_pylist()
    assert sorted(ids) == list(range(60)), "a record is missing or was written twice"
    by_id = dict(zip(ids, rows.column("score").to_pylist(), strict=True))
    assert [by_id[i] for i in range(38, 42)] == [None, None, 40, 41]
    tags = {json.dumps(t) if isinstance(t, dict) else t for t in rows.column("tags").to_pylist()}
    assert tags - {None} in ({'{"site": "x"}'}, {json.dumps(json.dumps({"site": "x"}))})


def run_twice(fresh_broker: str, tmp_path: Path, pipeline: str, sink_type: str,
              **settings: Any) -> None:
    append_records(tmp_path / "data-1.jsonl", FIRST)
    result, runner = run_to_sink(fresh_broker, pipeline, tmp_path / "data-1.jsonl", sink_type,
                                 **settings)
    assert result.exit_code == 0, result.errors
    assert_reconciled(runner, 0)
    append_records(tmp_path / "data-2.jsonl", SECOND)
    result, runner = run_to_sink(fresh_broker, pipeline, tmp_path / "data-2.jsonl", sink_type,
                                 **settings)
    assert result.exit_code == 0, result.errors
    assert stage_counts(runner)["out"] == len(SECOND), stage_counts(runner)


def test_postgres_writes_once_and_adds_columns(fresh_broker: str, tmp_path: Path) -> None:
    with postgres_names() as (pipeline, table):
        run_twice(fresh_broker, tmp_path, pipeline, "postgres", dsn=POSTGRES_DSN, table=table)
        check_landed_once_with_new_columns(postgres_rows(table))
        with psycopg.connect(POSTGRES_DSN) as connection:
            types = dict(connection.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = %s", (table,)).fetchall())
            stored = connection.execute(
                "SELECT partition, next_offset FROM streamflow_offsets WHERE pipeline = %s",
                (pipeline,)).fetchall()
        assert types == {"id": "bigint", "name": "text", "reading": "double precision",
                         "score": "bigint", "tags": "jsonb"}
        # The offsets stored with the rows are those committed to Kafka.
        assert dict(stored) == committed_offsets(fresh_broker, f"{pipeline}.out", "raw", 2)


def test_duckdb_writes_once_and_adds_columns(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    run_twice(fresh_broker, tmp_path, unique("pl"), "duckdb", path=str(path), table="readings")
    check_landed_once_with_new_columns(duckdb_rows(path, "readings"))


def test_delta_writes_once_and_adds_columns(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "readings"
    run_twice(fresh_broker, tmp_path, unique("pl"), "delta", path=str(path))
    check_landed_once_with_new_columns(delta_rows(path))


VERSIONS = [{"id": i % 5, "version": i, **({"note": f"v{i}"} if i % 2 else {})} for i in range(30)]


def check_last_versions(rows: Any) -> None:
    latest = dict(zip(rows.column("id").to_pylist(), rows.column("version").to_pylist(),
                      strict=True))
    assert rows.num_rows == 5
    assert latest == {key: max(i for i in range(30) if i % 5 == key) for key in range(5)}


def test_postgres_upsert_keeps_the_last_version_of_each_key(fresh_broker: str,
                                                            tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    append_records(data, VERSIONS)
    with postgres_names() as (pipeline, table):
        result, _runner = run_to_sink(fresh_broker, pipeline, data, "postgres", dsn=POSTGRES_DSN,
                                      table=table, mode="upsert", keys=["id"])
        assert result.exit_code == 0, result.errors
        check_last_versions(postgres_rows(table))


def test_duckdb_upsert_keeps_the_last_version_of_each_key(fresh_broker: str,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    append_records(data, VERSIONS)
    path = tmp_path / "warehouse.duckdb"
    result, _runner = run_to_sink(fresh_broker, unique("pl"), data, "duckdb", path=str(path),
                                  table="latest", mode="upsert", keys=["id"])
    assert result.exit_code == 0, result.errors
    check_last_versions(duckdb_rows(path, "latest"))


GOOD = [{"id": i, "amount": float(i)} for i in range(10)]
# Valid JSON that the table cannot hold (amount is a number column), and malformed JSON.
BAD = ['{"id": 100, "amount": "lots"}', '{"id": 101, "amount": "a few"}', "{not json"]


def run_bad_input(bootstrap: str, tmp_path: Path, pipeline: str, sink_type: str,
                  **settings: Any) -> dict[str, dict[str, bytes]]:
    """First a run that creates the table from good records, then one with bad records."""
    append_records(tmp_path / "data-1.jsonl", GOOD)
    result, _runner = run_to_sink(bootstrap, pipeline, tmp_path / "data-1.jsonl", sink_type,
                                  **settings)
    assert result.exit_code == 0, result.errors
    # Within one batch the bad records agree on types (else decoding already fails them).
    append_records(tmp_path / "data-2.jsonl", [*BAD, {"id": 11}])
    result, runner = run_to_sink(bootstrap, pipeline, tmp_path / "data-2.jsonl", sink_type,
                                 **settings)
    assert result.exit_code == 0, result.errors
    assert_reconciled(runner, len(BAD))
    dead = read_topic(bootstrap, f"{pipeline}.dlq")
    letters = {value.decode(): dict(headers or []) for value, headers
               in zip(dead.values, dead.headers, strict=True)}
    assert set(letters) == set(BAD)
    assert letters["{not json"]["streamflow.step"] == b"parse"
    conflict = letters['{"id": 100, "amount": "lots"}']
    assert conflict["streamflow.step"] == b"sink"
    assert conflict["streamflow.stage"] == b"out"
    assert conflict["streamflow.error.class"] == b"ColumnTypeError"
    assert b"'amount'" in conflict["streamflow.error.message"]
    assert b"lots" in conflict["streamflow.error.message"]
    assert conflict["streamflow.original.topic"] == b"raw"
    return letters


def test_postgres_dead_letters_records_it_cannot_write(fresh_broker: str, tmp_path: Path) -> None:
    with postgres_names() as (pipeline, table):
        run_bad_input(fresh_broker, tmp_path, pipeline, "postgres", dsn=POSTGRES_DSN, table=table)
        assert sorted(postgres_rows(table).column("id").to_pylist()) == [*range(10), 11]


def test_postgres_dead_letters_rows_the_database_rejects(fresh_broker: str,
                                                         tmp_path: Path) -> None:
    """A constraint only PostgreSQL knows: the rejected rows are found and dead-lettered alone."""
    with postgres_names() as (pipeline, table):
        with psycopg.connect(POSTGRES_DSN) as connection:
            connection.execute(f'CREATE TABLE "{table}" (id bigint, amount double precision '
                               "CHECK (amount >= 0))")
        data = tmp_path / "data.jsonl"
        append_records(data, [{"id": i, "amount": -1.0 if i in (3, 7) else 1.0} for i in range(20)])
        result, runner = run_to_sink(fresh_broker, pipeline, data, "postgres", dsn=POSTGRES_DSN,
                                     table=table)
        assert result.exit_code == 0, result.errors
        assert_reconciled(runner, 2)
        assert sorted(postgres_rows(table).column("id").to_pylist()) == [
            i for i in range(20) if i not in (3, 7)]
        dead = read_topic(fresh_broker, f"{pipeline}.dlq")
        assert sorted(json.loads(value)["id"] for value in dead.values) == [3, 7]
        message = dict(dead.headers[0] or [])["streamflow.error.message"]
        assert b"PostgreSQL rejected the record" in message and b"check constraint" in message


def test_duckdb_dead_letters_records_it_cannot_write(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    run_bad_input(fresh_broker, tmp_path, unique("pl"), "duckdb", path=str(path), table="t")
    assert sorted(duckdb_rows(path, "t").column("id").to_pylist()) == [*range(10), 11]


def test_delta_dead_letters_records_it_cannot_write(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "table"
    run_bad_input(fresh_broker, tmp_path, unique("pl"), "delta", path=str(path))
    assert sorted(delta_rows(path).column("id").to_pylist()) == [*range(10), 11]


def test_kafka_sink_produces_each_record_keyed(fresh_broker: str, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    append_records(data, [*FIRST, "{not json"])
    pipeline = unique("pl")
    # The pipeline's own cluster by default; an explicit cluster for the second sink's topic.
    result, runner = run_to_sink(fresh_broker, pipeline, data, "kafka", topic="copied",
                                 partitions=3, key_field="id",
                                 cluster={"bootstrap": fresh_broker, "config": {"linger.ms": 5}})
    assert result.exit_code == 0, result.errors
    assert_reconciled(runner, 1)
    copied = read_topic(fresh_broker, "copied")
    records = [json.loads(value) for value in copied.values]
    assert sorted(record["id"] for record in records) == list(range(40))
    assert records[0] == FIRST[records[0]["id"]]
    assert all(key == str(record["id"]).encode()
               for key, record in zip(copied.keys, records, strict=True))
    assert {partition for partition in copied.partitions} == {0, 1, 2}
    dead = read_topic(fresh_broker, f"{pipeline}.dlq")
    assert dead.values == [b"{not json"]


def test_kafka_sink_defaults_to_the_pipeline_cluster(fresh_broker: str, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    append_records(data, FIRST)
    result, _runner = run_to_sink(fresh_broker, unique("pl"), data, "kafka", topic="copy")
    assert result.exit_code == 0, result.errors
    assert len(read_topic(fresh_broker, "copy")) == len(FIRST)


def test_console_sink_prints_json_lines(fresh_broker: str, tmp_path: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.jsonl"
    append_records(data, [*FIRST, "{not json"])
    pipeline = unique("pl")
    result, runner = run_to_sink(fresh_broker, pipeline, data, "console")
    assert result.exit_code == 0, result.errors
    assert_reconciled(runner, 1)
    printed = [json.loads(line) for line in capfd.readouterr().out.splitlines()
               if line.startswith("{")]
    assert sorted(printed, key=lambda record: record["id"]) == FIRST
    assert read_topic(fresh_broker, f"{pipeline}.dlq").values == [b"{not json"]


def test_unreachable_postgres_is_named_and_retried() -> None:
    config = PostgresConfig(dsn="postgresql://postgres@127.0.0.1:1/test", table="t",
                            connect_timeout_s=2)
    sink = PostgresSink(config, ComponentContext("p", "warehouse"))
    with pytest.raises(TransientError) as raised:
        sink.open()
    assert str(raised.value).startswith("PostgreSQL at 127.0.0.1:1: ")
    assert "refused" in str(raised.value)
    assert is_transient(raised.value)


def test_wrong_postgres_database_is_fatal() -> None:
    config = PostgresConfig(dsn=f"{POSTGRES_DSN}_{unique('missing')}", table="t")
    sink = PostgresSink(config, ComponentContext("p", "warehouse"))
    with pytest.raises(RuntimeError, match=r"PostgreSQL at 127\.0\.0\.1:5432: .*does not exist"):
        sink.open()
