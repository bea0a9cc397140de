"""SIGKILL a sink stage mid-stream, restart it on the same broker: every record lands exactly once.

For the sinks that store offsets with their rows, the test also throws away the Kafka commits of
the killed run (the group is rewound to the start), so that only the offsets in the sink's own
table keep the restart from writing anything twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from tests.sink_tables import (
    POSTGRES_DSN,
    append_records,
    committed_offsets,
    delta_rows,
    duckdb_rows,
    parquet_rows,
    postgres_names,
    postgres_rows,
)

COUNT = 6000
PARTITIONS = 2


@contextmanager
def postgres_sink(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any], Callable[[], pa.Table]]]:
    with postgres_names() as (pipeline, table):
        yield pipeline, {"dsn": POSTGRES_DSN, "table": table}, lambda: postgres_rows(table)


@contextmanager
def duckdb_sink(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any], Callable[[], pa.Table]]]:
    path = tmp_path / "warehouse.duckdb"
    yield "killed", {"path": str(path), "table": "events"}, lambda: duckdb_rows(path, "events")


@contextmanager
def delta_sink(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any], Callable[[], pa.Table]]]:
    path = tmp_path / "events"
    yield "killed", {"path": str(path)}, lambda: delta_rows(path)


@contextmanager
def parquet_sink(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any], Callable[[], pa.Table]]]:
    path = tmp_path / "lake"
    yield "killed", {"path": str(path)}, lambda: parquet_rows(path)


def pipeline_file(tmp_path: Path, bootstrap: str, pipeline: str, sink_type: str,
                  settings: dict[str, Any]) -> Path:
    config = {
        "pipeline": pipeline,
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": "raw", "partitions": PARTITIONS}],
        "sources": [{"name": "load", "type": "file", "topic": "raw", "key_field": "id",
                     "path": str(tmp_path / "data.jsonl")}],
        "sinks": [{"name": "out", "type": sink_type, "input": "raw",
                   "batch": {"max_records": 100, "max_wait_ms": 10}, **settings}],
        "runtime": {"commit_interval_s": 0.05},
        "metrics": {"port": 0},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rewind(bootstrap: str, group: str) -> None:
    """Commit offset 0 for ``group``, as if the killed run's Kafka commits were lost. The broker
    takes commits only from members, so this joins the group (once the killed member expired)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "session.timeout.ms": 6000, "enable.auto.commit": False})
    consumer.subscribe(["raw"])
    deadline = time.monotonic() + 60
    try:
        while len(consumer.assignment()) < PARTITIONS:
            assert time.monotonic() < deadline, "could not join the killed stage's group"
            consumer.poll(0.2)
        consumer.commit(offsets=[TopicPartition("raw", p, 0) for p in range(PARTITIONS)],
                        asynchronous=False)
    finally:
        consumer.close()


@pytest.mark.parametrize(("sink_type", "sink", "lose_kafka_commits"), [
    ("postgres", postgres_sink, True),
    ("duckdb", duckdb_sink, True),
    ("delta", delta_sink, True),
    ("parquet", parquet_sink, False),  # idempotent by file name only from the committed offset
])
def test_sigkill_mid_stream_then_restart_writes_each_record_once(
    fresh_broker: str, tmp_path: Path, sink_type: str, sink: Any, lose_kafka_commits: bool
) -> None:
    append_records(tmp_path / "data.jsonl", [{"id": i, "value": i * 0.5} for i in range(COUNT)])
    with sink(tmp_path) as (pipeline, settings, read_rows):
        path = pipeline_file(tmp_path, fresh_broker, pipeline, sink_type, settings)

        def run(*extra: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "streamflow", "run", str(path), "--metrics-port", "0",
                 *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )

        loaded = run("--stage", "load", "--until-idle", "0.5")
        assert loaded.wait(timeout=120) == 0

        stage = run("--stage", "out")
        group = f"{pipeline}.out"
        deadline = time.monotonic() + 60
        committed = 0
        while time.monotonic() < deadline and committed < COUNT // 4:
            time.sleep(0.02)
            committed = sum(committed_offsets(fresh_broker, group, "raw", PARTITIONS).values())
        stage.send_signal(signal.SIGKILL)
        stage.wait(timeout=30)
        assert COUNT // 4 <= committed < COUNT, f"killed after {committed} records: not mid-stream"
        if lose_kafka_commits:
            rewind(fresh_broker, group)

        restarted = run("--stage", "out", "--until-idle", "1")
        log, _ = restarted.communicate(timeout=180)
        assert restarted.returncode == 0, log.decode()[-3000:]
        ids = read_rows().column("id").to_pylist()
        assert len(ids) == COUNT, f"{len(ids) - len(set(ids))} duplicates"
        assert sorted(ids) == list(range(COUNT))
