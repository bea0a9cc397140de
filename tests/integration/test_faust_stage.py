"""Faust agents as processor stages, end to end on the real broker."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport.broker import free_port
from tests.helpers import finish_logged, read_topic, start_logged
from tests.integration.test_shutdown import committed_total

pytest.importorskip("faust", reason="needs the faust extra: pip install 'streamflow[faust]'")


def write_events(path: Path) -> list[bytes]:
    """Ten good events, one filtered, one that makes the agent raise, one fanned out to two, and
    one that is not JSON."""
    lines = [json.dumps({"n": n}).encode() for n in range(10)]
    lines += [
        json.dumps({"n": 10, "drop": True}).encode(),
        json.dumps({"n": 11, "explode": True}).encode(),
        json.dumps({"n": 12, "copies": 2}).encode(),
        b"{not json",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def stage_counts(runner: PipelineRunner, stage: str) -> dict[str, float]:
    labels = {"pipeline": runner.config.pipeline, "stage": stage}
    return {
        name: runner.metrics.registry.get_sample_value(f"streamflow_records_{name}_total", labels)
        or 0.0
        for name in ("in", "out", "filtered", "dead_lettered")
    }


def test_faust_agent_stage_accounts_for_every_record(fresh_broker: str, tmp_path: Path) -> None:
    lines = write_events(tmp_path / "events.jsonl")
    output = tmp_path / "lake"
    config = parse_pipeline({
        "pipeline": "fst",
        "kafka": {"bootstrap": fresh_broker},
        "topics": [{"name": "fst.raw", "partitions": 2}],
        "sources": [{"name": "events", "type": "file", "topic": "fst.raw",
                     "path": str(tmp_path / "events.jsonl")}],
        "processors": [{"name": "enrich", "type": "faust", "input": "fst.raw",
                        "output": "fst.enriched", "agent": "tests.faust_agents:enrich"}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "fst.enriched",
                   "path": str(output)}],
        "metrics": {"enabled": False},
    })
    runner = PipelineRunner(config, until_idle_s=1.0, metrics_port=0)

    result = runner.run()

    assert result.exit_code == 0, result.errors
    rows = duckdb.sql(
        f"SELECT n, doubled, copy FROM read_parquet('{output}/**/*.parquet') ORDER BY n, copy"
    ).fetchall()
    assert rows == [(n, 2 * n, 0) for n in range(10)] + [(12, 24, 0), (12, 24, 1)]
    dead = read_topic(fresh_broker, "fst.dlq")
    assert sorted(dead.values) == sorted([lines[11], lines[13]])
    by_step = {dict(h or [])["streamflow.step"]: dict(h or []) for h in dead.headers}
    assert set(by_step) == {b"agent", b"parse"}
    agent_failure = by_step[b"agent"]
    assert agent_failure["streamflow.stage"] == b"enrich"
    assert agent_failure["streamflow.error.class"] == b"ExplodingEventError"
    assert agent_failure["streamflow.error.message"] == b"event 11 asked to explode"
    assert agent_failure["streamflow.original.topic"] == b"fst.raw"
    assert by_step[b"parse"]["streamflow.error.class"] == b"DecodeError"
    listed = runner.metrics.latest_dead_letters.document()["letters"]  # on the dashboard
    assert sorted(letter["value"].encode() for letter in listed) == sorted(dead.values)
    # The dashboard draws components that ended without an error as finished, not failed.
    assert {node["name"]: (node["state"], node["dead_letter"]) for node in runner.status()["nodes"]
            } == dict.fromkeys(["events", "enrich", "lake"], ("finished", "fst.dlq"))
    counts = stage_counts(runner, "enrich")
    # 14 records in: 11 passed on as 12 (one fanned out), 1 filtered, 2 dead-lettered.
    assert counts == {"in": 14, "out": 12, "filtered": 1, "dead_lettered": 2}
    assert stage_counts(runner, "lake")["out"] == len(rows)
    assert all(stage.assigned for stage in runner.stages)  # what /readyz reports
    # The agent's progress is committed for the consumer group <pipeline>.<stage>.
    # The group <pipeline>.<stage> committed the offset after each partition's last record.
    (stage,) = [stage for stage in runner.stages if stage.name == "enrich"]
    assert committed_offsets(fresh_broker, "fst.enrich", "fst.raw", 2) == {
        partition: stage.handled.get(("fst.raw", partition), -1001) for partition in (0, 1)
    }


def test_faust_stage_is_ready_then_stops_on_sigterm(fresh_broker: str, tmp_path: Path) -> None:
    port = free_port()
    pipeline = tmp_path / "faust.yaml"
    pipeline.write_text(yaml.safe_dump({
        "pipeline": "fsig",
        "kafka": {"bootstrap": fresh_broker},
        "sources": [{"name": "sensors", "type": "generator", "topic": "fsig.raw", "rate": 200}],
        "processors": [{"name": "convert", "type": "faust", "input": "fsig.raw",
                        "output": "fsig.out", "agent": "tests.faust_agents:fahrenheit"}],
        "metrics": {"port": port, "host": "127.0.0.1"},
    }))
    log = tmp_path / "run.log"
    process = start_logged([sys.executable, "-m", "streamflow", "run", str(pipeline)], log,
                           cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not _ready(port) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _ready(port), "/readyz never answered 200"
        while _records_in(port) < 50 and time.monotonic() < deadline:
            time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        finish_logged(process, log, timeout_s=30)
    finally:
        process.kill()
    assert committed_total(fresh_broker, "fsig.convert", "fsig.raw", 4) >= 50


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """``group``'s committed offset per partition (-1001: none), read without joining it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        consumer.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _records_in(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('streamflow_records_in_total{') and 'stage="convert"' in line)
