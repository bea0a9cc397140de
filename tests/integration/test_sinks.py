"""The sinks through real pipelines: rows land once, tables evolve, upserts keep the last version,
bad records are dead-lettered with the reason, and an unreachable PostgreSQL is named."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from connectors.sinks.kafka import KafkaSink, KafkaSinkConfig
from connectors.sinks.postgres import PostgresConfig, PostgresSink
from streamflow.plugins import ComponentContext, TransientError
from streamflow.runtime.supervisor import is_transient
from streamflow.transport import create_transport
from streamflow.transport.broker import EmbeddedBroker
from tests.helpers import read_topic
from tests.sink_tables import (
    RunningPipeline,
    committed_offsets,
    delta_rows,
    duckdb_rows,
    iceberg_rows,
    iceberg_settings,
    postgres_names,
    postgres_rows,
    unique,
)

FIRST = [{"id": i, "name": f"device-{i}", "reading": i * 0.5} for i in range(40)]
# A field appears mid-stream: the second run's records carry ``score`` and a nested ``tags``.
SECOND = [{"id": i, "name": f"device-{i}", "reading": i * 0.5, "score": i, "tags": {"site": "x"}}
          for i in range(40, 60)]


def assert_reconciled(counts: dict[str, float], expected: dict[str, int]) -> None:
    """in = out + filtered + dead-lettered, with the expected out and dead-lettered counts."""
    assert counts["in"] == counts["out"] + counts["filtered"] + counts["dead_lettered"], counts
    assert {name: counts[name] for name in expected} == expected, counts


# Then valid JSON the table cannot hold (``score`` is a bigint column by now) and malformed JSON.
BAD = ['{"id": 100, "score": "lots"}', '{"id": 101, "score": "a few"}', "{not json"]
LAST = {"id": 102}


def land_evolve_and_reject(bootstrap: str, tmp_path: Path, sink_type: str,
                           pipeline: str | None = None, **settings: Any) -> None:
    """FIRST creates the table, SECOND adds columns, then BAD records are dead-lettered while
    LAST is written; each reaches the sink in batches of its own."""
    with RunningPipeline(bootstrap, tmp_path, sink_type, pipeline, **settings) as running:
        running.feed(FIRST)
        running.feed(SECOND)
        running.feed([*BAD, LAST])
        result = running.stop()
    assert result.exit_code == 0, result.errors
    assert_reconciled(running.counts(), {"out": 61, "dead_lettered": len(BAD)})
    dead = read_topic(bootstrap, f"{running.pipeline}.dlq")
    letters = {value.decode(): dict(headers or []) for value, headers
               in zip(dead.values, dead.headers, strict=True)}
    assert set(letters) == set(BAD)
    assert letters["{not json"]["streamflow.step"] == b"parse"
    conflict = letters[BAD[0]]
    assert conflict["streamflow.step"] == b"sink"
    assert conflict["streamflow.stage"] == b"out"
    assert conflict["streamflow.error.class"] == b"ColumnTypeError"
    assert b"'score'" in conflict["streamflow.error.message"]
    assert b"lots" in conflict["streamflow.error.message"]
    assert conflict["streamflow.original.topic"] == b"raw"


def check_rows(rows: Any) -> None:
    """Each written record once; columns added mid-stream are null for the earlier rows."""
    ids = rows.column("id").to_pylist()
    assert sorted(ids) == [*range(60), LAST["id"]], "a record is missing or was written twice"
    by_id = dict(zip(ids, rows.column("score").to_pylist(), strict=True))
    assert [by_id[i] for i in range(38, 42)] == [None, None, 40, 41]
    tags = {json.dumps(t) if isinstance(t, dict) else t for t in rows.column("tags").to_pylist()}
    assert tags - {None} in ({'{"site": "x"}'}, {json.dumps(json.dumps({"site": "x"}))})


def test_postgres_lands_once_evolves_and_dead_letters(
    fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    with postgres_names(postgres_dsn) as (pipeline, table):
        land_evolve_and_reject(fresh_broker, tmp_path, "postgres", pipeline, dsn=postgres_dsn,
                               table=table)
        check_rows(postgres_rows(postgres_dsn, table))
        with psycopg.connect(postgres_dsn) as connection:
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


def test_duckdb_lands_once_evolves_and_dead_letters(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    land_evolve_and_reject(fresh_broker, tmp_path, "duckdb", path=str(path), table="readings")
    check_rows(duckdb_rows(path, "readings"))


def test_delta_lands_once_evolves_and_dead_letters(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "readings"
    land_evolve_and_reject(fresh_broker, tmp_path, "delta", path=str(path))
    check_rows(delta_rows(path))


def test_iceberg_lands_once_evolves_and_dead_letters(fresh_broker: str, tmp_path: Path) -> None:
    land_evolve_and_reject(fresh_broker, tmp_path, "iceberg",
                           **iceberg_settings(tmp_path, "lake.readings"))
    check_rows(iceberg_rows(tmp_path, "lake.readings"))


def test_iceberg_on_a_postgresql_catalog_lands_once_evolves_and_dead_letters(
    fresh_broker: str, postgres_dsn: str, tmp_path: Path
) -> None:
    """The catalog in PostgreSQL (pyiceberg's SQL catalog through SQLAlchemy and psycopg), the
    data files in a local warehouse folder."""
    table = f"lake.readings_{uuid.uuid4().hex[:8]}"
    catalog = {"name": "pg", "properties": {
        "type": "sql", "uri": postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1),
        "warehouse": f"file://{tmp_path}/iceberg"}}
    land_evolve_and_reject(fresh_broker, tmp_path, "iceberg", table=table, catalog=catalog)
    check_rows(load_catalog("pg", **catalog["properties"]).load_table(table).scan().to_arrow())


VERSIONS = [{"id": i % 5, "version": i, **({"note": f"v{i}"} if i % 2 else {})} for i in range(30)]


def upsert(bootstrap: str, tmp_path: Path, sink_type: str, pipeline: str | None = None,
           **settings: Any) -> None:
    """Two feeds of versions (the second one also updates keys written by the first)."""
    with RunningPipeline(bootstrap, tmp_path, sink_type, pipeline, mode="upsert", keys=["id"],
                         **settings) as running:
        running.feed(VERSIONS[:12])
        running.feed(VERSIONS[12:])
        assert running.stop().exit_code == 0


def check_last_versions(rows: Any) -> None:
    latest = dict(zip(rows.column("id").to_pylist(), rows.column("version").to_pylist(),
                      strict=True))
    assert rows.num_rows == 5
    assert latest == {key: max(i for i in range(30) if i % 5 == key) for key in range(5)}
    notes = dict(zip(rows.column("id").to_pylist(), rows.column("note").to_pylist(), strict=True))
    assert notes == {key: f"v{latest[key]}" if latest[key] % 2 else None for key in range(5)}


def test_postgres_upsert_keeps_the_last_version_of_each_key(
    fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    with postgres_names(postgres_dsn) as (pipeline, table):
        upsert(fresh_broker, tmp_path, "postgres", pipeline, dsn=postgres_dsn, table=table)
        check_last_versions(postgres_rows(postgres_dsn, table))


def test_duckdb_upsert_keeps_the_last_version_of_each_key(fresh_broker: str,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    upsert(fresh_broker, tmp_path, "duckdb", path=str(path), table="latest")
    check_last_versions(duckdb_rows(path, "latest"))


def test_iceberg_upsert_keeps_the_last_version_of_each_key(fresh_broker: str,
                                                           tmp_path: Path) -> None:
    upsert(fresh_broker, tmp_path, "iceberg", **iceberg_settings(tmp_path, "lake.latest"))
    check_last_versions(iceberg_rows(tmp_path, "lake.latest"))


def test_postgres_dead_letters_rows_the_database_rejects(
    fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    """A constraint only PostgreSQL knows: the rejected rows are found and dead-lettered alone."""
    with postgres_names(postgres_dsn) as (pipeline, table):
        with psycopg.connect(postgres_dsn) as connection:
            connection.execute(f'CREATE TABLE "{table}" (id bigint, amount double precision '
                               "CHECK (amount >= 0))")
        with RunningPipeline(fresh_broker, tmp_path, "postgres", pipeline, dsn=postgres_dsn,
                             table=table) as running:
            running.feed([{"id": i, "amount": -1.0 if i in (3, 7) else 1.0} for i in range(20)])
            assert running.stop().exit_code == 0
        assert_reconciled(running.counts(), {"out": 18, "dead_lettered": 2})
        assert sorted(postgres_rows(postgres_dsn, table).column("id").to_pylist()) == [
            i for i in range(20) if i not in (3, 7)]
        dead = read_topic(fresh_broker, f"{pipeline}.dlq")
        assert sorted(json.loads(value)["id"] for value in dead.values) == [3, 7]
        message = dict(dead.headers[0] or [])["streamflow.error.message"]
        assert b"PostgreSQL rejected the record" in message and b"check constraint" in message


def test_postgres_refuses_offsets_another_writer_moved(postgres_dsn: str) -> None:
    """A replica that lost its partitions (but not yet its connection) cannot commit rows the
    new owner already wrote: its flush finds the stored offsets moved and rolls back."""
    with postgres_names(postgres_dsn) as (pipeline, table):
        config = PostgresConfig(dsn=postgres_dsn, table=table)
        stale, owner = (PostgresSink(config, ComponentContext(pipeline, "out")) for _ in range(2))
        partition = ("raw", 0)
        try:
            for sink in (stale, owner):
                sink.open()
                assert sink.resume_offsets([partition], "cluster") == {}
            owner.write(pa.table({"id": [1, 2]}), partition, 0)
            owner.flush({partition: 2}, "cluster")
            stale.write(pa.table({"id": [1, 2]}), partition, 0)
            with pytest.raises(TransientError, match="moved by another writer"):
                stale.flush({partition: 2}, "cluster")
            assert owner.resume_offsets([partition], "cluster") == {partition: 2}
            assert owner.resume_offsets([partition], "another cluster") == {}
        finally:
            stale.close()
            owner.close()
        assert sorted(postgres_rows(postgres_dsn, table).column("id").to_pylist()) == [1, 2]


def test_kafka_sink_produces_each_record_keyed(fresh_broker: str, tmp_path: Path) -> None:
    with RunningPipeline(fresh_broker, tmp_path, "kafka", topic="copied", partitions=3,
                         key_field="id") as running:
        running.feed([*FIRST, "{not json"])
        assert running.stop().exit_code == 0
    assert_reconciled(running.counts(), {"out": len(FIRST), "dead_lettered": 1})
    copied = read_topic(fresh_broker, "copied")
    records = [json.loads(value) for value in copied.values]
    assert sorted(record["id"] for record in records) == list(range(40))
    assert records[0] == FIRST[records[0]["id"]]
    assert all(key == str(record["id"]).encode()
               for key, record in zip(copied.keys, records, strict=True))
    assert set(copied.partitions) == {0, 1, 2}
    assert read_topic(fresh_broker, f"{running.pipeline}.dlq").values == [b"{not json"]


def test_kafka_sink_produces_to_another_cluster(fresh_broker: str) -> None:
    """``cluster`` names the cluster to produce to (here a second, separate broker)."""
    with EmbeddedBroker() as other:
        sink = KafkaSink(KafkaSinkConfig(topic="copy", cluster={"bootstrap": other.bootstrap}),
                         ComponentContext("p", "mirror", create_transport("confluent", fresh_broker)))
        sink.open()
        try:
            sink.write(pa.table({"id": [1, 2]}), ("raw", 0), 0)
            sink.flush({("raw", 0): 2}, "cluster")
        finally:
            sink.close()
        assert read_topic(other.bootstrap, "copy").values == [b'{"id":1}', b'{"id":2}']


def test_console_sink_prints_json_lines(fresh_broker: str, tmp_path: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    with RunningPipeline(fresh_broker, tmp_path, "console") as running:
        running.feed([*FIRST, "{not json"])
        assert running.stop().exit_code == 0
    assert_reconciled(running.counts(), {"out": len(FIRST), "dead_lettered": 1})
    printed = [json.loads(line) for line in capfd.readouterr().out.splitlines()
               if line.startswith("{")]
    assert sorted(printed, key=lambda record: record["id"]) == FIRST
    assert read_topic(fresh_broker, f"{running.pipeline}.dlq").values == [b"{not json"]


def test_unreachable_postgres_is_named_and_retried() -> None:
    config = PostgresConfig(dsn="postgresql://postgres@127.0.0.1:1/test", table="t",
                            connect_timeout_s=2)
    sink = PostgresSink(config, ComponentContext("p", "warehouse"))
    with pytest.raises(TransientError) as raised:
        sink.open()
    assert str(raised.value).startswith("PostgreSQL at 127.0.0.1:1: ")
    assert "refused" in str(raised.value)
    assert is_transient(raised.value)


def test_wrong_postgres_database_is_fatal(postgres_dsn: str) -> None:
    config = PostgresConfig(dsn=f"{postgres_dsn}_{unique('missing')}", table="t")
    sink = PostgresSink(config, ComponentContext("p", "warehouse"))
    address = re.escape(sink.address)
    with pytest.raises(RuntimeError, match=rf"PostgreSQL at {address}: .*does not exist"):
        sink.open()
