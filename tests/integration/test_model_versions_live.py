"""The model registry on a running stage and a real broker: ``streamflow models list|show``
while it learns, and a rollback that the running stage adopts between batches, counted by
version, shown in the stage's OpenLineage events and carried by the sink's lineage columns."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from confluent_kafka import Producer

from streamflow.cli import main
from streamflow.config import load_pipeline
from streamflow.ml.registry import Registry
from streamflow.runtime.pipeline import PipelineRunner, RunResult
from streamflow.runtime.row_lineage import MODEL_VERSION, OFFSET
from streamflow.transport import TopicSpec, create_transport
from tests.helpers import read_topic
from tests.openlineage_schema import validate_event

LABELS = {"pipeline": "live", "stage": "model", "model": "LinearRegression"}


def produce(bootstrap: str, first: int, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(first, first + count):
        producer.produce("features", json.dumps({"x": float(i % 7), "y": 2.0 * (i % 7)}).encode())
    assert producer.flush(30) == 0


def wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def models(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """What ``streamflow models ARGS[0] PIPELINE --stage model ARGS[1:]`` prints (the command
    reads the store the running stage writes, as from another process)."""
    assert main(["models", args[0], str(path), "--stage", "model", *args[1:]]) == 0
    return capsys.readouterr().out


def test_list_show_and_a_rollback_adopted_by_the_running_stage(
    fresh_broker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": "live",
        "kafka": {"bootstrap": fresh_broker},
        "topics": [{"name": "features", "partitions": 1}, {"name": "scored", "partitions": 1}],
        "models": [{"name": "model", "input": "features", "output": "scored", "target": "y",
                    "estimator": [{"linear_model.LinearRegression": {}}], "metrics": ["MAE"],
                    "batch": {"max_records": 50, "max_wait_ms": 10},
                    "checkpoint": {"path": str(tmp_path / "checkpoints"), "every_records": 100,
                                   "every_seconds": 0.5, "keep_versions": 50}}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "scored",
                   "path": str(tmp_path / "lake"), "lineage_columns": True,
                   "batch": {"max_records": 50, "max_wait_ms": 10}}],
        "lineage": {"transport": {"type": "file", "path": str(tmp_path / "lineage.ndjson")},
                    "running_interval_s": 3600},
        "metrics": {"port": 0},
    }))
    create_transport("confluent", fresh_broker).admin().create_topics(
        [TopicSpec("features", 1), TopicSpec("scored", 1)])
    runner = PipelineRunner(load_pipeline(path))
    results: list[RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))
    thread.start()
    registry = Registry.of_stage(tmp_path / "checkpoints", "live", "model")
    try:
        produce(fresh_broker, 0, 300)
        wait_until(lambda: any(v.records_learned == 300 for v in registry.versions()))
        versions = registry.versions()
        assert len(versions) >= 2

        listed = models(path, capsys, "list").splitlines()
        assert [line.split()[0] for line in listed[1:]] == [str(v.number) for v in versions]
        target = versions[0]
        shown = json.loads(models(path, capsys, "show", str(target.number)))
        assert shown["integrity"] == "verified"
        assert shown["partitions"]["features+0"]["records_learned"] == target.records_learned
        assert 0 < target.records_learned < 300

        newest = registry.versions()[-1].number
        models(path, capsys, "rollback", str(target.number))
        wait_until(lambda: runner.metrics.registry.get_sample_value(
            "streamflow_model_rollbacks_total", {**LABELS, "version": str(target.number)}) == 1)
        produce(fresh_broker, 300, 20)
        wait_until(lambda: registry.versions()[-1].records_learned == target.records_learned + 20)
    finally:
        runner.stop()
        thread.join(timeout=60)
    assert results and results[0].exit_code == 0, results
    versions_out = [json.loads(value)["model_version"]
                    for value in read_topic(fresh_broker, "scored").values]
    assert versions_out == [*range(300), *range(target.records_learned, target.records_learned + 20)]
    latest = registry.versions()[-1].metadata["partitions"]["features+0"]
    assert latest["rollback"]["version"] == target.number
    assert latest["rollback"]["learned_before"] == 300
    assert latest["rollback"]["from_version"] == newest
    assert "from rollback to" in models(path, capsys, "list")

    # lineage: a RUNNING event (running_interval_s is an hour) when the adoption's checkpoint is
    # out, naming the rollback; the COMPLETE event still shows it
    events = [json.loads(line) for line in (tmp_path / "lineage.ndjson").read_text().splitlines()]
    model_events = [(e["eventType"], e["run"]["facets"]["streamflow_model_version"])
                    for e in events if e["job"]["name"] == "live.model"]
    assert [state for state, _facet in model_events] == ["START", "RUNNING", "COMPLETE"]
    assert "rollbackTo" not in model_events[0][1]
    request = registry.rollback_request()
    assert request is not None
    for _state, facet in model_events[1:]:
        assert (facet["rollbackFrom"], facet["rollbackTo"], facet["rollbackId"]) == (
            newest, target.number, request.id)
    for event in events:
        validate_event(event)

    # row-level lineage: from the adoption's offset on, the rows' model version column carries
    # the adopted version's records learned, counting on from there
    lake = pq.read_table(tmp_path / "lake").sort_by(OFFSET)
    adopted_at = latest["rollback"]["at_offsets"]["features"]
    assert lake.column(OFFSET).to_pylist() == list(range(320))
    assert lake.column(MODEL_VERSION).to_pylist() == versions_out
    assert lake.column(MODEL_VERSION).to_pylist()[adopted_at:] == list(
        range(target.records_learned, target.records_learned + 320 - adopted_at))
    # and a trace of a row names the rollback its model came from, from the adoption on
    adoption = latest["rollback"]
    for row, rollback in ((adopted_at - 1, None), (adopted_at, adoption), (319, adoption)):
        assert main(["lineage", "trace", str(path), "--sink", "lake", "--row", str(row), "--json"]) == 0
        [scored, features] = json.loads(capsys.readouterr().out)["trace"]
        assert (scored["offset"], features["offset"]) == (row, row)
        assert scored["model_rollback"] == rollback
    assert main(["lineage", "trace", str(path), "--sink", "lake", "--row", str(adopted_at)]) == 0
    assert (f"predicted by the model adopted in a rollback to version {target.number} (from "
            f"version {newest}, at offsets {{'features': {adopted_at}}}") in capsys.readouterr().out
