"""SIGTERM in the middle of a run: clean exit, committed offsets, no partial files, nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from confluent_kafka import Consumer, TopicPartition

from tests.helpers import finish_logged, read_topic, start_logged

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"
COUNT = 12_000


def run_quickstart(bootstrap: str, output: Path, log: Path, *extra: str
                   ) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAMFLOW_BOOTSTRAP": bootstrap,
        "QUICKSTART_OUTPUT": str(output),
        "QUICKSTART_CHECKPOINTS": str(output.parent / "checkpoints"),
        "QUICKSTART_COUNT": str(COUNT),
        "QUICKSTART_RATE": "1500",
    }
    command = [sys.executable, "-m", "streamflow", "run", str(QUICKSTART), "--metrics-port", "0",
               *extra]
    return start_logged(command, log, env)


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """Sum of ``group``'s committed offsets on ``topic`` (read without joining the group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


def test_sigterm_mid_run_then_restart_loses_nothing(fresh_broker: str, tmp_path: Path) -> None:
    output, log = tmp_path / "lake", tmp_path / "runs.log"
    process = run_quickstart(fresh_broker, output, log)
    deadline = time.monotonic() + 60
    while not list(output.rglob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(output.rglob("*.parquet")), "no Parquet file appeared before the deadline"

    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    finish_logged(process, log, timeout_s=60)
    assert time.monotonic() - started < 35

    assert not list(output.rglob("*.tmp")), "a partial file is visible"
    rows_after_stop = _rows(output)
    assert 0 < rows_after_stop < COUNT
    # The sink committed exactly what its files hold.
    assert committed_total(fresh_broker, "quickstart.lake", "sensors.scored", 4) == rows_after_stop

    finish_logged(run_quickstart(fresh_broker, output, log, "--until-idle", "2"), log,
                  timeout_s=180)

    dead = read_topic(fresh_broker, "quickstart.dlq")
    total = _rows(output)
    distinct = duckdb.sql(
        f"SELECT count(DISTINCT ts) FROM read_parquet('{output}/**/*.parquet')"
    ).fetchall()[0][0]
    assert distinct == total, "a record was written twice"
    assert total + len(dead) == COUNT


def _rows(output: Path) -> int:
    return int(duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{output}/**/*.parquet')"
    ).fetchall()[0][0])
