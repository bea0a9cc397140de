"""Bounded runs without a broker: parsing the bounds, rewriting the pipeline for its own outputs,
the bounded transport on the in-memory cluster, and the backfill and Iceberg expiry jobs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from streamflow.cli import main
from streamflow.config.loader import parse_pipeline
from streamflow.config.models import PipelineConfig
from streamflow.runtime.backfill import (
    BackfillError,
    BackfillPlan,
    BoundedTransport,
    backfill_config,
    entry_topics,
    parse_bound,
)
from streamflow.runtime.jobs import build_job, iceberg_expire_snapshots
from streamflow.transport import OutgoingBatch, TopicSpec, create_transport
from streamflow.transport.memory import drop_cluster

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def test_bounds_are_iso_times_relative_times_or_offsets() -> None:
    assert parse_bound("2026-11-30T12:00:00Z", NOW).moment == datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert parse_bound("2026-11-30", NOW).moment == datetime(2026, 11, 30, tzinfo=UTC)  # UTC
    assert parse_bound("-1d", NOW).moment == NOW - timedelta(days=1)
    assert parse_bound("0d", NOW).moment == NOW
    assert parse_bound("-90m", NOW).moment == NOW - timedelta(minutes=90)
    assert parse_bound("raw:0=5, raw:1=7", NOW).offsets == {("raw", 0): 5, ("raw", 1): 7}


@pytest.mark.parametrize(("start", "until", "suffix", "expected"), [
    ("yesterday", None, "s", "--from: 'yesterday' is neither an ISO time"),
    ("-1d", "raw:0=x", "s", "--until: 'raw:0=x' is not topic:partition=offset"),
    ("-1d", "raw:0=1,raw:0=2", "s", "--until: raw:0 is given twice"),
    ("-1d", "-2d", "s", "--until: -2d is before --from -1d"),
    ("-1d", None, "a/b", "--output-suffix: 'a/b' must be letters"),
    ("-1d", None, None, "--output-suffix: a bounded run writes to outputs of its own"),
    (None, None, "s", "--from: a bounded run needs a start"),
])
def test_bad_bounds_are_refused_naming_the_option(start: str | None, until: str | None,
                                                  suffix: str | None, expected: str) -> None:
    with pytest.raises(BackfillError) as raised:
        BackfillPlan.parse(start, until, suffix, now=NOW)
    assert expected in str(raised.value)


def pipeline(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "pipeline": "shop",
        "kafka": {"bootstrap": "localhost:9092"},
        "topics": [{"name": "orders", "partitions": 3}, {"name": "clean", "partitions": 2},
                   {"name": "labels", "external": True}],
        "sources": [{"name": "gen", "type": "generator", "topic": "orders", "count": 10}],
        "processors": [{"name": "tidy", "input": "orders", "output": "clean",
                        "steps": [{"filter": "amount > 0"}], "dead_letter": "bad"}],
        "models": [{"name": "model", "input": "clean", "output": "scored", "target": "y",
                    "estimator": [{"linear_model.LinearRegression": {}}],
                    "labels": {"topic": "labels"}}],
        "sinks": [
            {"name": "lake", "type": "parquet", "input": "scored", "path": "/data/lake/"},
            {"name": "raw", "type": "duckdb", "input": "orders", "path": "/data/shop.duckdb",
             "table": "orders"},
            {"name": "pg", "type": "postgres", "input": "scored", "dsn": "postgresql://x/y",
             "table": "scored"},
            {"name": "ice", "type": "iceberg", "input": "scored", "table": "lake.scored"},
            {"name": "out", "type": "kafka", "input": "scored", "topic": "exported"},
        ],
        "schedules": [{"name": "py", "cron": "* * * * *",
                       "python": {"function": "tests.unit.test_schedules:nightly_report"}}],
        "metrics": {"port": 9108},
    }
    data.update(changes)
    return data


def test_the_bounded_pipeline_renames_everything_but_its_entry_topics() -> None:
    config = parse_pipeline(pipeline())
    assert entry_topics(config) == ["labels", "orders"]
    bounded = backfill_config(config, "nightly-2026-12-01")
    s = "nightly-2026-12-01"
    assert bounded.pipeline == f"shop.{s}"
    assert bounded.sources == [] and bounded.schedules == []
    assert bounded.metrics.port == 0  # never the live daemon's port
    tidy, model = bounded.processors[0], bounded.models[0]
    assert (tidy.input, tidy.output, tidy.dead_letter) == ("orders", f"clean.{s}", f"bad.{s}")
    assert (model.input, model.output) == (f"clean.{s}", f"scored.{s}")
    assert model.labels is not None and model.labels.topic == "labels"  # nothing writes it
    assert bounded.dead_letter_topic(model) == f"shop.{s}.dlq"
    assert [t.name for t in bounded.topics] == ["orders", f"clean.{s}", "labels"]
    settings = {sink.name: (sink.input, sink.connector_settings()) for sink in bounded.sinks}
    assert settings["lake"] == (f"scored.{s}", {"path": f"/data/lake.{s}"})
    assert settings["raw"][0] == "orders"
    assert settings["raw"][1]["path"] == f"/data/shop.{s}.duckdb"
    assert settings["pg"][1]["table"] == "scored_nightly_2026_12_01"
    assert settings["pg"][1]["offsets_table"] == "streamflow_offsets_nightly_2026_12_01"
    assert settings["ice"][1]["table"] == "lake.scored_nightly_2026_12_01"
    assert settings["out"][1]["topic"] == f"exported.{s}"


def unknown_sink(config: PipelineConfig) -> None:
    config.sinks[0].type = "http-post"  # a plugin's sink: validation would refuse it here


@pytest.mark.parametrize(("changes", "change", "expected"), [
    ({"kafka": {"bootstrap": "embedded"}}, None, "kafka.bootstrap: a bounded run reads topics"),
    ({}, unknown_sink, "sinks[0].type: a bounded run does not know how to give a http-post sink"),
    ({"processors": [{"name": "split", "input": "orders", "output": "clean", "steps": [
        {"route": {"routes": [{"when": "amount > 9", "topic": "big"}]}}]}]}, None,
     "processors[0].steps[0]: a route step writes topics of its own"),
])
def test_pipelines_a_bounded_run_cannot_rename_are_refused(changes: dict[str, Any], change: Any,
                                                           expected: str) -> None:
    config = parse_pipeline(pipeline(**changes))
    if change is not None:
        change(config)
    with pytest.raises(BackfillError) as raised:
        backfill_config(config, "s")
    assert expected in str(raised.value)


def test_validate_checks_the_bounds_and_the_pipeline(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline(kafka={"bootstrap": "embedded"})))
    assert main(["validate", str(path), "--from=soon", "--output-suffix", "x"]) == 2
    err = capsys.readouterr().err
    assert "--from: 'soon' is neither an ISO time" in err
    assert "kafka.bootstrap: a bounded run reads topics" in err
    path.write_text(yaml.safe_dump(pipeline()))
    assert main(["validate", str(path), "--from=-1d", "--output-suffix", "x"]) == 0


@pytest.fixture
def memory() -> Any:
    name = f"memory://backfill-{uuid.uuid4().hex[:8]}"
    transport = create_transport("memory", name)
    admin = transport.admin()
    admin.create_topics([TopicSpec("orders", 2)])
    producer = transport.producer()
    for partition_key in (b"a", b"b", b"c", b"d"):
        producer.produce([OutgoingBatch("orders", [b"%d" % n for n in range(10)],
                                        keys=[partition_key] * 10)])
    yield transport
    drop_cluster(name)


def test_the_bounded_transport_hands_out_only_the_range(memory: Any) -> None:
    transport = memory
    ends = transport.reader({("orders", 0): None, ("orders", 1): None}).end_offsets()
    ranges = {("orders", 0): (3, 8), ("orders", 1): (0, 0)}
    bounded = BoundedTransport(transport, ranges)
    consumer = bounded.consumer("g", ["orders"])
    seen: list[tuple[int, int]] = []
    for _ in range(50):
        batch = consumer.consume_batch(100, 0.05)
        seen += list(zip(batch.partitions, batch.offsets, strict=True))
        if consumer.assignment() and not sum(consumer.lag().values()):
            break
    assert sorted(seen) == [(0, offset) for offset in range(3, 8)]
    assert consumer.lag() == {("orders", 0): 0, ("orders", 1): 0}
    assert ends[("orders", 0)] > 8  # records past the range were there, and not handed out
    consumer.close()
    reader = bounded.reader({("orders", 0): 0})  # a reader starts no earlier than the range
    assert reader.position() == {("orders", 0): 3}
    assert reader.end_offsets() == {("orders", 0): 8}
    reader.close()


def test_a_backfill_job_is_validated_with_its_field_path(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipeline.yaml"
    bad = {"name": "nightly", "cron": "0 3 * * *",
           "backfill": {"from": "yesterday", "output_suffix": "n-{day}"}}
    path.write_text(yaml.safe_dump(pipeline(schedules=[bad])))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "schedules[0].backfill.from: value error, 'yesterday' is neither a time relative" in err
    assert "schedules[0].backfill.output_suffix: value error, 'n-{day}': the only placeholder" in err
    embedded = {"name": "nightly", "cron": "0 3 * * *",
                "backfill": {"from": "-1d", "output_suffix": "nightly-{date}"}}
    path.write_text(yaml.safe_dump(pipeline(schedules=[embedded], kafka={"bootstrap": "embedded"})))
    assert main(["validate", str(path)]) == 2
    assert "schedules[0].backfill: kafka.bootstrap: a bounded run reads" in capsys.readouterr().err
    expiry = {"name": "expire", "cron": "0 4 * * *",
              "iceberg_expire_snapshots": {"sink": "lake", "older_than": "1 week"}}
    path.write_text(yaml.safe_dump(pipeline(schedules=[expiry])))
    assert main(["validate", str(path)]) == 2
    assert "schedules[0].iceberg_expire_snapshots.older_than" in capsys.readouterr().err
    expiry["iceberg_expire_snapshots"] = {"sink": "lake", "older_than": "7d"}
    path.write_text(yaml.safe_dump(pipeline(schedules=[expiry])))
    assert main(["validate", str(path)]) == 2
    assert ("schedules[0].iceberg_expire_snapshots.sink: sink 'lake' is of type parquet; "
            "iceberg_expire_snapshots works on a iceberg sink") in capsys.readouterr().err


def test_iceberg_expiry_keeps_the_newest_and_the_snapshots_holding_offsets(tmp_path: Path) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    properties = {"uri": f"sqlite:///{tmp_path / 'catalog.db'}",
                  "warehouse": f"file://{tmp_path / 'warehouse'}"}
    catalog = SqlCatalog("streamflow", **properties)
    catalog.create_namespace("lake")
    rows = pa.table({"n": pa.array([1], pa.int64())})
    table = catalog.create_table("lake.t", schema=rows.schema)
    offsets = ["streamflow/p/ice/c/orders/0", "streamflow/p/ice/c/orders/1"]
    # snapshots 1..5: partition 1's offset only in snapshot 2, partition 0's in every one
    for number in range(1, 6):
        properties_of = {offsets[0]: str(number)}
        if number == 2:
            properties_of[offsets[1]] = "7"
        table.append(rows, snapshot_properties=properties_of)
    ids = [snapshot.snapshot_id for snapshot in table.refresh().metadata.snapshots]
    data = {"sinks": [{"name": "ice", "type": "iceberg", "input": "orders", "table": "lake.t",
                       "catalog": {"name": "streamflow", "properties": properties}}],
            "schedules": [{"name": "expire", "cron": "0 4 * * *", "iceberg_expire_snapshots": {
                "sink": "ice", "older_than": "1s", "retain_last": 1}}]}
    config = parse_pipeline(pipeline(processors=[], models=[], **data))
    future = datetime.now(UTC) + timedelta(hours=1)
    done = iceberg_expire_snapshots("streamflow", properties, "lake.t", timedelta(seconds=1), 1,
                                    now=future)
    assert done == "1 snapshots of lake.t expired, 4 kept"
    kept = [snapshot.snapshot_id for snapshot in catalog.load_table("lake.t").metadata.snapshots]
    assert kept == ids[1:]  # back to the newest holding partition 1's offset
    assert catalog.load_table("lake.t").scan().to_arrow().num_rows == 5
    assert "expired" in str(build_job(config.schedules[0], config)())  # nothing older than 1s
