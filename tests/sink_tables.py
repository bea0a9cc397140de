"""Helpers for sink tests: run a file → topic → sink pipeline and read each sink's output back."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition
from deltalake import DeltaTable
from pyiceberg.catalog import load_catalog

from streamflow.api import Pipeline
from streamflow.runtime.pipeline import PipelineRunner, RunResult

# Short sessions: quicker group joins, and a killed member leaves its group sooner.
FAST_GROUPS = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def append_records(path: Path, records: list[dict[str, Any] | str]) -> None:
    """Append JSON lines (a string is written as is, e.g. malformed JSON)."""
    with open(path, "a") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


class RunningPipeline:
    """Files ``data-N.jsonl`` → topic ``raw`` (2 partitions, keyed by ``id``) → sink ``out``,
    running in a thread; :meth:`feed` adds a file and waits until the sink consumed it, so each
    feed reaches the sink in batches of its own (one consumer-group join for the whole test)."""

    def __init__(self, bootstrap: str, directory: Path, sink_type: str, pipeline: str | None = None,
                 **settings: Any) -> None:
        self.directory = directory
        self.pipeline = pipeline or unique("pl")
        config = (Pipeline(self.pipeline, bootstrap=bootstrap, config=FAST_GROUPS)
                  .topic("raw", 2)
                  .source("file", "file", topic="raw", path=str(directory / "data-*.jsonl"),
                          follow=True, key_field="id")
                  .sink("out", sink_type, input="raw", **settings)
                  .configure("metrics", port=0)
                  .configure("runtime", commit_interval_s=0.2)
                  .build())
        self.runner = PipelineRunner(config)
        self.result: RunResult | None = None
        self._fed = 0
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.result = self.runner.run()

    def __enter__(self) -> RunningPipeline:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def feed(self, records: list[dict[str, Any]] | list[dict[str, Any] | str],
             timeout_s: float = 60) -> None:
        """Add a file of ``records`` and wait until the sink stage consumed every one."""
        append_records(self.directory / f"data-{self._fed:06d}.jsonl", records)
        self._fed += len(records)
        deadline = time.monotonic() + timeout_s
        while self.counts()["in"] < self._fed:
            assert self._thread.is_alive(), self.result
            assert time.monotonic() < deadline, f"the sink consumed {self.counts()}"
            time.sleep(0.05)

    def counts(self) -> dict[str, float]:
        """The sink stage's counters: in, out, filtered, dead_lettered."""
        labels = {"pipeline": self.pipeline, "stage": "out"}
        registry = self.runner.metrics.registry
        return {name: registry.get_sample_value(f"streamflow_records_{name}_total", labels) or 0.0
                for name in ("in", "out", "filtered", "dead_lettered")}

    def stop(self) -> RunResult:
        """Stop gracefully (the sink flushes and commits) and return how the run ended."""
        if self._thread.is_alive():
            self.runner.stop()
            self._thread.join(60)
        assert self.result is not None
        return self.result


@contextmanager
def postgres_names(dsn: str) -> Iterator[tuple[str, str]]:
    """A pipeline and a table name of this test's own; the table and the pipeline's stored
    offsets are removed afterwards."""
    pipeline, table = unique("pl"), unique("sf_test")
    try:
        yield pipeline, table
    finally:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'DROP TABLE IF EXISTS "{table}"')
            if connection.execute("SELECT to_regclass('streamflow_offsets')").fetchone() != (None,):
                connection.execute("DELETE FROM streamflow_offsets WHERE pipeline = %s",
                                   (pipeline,))


def postgres_rows(dsn: str, table: str) -> pa.Table:
    with psycopg.connect(dsn) as connection:
        cursor = connection.execute(f'SELECT * FROM "{table}"')
        names = [column.name for column in cursor.description or []]
        rows = cursor.fetchall()
    return pa.table({name: [row[i] for row in rows] for i, name in enumerate(names)})


def duckdb_rows(path: Path, table: str) -> pa.Table:
    with duckdb.connect(str(path), read_only=True) as connection:
        return connection.sql(f'SELECT * FROM "{table}"').to_arrow_table()


def delta_rows(path: Path) -> pa.Table:
    return pa.table(DeltaTable(str(path)).to_pyarrow_table())


def iceberg_settings(directory: Path, table: str) -> dict[str, Any]:
    """Settings of an iceberg sink writing ``table`` with a SQLite catalog in ``directory``."""
    return {"table": table, "catalog": {"name": "local", "properties": {
        "type": "sql", "uri": f"sqlite:///{directory}/catalog.db",
        "warehouse": f"file://{directory}/iceberg"}}}


def iceberg_rows(directory: Path, table: str) -> pa.Table:
    catalog = iceberg_settings(directory, table)["catalog"]
    return load_catalog(catalog["name"], **catalog["properties"]).load_table(table).scan().to_arrow()


def parquet_rows(path: Path) -> pa.Table:
    return duckdb.sql(f"SELECT * FROM read_parquet('{path}/**/*.parquet')").to_arrow_table()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """``group``'s committed next offsets on ``topic`` (read without joining the group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                     timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in offsets if tp.offset >= 0}
