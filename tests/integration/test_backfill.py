"""Bounded runs on a real broker: the same range twice gives the same rows, predictions
included; nothing outside the range reaches the output; the config hash tells configs apart."""

from __future__ import annotations

import gc
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from confluent_kafka import Producer

from streamflow.cli import main
from streamflow.config.models import PipelineConfig
from streamflow.runtime.backfill import BackfillError, BackfillPlan, BackfillRunner
from streamflow.runtime.jobs import build_job
from streamflow.runtime.pipeline import PipelineRunner, config_hash
from streamflow.transport import TopicSpec, create_transport
from tests.openlineage_schema import validate_event

RECORDS_PER_PARTITION = 120
# Record timestamps: BASE_MS + 1000 * index; recent, so that retention (7 days) keeps them.
BASE_MS = int(time.time() * 1000) - 3_600_000


def preload(bootstrap: str, topic: str) -> None:
    """Two partitions of labelled records, ``id`` = partition * 1000 + offset, ``k`` one of
    five keys."""
    admin = create_transport("confluent", bootstrap).admin()
    admin.create_topics([TopicSpec(topic, 2)])
    admin.close()
    producer = Producer({"bootstrap.servers": bootstrap})
    for partition in (0, 1):
        for index in range(RECORDS_PER_PARTITION):
            x = (index % 17) / 17 + partition
            record = {"id": partition * 1000 + index, "k": index % 5, "x": x, "y": 3 * x + 1}
            producer.produce(topic, json.dumps(record).encode(), partition=partition,
                             timestamp=BASE_MS + 1000 * index)
    assert producer.flush(30) == 0


def pipeline(bootstrap: str, tmp_path: Path, topic: str, learning_rate: float = 0.05,
             keyed: bool = False) -> PipelineConfig:
    """With ``keyed``, a model per ``k``, at most two in memory. The output topic is the
    test's own, as bounded runs of two tests may share a suffix."""
    scored = f"{topic}-scored"
    return PipelineConfig.model_validate({
        "pipeline": f"bf-{topic}",
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": topic, "partitions": 2, "external": True},
                   {"name": scored, "partitions": 2}],
        "models": [{"name": "model", "input": topic, "output": scored, "target": "y",
                    "features": ["x"], "batch": {"max_records": 7, "max_wait_ms": 20},
                    "estimator": [{"linear_model.LinearRegression": {
                        "intercept_lr": learning_rate}}],
                    **({"key_field": "k", "max_models": 2} if keyed else {}),
                    "checkpoint": {"path": str(tmp_path / "checkpoints")}}],
        "sinks": [{"name": "lake", "type": "parquet", "input": scored,
                   "path": str(tmp_path / "lake")}],
        "lineage": {"transport": {"type": "file", "path": str(tmp_path / "lineage.ndjson")}},
        "metrics": {"port": 0},
        "runtime": {"commit_interval_s": 0.5},
    })


def rows(path: Path) -> list[tuple[Any, ...]]:
    return duckdb.sql(f"SELECT id, x, y, prediction, model_version FROM "
                      f"read_parquet('{path}/**/*.parquet') ORDER BY id").fetchall()


def test_the_same_range_twice_gives_the_same_rows(bootstrap: str, tmp_path: Path) -> None:
    topic = f"features-{uuid.uuid4().hex[:8]}"
    preload(bootstrap, topic)
    config = pipeline(bootstrap, tmp_path, topic)
    first_ms = BASE_MS + 1000 * 25  # partition 0 from offset 25 (by time), 1 from offset 25
    start = datetime.fromtimestamp(first_ms / 1000, UTC).isoformat()
    until = f"{topic}:0=90,{topic}:1=70"
    summaries = []
    for suffix in ("first", "second"):
        plan = BackfillPlan.parse(start, until, suffix)
        result = BackfillRunner(config, plan).run()
        assert result.exit_code == 0, result.errors
        assert result.summary is not None and result.summary.backfill is not None
        summaries.append(result.summary.backfill)

    first, second = rows(tmp_path / "lake.first"), rows(tmp_path / "lake.second")
    expected = [*range(25, 90), *range(1025, 1070)]
    assert [row[0] for row in first] == expected  # nothing outside [from, until)
    assert first == second  # row for row, predictions and model versions included
    assert all(row[3] is not None for row in first)
    assert [row[4] for row in first] == [*range(0, 65), *range(0, 45)]  # fresh models
    assert summaries[0]["config_hash"] == summaries[1]["config_hash"] == config_hash(config)
    assert summaries[0]["offsets"] == {f"{topic}:0": [25, 90], f"{topic}:1": [25, 70]}
    assert not (tmp_path / "lake").exists()  # the live output is untouched

    events = [json.loads(line) for line in (tmp_path / "lineage.ndjson").read_text().splitlines()]
    for event in events:
        validate_event(event)
    assert {event["job"]["facets"]["streamflow_config"]["configHash"] for event in events} == {
        config_hash(config)}
    facets = [event["run"]["facets"]["streamflow_backfill"] for event in events]
    assert {facet["outputSuffix"] for facet in facets} == {"first", "second"}
    assert all(facet["offsets"][f"{topic}:1"] == [25, 70] for facet in facets)

    # the same range with a changed config: its lineage names another config hash
    changed = pipeline(bootstrap, tmp_path, topic, learning_rate=0.01)
    assert config_hash(changed) != config_hash(config)
    result = BackfillRunner(changed, BackfillPlan.parse(start, until, "changed")).run()
    assert result.exit_code == 0, result.errors
    events = [json.loads(line) for line in (tmp_path / "lineage.ndjson").read_text().splitlines()]
    assert {event["job"]["facets"]["streamflow_config"]["configHash"] for event in events
            if event["run"]["facets"]["streamflow_backfill"]["outputSuffix"] == "changed"} == {
        config_hash(changed)}
    assert rows(tmp_path / "lake.changed") != first  # another learning rate, other predictions


def test_a_used_suffix_and_bad_bounds_are_refused(bootstrap: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    topic = f"features-{uuid.uuid4().hex[:8]}"
    preload(bootstrap, topic)
    config = pipeline(bootstrap, tmp_path, topic)
    file = tmp_path / "pipeline.yaml"
    file.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    until = f"{topic}:0=10,{topic}:1=10"
    once = ["run", str(file), "--from", "2020-01-01", "--until", until, "--output-suffix", "once"]
    assert main(once) == 0, capsys.readouterr().err
    assert main(once) == 2
    assert "the output suffix was used before" in capsys.readouterr().err
    assert main(["run", str(file), "--from", "yesterday", "--until", f"{topic}:7=3",
                 "--output-suffix", "x y"]) == 2
    err = capsys.readouterr().err
    assert "--from: 'yesterday' is neither an ISO time" in err
    assert "--output-suffix: 'x y' must be" in err
    assert main(["run", str(file), "--from", "2020-01-01", "--until", f"{topic}:7=3",
                 "--output-suffix", "bad"]) == 2
    assert f"--until: {topic}:7 is no partition of the entry topics" in capsys.readouterr().err


@pytest.mark.parametrize("keyed", [False, True], ids=["one-model", "keyed-evicted"])
def test_model_stages_start_from_a_chosen_checkpoint_the_same_way_each_time(
    bootstrap: str, tmp_path: Path, keyed: bool
) -> None:
    topic = f"features-{uuid.uuid4().hex[:8]}"
    preload(bootstrap, topic)
    config = pipeline(bootstrap, tmp_path, topic, keyed=keyed)
    assert PipelineRunner(config, until_idle_s=1.0).run().exit_code == 0  # the live run learns
    range_ = {"start": f"{topic}:0=100,{topic}:1=110", "until": None}
    for suffix, checkpoint in (("by-version", "latest"), ("by-path", str(tmp_path / "checkpoints"))):
        plan = BackfillPlan.parse(range_["start"], range_["until"], suffix, checkpoint)
        result = BackfillRunner(config, plan).run()
        assert result.exit_code == 0, result.errors
        assert result.summary is not None and result.summary.backfill is not None
        assert "sha256" in result.summary.backfill["model_checkpoint"]
    by_version, by_path = rows(tmp_path / "lake.by-version"), rows(tmp_path / "lake.by-path")
    assert [row[0] for row in by_version] == [*range(100, 120), *range(1110, 1120)]
    assert by_version == by_path  # a version holds the keyed models evicted to the store too
    if keyed:  # each key's model had learned 24 records of each partition
        assert [row[4] for row in by_version] == [24 + index // 5 for index in range(20)] + [
            24 + index // 5 for index in range(10)]
        return
    # The copies go on from what the live model learned: 120 records in each partition.
    assert [row[4] for row in by_version] == [*range(120, 140), *range(120, 130)]


def test_the_backfill_job_runs_its_window_into_dated_outputs(bootstrap: str, tmp_path: Path) -> None:
    topic = f"features-{uuid.uuid4().hex[:8]}"
    preload(bootstrap, topic)
    data = pipeline(bootstrap, tmp_path, topic).model_dump(mode="json", by_alias=True)
    data["schedules"] = [{"name": "nightly", "cron": "0 3 * * *", "backfill": {
        "from": "-3h", "until": "0d", "output_suffix": "nightly-{date}"}}]
    config = PipelineConfig.model_validate(data)
    gc.freeze()  # as the daemon the job runs in did: the run must leave its objects frozen
    try:
        outcome = str(build_job(config.schedules[0], config)())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    suffix = f"nightly-{datetime.now(UTC).date().isoformat()}"
    assert outcome.startswith(f"backfill {suffix}: 240 records into the sinks")
    assert [row[0] for row in rows(tmp_path / f"lake.{suffix}")] == [
        *range(RECORDS_PER_PARTITION), *range(1000, 1000 + RECORDS_PER_PARTITION)]
    with pytest.raises(BackfillError, match="the output suffix was used before"):
        build_job(config.schedules[0], config)()  # the same day again: refused, counted failed
