"""Faust agents as processor stages, end to end on the real broker."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from confluent_kafka import Consumer, TopicPartition

from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from tests.helpers import read_topic

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
    counts = stage_counts(runner, "enrich")
    # 14 records in: 11 passed on as 12 (one fanned out), 1 filtered, 2 dead-lettered.
    assert counts == {"in": 14, "out": 12, "filtered": 1, "dead_lettered": 2}
    assert stage_counts(runner, "lake")["out"] == len(rows)
    assert all(stage.assigned for stage in runner.stages)  # what /readyz reports
    # The agent's progress is committed for the consumer group <pipeline>.<stage>.
    group = Consumer({"bootstrap.servers": fresh_broker, "group.id": "fst.enrich"})  # no join
    try:
        committed = group.committed([TopicPartition("fst.raw", p) for p in (0, 1)], timeout=10)
    finally:
        group.close()
    assert sum(max(tp.offset, 0) for tp in committed) >= len(lines)
