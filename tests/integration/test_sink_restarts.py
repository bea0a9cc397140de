"""SIGKILL a pipeline of sinks mid-stream, restart it on the same broker: every record lands
exactly once in each sink's output.

The postgres, duckdb, delta and iceberg sinks store offsets with their rows: for them the test
also throws away the Kafka commits of the killed run (their groups are rewound to the start), so
that only the offsets in the sink's own storage keep the restart from writing anything twice.
The parquet sink relies on the Kafka commit (a replay rewrites the same files), so its group is
left alone. The kafka and console sinks are at least once: together, the killed and the
restarted run must have produced or printed every record, possibly some twice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from confluent_kafka import Consumer, TopicPartition

from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from tests.helpers import read_topic, start_logged
from tests.sink_tables import (
    FAST_GROUPS,
    append_records,
    committed_offsets,
    delta_rows,
    duckdb_rows,
    iceberg_rows,
    iceberg_settings,
    parquet_rows,
    postgres_names,
    postgres_rows,
)

COUNT = 8000
PARTITIONS = 2
EXACTLY_ONCE = ("postgres", "duckdb", "delta", "iceberg")


def pipeline_file(tmp_path: Path, bootstrap: str, pipeline: str,
                  sinks: dict[str, dict[str, Any]]) -> Path:
    config = {
        "pipeline": pipeline,
        "kafka": {"bootstrap": bootstrap, "config": FAST_GROUPS},
        "topics": [{"name": "raw", "partitions": PARTITIONS}],
        "sources": [{"name": "load", "type": "file", "topic": "raw", "key_field": "id",
                     "path": str(tmp_path / "data.jsonl")}],
        "sinks": [{"name": sink_type, "type": sink_type, "input": "raw",
                   "batch": {"max_records": 100, "max_wait_ms": 10}, **settings}
                  for sink_type, settings in sinks.items()],
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
                         "enable.auto.commit": False, **FAST_GROUPS})
    consumer.subscribe(["raw"])
    deadline = time.monotonic() + 60
    try:
        while len(consumer.assignment()) < PARTITIONS:
            assert time.monotonic() < deadline, f"could not join the killed group {group}"
            consumer.poll(0.2)
        consumer.commit(offsets=[TopicPartition("raw", p, 0) for p in range(PARTITIONS)],
                        asynchronous=False)
    finally:
        consumer.close()


def printed_ids(logs: list[Path]) -> list[int]:
    """Ids of the records the console sink printed (one JSON object a line, among log lines)."""
    ids = []
    for line in b"".join(log.read_bytes() for log in logs).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "id" in record:
            ids.append(record["id"])
    return ids


def topic_end(bootstrap: str) -> int:
    """The sum of the input partitions' end offsets."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offsets"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition("raw", p), timeout=10)[1]
                   for p in range(PARTITIONS))
    finally:
        consumer.close()


def test_sigkill_mid_stream_then_restart_writes_each_record_once(
    fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    append_records(tmp_path / "data.jsonl", [{"id": i, "value": i * 0.5} for i in range(COUNT)])
    with postgres_names(postgres_dsn) as (pipeline, table):
        outputs: dict[str, tuple[dict[str, Any], Callable[[], pa.Table]]] = {
            "postgres": ({"dsn": postgres_dsn, "table": table},
                         lambda: postgres_rows(postgres_dsn, table)),
            "duckdb": ({"path": str(tmp_path / "warehouse.duckdb"), "table": "events"},
                       lambda: duckdb_rows(tmp_path / "warehouse.duckdb", "events")),
            "delta": ({"path": str(tmp_path / "events")}, lambda: delta_rows(tmp_path / "events")),
            "iceberg": (iceberg_settings(tmp_path, "lake.events"),
                        lambda: iceberg_rows(tmp_path, "lake.events")),
            "parquet": ({"path": str(tmp_path / "lake")}, lambda: parquet_rows(tmp_path / "lake")),
            "kafka": ({"topic": f"{pipeline}.copied"}, lambda: pa.table({"id": [
                json.loads(value)["id"]
                for value in read_topic(fresh_broker, f"{pipeline}.copied").values]})),
            "console": ({}, lambda: pa.table({"id": printed_ids(logs)})),
        }
        path = pipeline_file(tmp_path, fresh_broker, pipeline,
                             {name: settings for name, (settings, _read) in outputs.items()})
        loaded = PipelineRunner(load_pipeline(path), stage="load", until_idle_s=0.2).run()
        assert loaded.exit_code == 0, loaded.errors

        logs: list[Path] = []

        def run(*extra: str) -> subprocess.Popen[bytes]:
            logs.append(tmp_path / f"run-{len(logs)}.log")
            return start_logged([sys.executable, "-m", "streamflow", "run", str(path),
                                 "--metrics-port", "0", *extra], logs[-1])

        def committed(name: str) -> int:
            offsets = committed_offsets(fresh_broker, f"{pipeline}.{name}", "raw", PARTITIONS)
            return sum(offsets.values())

        # One process per sink, each killed once a quarter of its input is durable.
        end = topic_end(fresh_broker)
        running = {name: run("--stage", name) for name in outputs}
        killed: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + 90
        while running and time.monotonic() < deadline:
            time.sleep(0.02)
            for name in [name for name in running if committed(name) >= end // 4]:
                killed.append(running.pop(name))
                killed[-1].send_signal(signal.SIGKILL)
        for process in [*killed, *running.values()]:
            process.kill()
            process.wait(timeout=30)
        assert not running, f"not a quarter through before the deadline: {sorted(running)}"
        progress = {name: committed(name) for name in outputs}
        assert max(progress.values()) < end, f"killed after the end ({end}): {progress}"
        with ThreadPoolExecutor(len(EXACTLY_ONCE)) as pool:
            list(pool.map(lambda name: rewind(fresh_broker, f"{pipeline}.{name}"), EXACTLY_ONCE))

        restarted = run("--until-idle", "0.5")
        restarted.wait(timeout=180)
        assert restarted.returncode == 0, logs[-1].read_text()[-3000:]
        for name, (_settings, read_rows) in outputs.items():
            ids = read_rows().column("id").to_pylist()
            if name in ("kafka", "console"):
                assert set(ids) == set(range(COUNT)), f"{name}: records are missing"
                continue
            assert len(ids) == COUNT, f"{name}: {len(ids) - len(set(ids))} duplicates"
            assert sorted(ids) == list(range(COUNT)), f"{name}: records are missing"
