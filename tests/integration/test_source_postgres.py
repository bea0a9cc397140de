"""The postgres source against the local PostgreSQL: incremental rows as JSON, ties across poll
boundaries, exact resume after SIGKILL, and a clear error for an unreachable server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from connectors.sources.postgres import PostgresConfig, PostgresSource, quote_identifier
from streamflow.plugins import ComponentContext, TransientError
from streamflow.transport.broker import free_port
from tests.helpers import read_topic
from tests.source_runs import TopicWatcher, kill_and_restart, running, source_pipeline, unique


@pytest.fixture
def table(postgres_dsn: str) -> Iterator[str]:
    name = unique("orders").replace("-", "_")
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(
            f"CREATE TABLE {name} (id serial PRIMARY KEY, updated_at timestamptz NOT NULL, "
            "amount numeric(12, 2), day date, tags text[], note text)"
        )
        yield name
        connection.execute(f"DROP TABLE {name}")


def insert(dsn: str, table: str, rows: list[tuple[str, str, str]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.cursor().executemany(
            f"INSERT INTO {table} (updated_at, amount, day, tags, note) "
            "VALUES (%s, %s, '2025-01-31', ARRAY['a', 'b'], %s)", rows,
        )


def test_rows_with_equal_tracking_values_across_poll_boundaries(
    bootstrap: str, postgres_dsn: str, table: str
) -> None:
    topic = unique("rows")
    same = "2025-01-01T00:00:00+00:00"
    insert(postgres_dsn, table, [(same, "1.50", "first"), (same, "2.25", "second"), (same, "3.00", "third"),
                   ("2025-01-01T00:00:01+00:00", "4.00", "fourth")])
    pipeline = source_pipeline(bootstrap, "postgres", topic, dsn=postgres_dsn, table=table,
                               tracking_column="updated_at", tie_breaker="id", key_field="id",
                               poll_interval_s=0.1)
    pipeline["runtime"] = {"batch": {"max_records": 2}}  # a boundary inside the equal values
    with running(pipeline):
        watcher = TopicWatcher(bootstrap, topic)
        watcher.wait_for(4)
        insert(postgres_dsn, table, [(same, "9.99", "late, equal to an old value: not seen"),
                       ("2025-01-02T00:00:00+00:00", "5.00", "fifth")])
        watcher.wait_for(5)
        watcher.close()
    records = read_topic(bootstrap, topic)
    rows = [json.loads(value) for value in records.values]
    assert [row["note"] for row in rows] == ["first", "second", "third", "fourth", "fifth"]
    assert records.keys == [b"1", b"2", b"3", b"4", b"6"]
    assert rows[0] == {"id": 1, "updated_at": "2025-01-01T00:00:00+00:00", "amount": 1.5,
                       "day": "2025-01-31", "tags": ["a", "b"], "note": "first"}


def test_a_query_with_a_strictly_increasing_column(
    bootstrap: str, postgres_dsn: str, table: str
) -> None:
    topic = unique("rows")
    insert(postgres_dsn, table, [(f"2025-01-01T00:00:0{i}+00:00", f"{i}.00", f"n{i}") for i in range(5)])
    pipeline = source_pipeline(
        bootstrap, "postgres", topic, dsn=postgres_dsn, tracking_column="id", start_after=1,
        query=f"SELECT id, amount * 2 AS doubled FROM {quote_identifier(table)} WHERE id <> 4",
        decimals="string",
    )
    with running(pipeline):
        TopicWatcher(bootstrap, topic).wait_for(3)
    assert [json.loads(v) for v in read_topic(bootstrap, topic).values] == [
        {"id": 2, "doubled": "2.00"}, {"id": 3, "doubled": "4.00"}, {"id": 5, "doubled": "8.00"}
    ]


def test_sigkill_mid_stream_then_restart_copies_every_row_once(
    tmp_path: Path, bootstrap: str, postgres_dsn: str, table: str
) -> None:
    topic = unique("rows")
    stop = threading.Event()
    inserted = [0]

    def writer() -> None:
        while not stop.is_set() and inserted[0] < 3000:
            insert(postgres_dsn, table, [("2025-01-01T00:00:00+00:00", "1.00", f"row {inserted[0] + i}")
                           for i in range(10)])
            inserted[0] += 10
            time.sleep(0.01)

    pipeline = source_pipeline(bootstrap, "postgres", topic, partitions=2, dsn=postgres_dsn,
                               table=table, tracking_column="id", poll_interval_s=0.05)
    pipeline["runtime"] = {"batch": {"max_records": 25}}
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()

    def stop_writing() -> None:
        stop.set()
        thread.join(10)

    watcher = TopicWatcher(bootstrap, topic, partitions=2)
    try:
        kill_and_restart(pipeline, tmp_path, before_kill=lambda: watcher.wait_for(300, timeout_s=40),
                         while_down=stop_writing,
                         after_restart=lambda: watcher.wait_for(inserted[0], timeout_s=40))
    finally:
        watcher.close()
    notes = [json.loads(v)["note"] for v in read_topic(bootstrap, topic).values]
    assert len(notes) == inserted[0] == len(set(notes)), "a row was lost or copied twice"


def test_an_unreachable_server_names_postgresql_and_its_address() -> None:
    port = free_port()
    source = PostgresSource(
        PostgresConfig(dsn=f"host=127.0.0.1 port={port} dbname=test user=postgres",
                       table="t", tracking_column="id", connect_timeout_s=2),
        ComponentContext("p", "pg"),
    )
    with pytest.raises(TransientError, match=f"PostgreSQL at 127.0.0.1:{port} is unreachable"):
        source.open(None)


def test_table_or_query_is_required() -> None:
    with pytest.raises(ValueError, match="exactly one of table"):
        PostgresConfig(tracking_column="id")
