"""OpenLineage events: the datasets, schema and column-lineage facets derived from a pipeline's
config, the config-hash facet, every event valid by the official schemas, the run lifecycle, and
an emitter that never holds the pipeline up."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jsonschema import ValidationError
from openlineage.client.event_v2 import RunState
from openlineage.client.serde import Serde
from prometheus_client import CollectorRegistry, Counter

from streamflow.config.lineage import LineageConfig
from streamflow.config.models import PipelineConfig
from streamflow.ml.registry import Registry
from streamflow.runtime.lineage import (
    JobLineage,
    LineageEmitter,
    LineageTracker,
    create_client,
    describe_jobs,
    model_version_facet,
    run_event,
)
from streamflow.runtime.pipeline import config_hash
from tests.model_versions import VersionWriter
from tests.openlineage_schema import validate_event

BOOTSTRAP = "k1:9092,k2:9092"
KAFKA = f"kafka://{BOOTSTRAP}"
SCHEMA = {"device_id": {"type": "string", "required": True}, "ts": {"type": "int"},
          "temperature": {"type": "float"}, "humidity": {"type": "float"}}


def pipeline(**changes: Any) -> PipelineConfig:
    document: dict[str, Any] = {
        "pipeline": "plant",
        "kafka": {"bootstrap": BOOTSTRAP},
        "sources": [{"name": "gen", "type": "generator", "topic": "raw"}],
        "processors": [
            {"name": "shape", "input": "raw", "output": "shaped", "steps": [
                {"schema": SCHEMA},
                {"rename": {"temperature": "temp"}},
                {"drop": ["humidity"]},
                {"filter": "temp > 0"},
                {"select": ["device_id", "temp", "missing"]},
            ]},
            {"name": "enrich", "input": "shaped", "output": "enriched", "steps": [
                {"schema": SCHEMA}, {"sql": "SELECT *, 1 AS one FROM batch"}]},
            {"name": "loose", "input": "raw", "output": "renamed", "steps": [
                {"rename": {"a": "b"}}, {"drop": ["c"]}]},
        ],
        "models": [{"name": "predict", "input": "enriched", "output": "scored",
                    "target": "temp", "task": "regression",
                    "estimator": [{"linear_model.LinearRegression": {}}],
                    "labels": {"topic": "labels"}, "drift": {"detector": {"drift.ADWIN": {}}}}],
        "sinks": [
            {"name": "lake", "type": "parquet", "input": "scored", "path": "/data/lake"},
            {"name": "delta", "type": "delta", "input": "scored", "path": "s3://bucket/tables/t"},
            {"name": "pg", "type": "postgres", "input": "scored", "table": "readings",
             "dsn": "postgresql://u@db.example:5433/plant", "schema": "iot"},
            {"name": "pg2", "type": "postgres", "input": "scored", "table": "readings",
             "dsn": "host=db2 port=6543 dbname=metrics"},
            {"name": "duck", "type": "duckdb", "input": "scored", "path": "/data/w.duckdb",
             "table": "readings"},
            {"name": "mirror", "type": "kafka", "input": "scored", "topic": "copy",
             "cluster": {"bootstrap": "other:9092"}},
            {"name": "screen", "type": "console", "input": "scored"},
        ],
    }
    document.update(changes)
    return PipelineConfig.model_validate(document)


def as_json(obj: Any) -> dict[str, Any]:
    return Serde.to_dict(obj)


def datasets(job: JobLineage) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    return ([(d.namespace, d.name) for d in job.inputs], [(d.namespace, d.name) for d in job.outputs])


def test_each_component_reads_and_writes_the_datasets_its_config_names() -> None:
    jobs = describe_jobs(pipeline(), BOOTSTRAP)

    assert datasets(jobs["gen"]) == ([], [(KAFKA, "raw")])
    assert datasets(jobs["shape"]) == ([(KAFKA, "raw")], [(KAFKA, "shaped")])
    assert datasets(jobs["predict"]) == ([(KAFKA, "enriched"), (KAFKA, "labels")],
                                         [(KAFKA, "scored"), (KAFKA, "plant.drift")])
    outputs = {name: datasets(jobs[name])[1] for name in
               ("lake", "delta", "pg", "pg2", "duck", "mirror", "screen")}
    assert outputs == {
        "lake": [("file", "/data/lake")],
        "delta": [("s3://bucket", "tables/t")],
        "pg": [("postgres://db.example:5433", "plant.iot.readings")],
        "pg2": [("postgres://db2:6543", "metrics.public.readings")],
        "duck": [("duckdb:///data/w.duckdb", "readings")],
        "mirror": [("kafka://other:9092", "copy")],
        "screen": [("console", "screen")],
    }
    assert all(datasets(jobs[name])[0] == [(KAFKA, "scored")] for name in outputs)
    model = as_json(jobs["predict"].facets["streamflow_model"])
    assert (model["estimator"], model["task"]) == ("linear_model.LinearRegression",
                                                  "regression")
    assert [job.kind for job in jobs.values()] == [
        "SOURCE", "PROCESSOR", "PROCESSOR", "PROCESSOR", "MODEL", *["SINK"] * 7]


def schema_fields(dataset: Any) -> list[dict[str, Any]]:
    """Each field's name and type (when known)."""
    return [{key: field[key] for key in ("name", "type") if key in field}
            for field in as_json(dataset.facets["schema"])["fields"]]


def test_a_schema_step_declares_the_input_schema_and_field_steps_derive_the_output() -> None:
    shape = describe_jobs(pipeline(), BOOTSTRAP)["shape"]

    assert schema_fields(shape.inputs[0]) == [
        {"name": "device_id", "type": "string"}, {"name": "ts", "type": "int64"},
        {"name": "temperature", "type": "double"}, {"name": "humidity", "type": "double"}]
    # select keeps its order; a selected field absent upstream comes out null, of no known type
    assert schema_fields(shape.outputs[0]) == [
        {"name": "device_id", "type": "string"}, {"name": "temp", "type": "double"},
        {"name": "missing"}]


def test_select_rename_and_drop_give_column_lineage_to_the_input_fields() -> None:
    shape = describe_jobs(pipeline(), BOOTSTRAP)["shape"]

    lineage = as_json(shape.outputs[0].facets["columnLineage"])["fields"]

    assert {out: [(f["namespace"], f["name"], f["field"]) for f in spec["inputFields"]]
            for out, spec in lineage.items()} == {
        "device_id": [(KAFKA, "raw", "device_id")], "temp": [(KAFKA, "raw", "temperature")]}
    assert lineage["temp"]["inputFields"][0]["transformations"][0]["subtype"] == "IDENTITY"


def test_without_a_schema_only_the_renamed_fields_have_lineage_and_there_is_no_schema() -> None:
    loose = describe_jobs(pipeline(), BOOTSTRAP)["loose"]

    assert not loose.inputs[0].facets
    assert "schema" not in loose.outputs[0].facets
    fields = as_json(loose.outputs[0].facets["columnLineage"])["fields"]
    assert {out: spec["inputFields"][0]["field"] for out, spec in fields.items()} == {"b": "a"}


def column_lineage(dataset: Any) -> dict[str, list[tuple[str, str]]]:
    """Each output field's input fields, with how each is derived (IDENTITY, TRANSFORMATION)."""
    fields = as_json(dataset.facets["columnLineage"])["fields"]
    return {out: [(f["field"], f["transformations"][0]["subtype"]) for f in spec["inputFields"]]
            for out, spec in fields.items()}


def sql_stage(*steps: dict[str, Any]) -> JobLineage:
    return describe_jobs(pipeline(processors=[
        {"name": "enrich", "input": "raw", "output": "enriched", "steps": list(steps)}]),
        BOOTSTRAP)["enrich"]


def test_a_sql_select_over_batch_gives_each_column_the_fields_it_reads() -> None:
    enrich = sql_stage({"schema": SCHEMA}, {"rename": {"temperature": "temp"}}, {
        "sql": "SELECT * EXCLUDE (humidity) REPLACE (round(temp, 1) AS temp), "
               "temp * 1.8 + 32 AS temp_f, device_id || ':' || ts AS key, 1 AS one "
               "FROM batch WHERE temp > 0"}, {"drop": ["ts"]})

    assert [f["name"] for f in schema_fields(enrich.inputs[0])] == list(SCHEMA)
    assert schema_fields(enrich.outputs[0]) == [
        {"name": "device_id", "type": "string"}, {"name": "temp"}, {"name": "temp_f"},
        {"name": "key"}, {"name": "one"}]
    assert column_lineage(enrich.outputs[0]) == {
        "device_id": [("device_id", "IDENTITY")],
        "temp": [("temperature", "TRANSFORMATION")],
        "temp_f": [("temperature", "TRANSFORMATION")],
        "key": [("device_id", "TRANSFORMATION"), ("ts", "TRANSFORMATION")],
    }


def test_a_sql_star_over_unknown_fields_passes_them_and_names_what_it_adds() -> None:
    enrich = sql_stage({"rename": {"a": "b"}}, {"sql": "SELECT *, b + c AS d FROM batch"})

    assert "schema" not in enrich.outputs[0].facets
    assert column_lineage(enrich.outputs[0]) == {
        "b": [("a", "IDENTITY")], "d": [("a", "TRANSFORMATION"), ("c", "TRANSFORMATION")]}


def test_the_code_a_processor_runs_is_its_source_code_facet() -> None:
    sql = sql_stage({"schema": SCHEMA}, {"sql": "SELECT *, 1 AS one FROM batch;"},
                    {"sql": " SELECT * FROM batch WHERE ts > 0 "})
    python = sql_stage({"sql": "SELECT * FROM batch"},
                       {"python": {"function": "tests.step_functions:double_x", "mode": "record"}})
    plain = sql_stage({"schema": SCHEMA}, {"drop": ["ts"]})

    assert as_json(sql.facets["sourceCode"])["language"] == "sql"
    assert as_json(sql.facets["sourceCode"])["sourceCode"] == (
        "SELECT *, 1 AS one FROM batch;\nSELECT * FROM batch WHERE ts > 0;")
    code = as_json(python.facets["sourceCode"])
    assert code["language"] == "python"
    assert code["sourceCode"].startswith("# tests.step_functions:double_x\ndef double_x(")
    assert "sourceCode" not in plain.facets
    for job in (sql, python):
        event = run_event(RunState.START, "00000000-0000-0000-0000-000000000000", job, "plant",
                          "plant", "hash")
        validate_event(as_json(event))


def test_a_damaged_model_registry_gives_an_empty_version_facet(tmp_path: Path) -> None:
    version = tmp_path / "store" / "versions" / "1"
    version.mkdir(parents=True, mode=0o700)
    (version / "version.json").write_text(json.dumps({"partitions": {}}))  # no created_at
    (version / "version.json").chmod(0o600)

    facet = model_version_facet(Registry(tmp_path / "store"))

    assert (facet.version, facet.createdAt, facet.recordsLearned) == (None, None, None)


@pytest.mark.parametrize("query", [
    "SELECT device_id, count(*) AS n FROM batch GROUP BY device_id",
    "SELECT * FROM batch JOIN other USING (device_id)",
    "SELECT (SELECT max(x) FROM other) AS m FROM batch",
    "SELECT temperature + 1 FROM batch",  # a column without a name of its own
    "SELECT * FROM other",
])
def test_a_sql_step_not_derived_ends_the_derivation_but_keeps_the_input_schema(query: str
                                                                               ) -> None:
    enrich = sql_stage({"schema": SCHEMA}, {"sql": query})

    assert [f["name"] for f in schema_fields(enrich.inputs[0])] == list(SCHEMA)
    assert not enrich.outputs[0].facets


def test_the_config_facet_carries_the_config_hash_which_changes_with_the_config() -> None:
    config, changed = pipeline(), pipeline(runtime={"commit_interval_s": 9})
    job = describe_jobs(config, BOOTSTRAP)["shape"]

    facets = [as_json(run_event(RunState.START, "0190e5a8-0000-7000-8000-000000000000", job,
                                "plant", "plant", config_hash(c)))["job"]["facets"]
              for c in (config, changed, pipeline())]

    hashes = [f["streamflow_config"]["configHash"] for f in facets]
    assert hashes[0] == hashes[2] == config_hash(config) != hashes[1]
    assert facets[0]["streamflow_config"]["streamflowVersion"]


@pytest.mark.parametrize("state", list(RunState))
def test_every_event_of_every_job_is_valid_by_the_openlineage_schemas(state: RunState) -> None:
    error = ValueError("boom") if state == RunState.FAIL else None
    for job in describe_jobs(pipeline(), BOOTSTRAP).values():
        event = as_json(run_event(state, "0190e5a8-0000-7000-8000-000000000000", job, "plant",
                                  "ns", "abc123", error))
        validate_event(event)
        assert event["job"] == {**event["job"], "namespace": "ns", "name": f"plant.{job.name}"}
        assert event["eventType"] == state.value
        assert ("errorMessage" in event["run"]["facets"]) == (state == RunState.FAIL)


@dataclass(eq=False)
class FakeRunner:
    name: str
    error: BaseException | None = None
    alive: bool = True

    def is_alive(self) -> bool:
        return self.alive


def tracker(events: list[dict[str, Any]], interval_s: float = 60.0) -> LineageTracker:
    config = pipeline(lineage={"transport": {"type": "file", "path": "x"},
                               "running_interval_s": interval_s})
    return LineageTracker(config, BOOTSTRAP, "abc123", lambda e: events.append(as_json(e)))


def test_a_run_starts_fails_restarts_as_a_new_run_and_completes_at_the_stop() -> None:
    events: list[dict[str, Any]] = []
    lineage = tracker(events)
    shape, lake = FakeRunner("shape"), FakeRunner("lake")

    lineage.observe([shape, lake])
    shape.error, shape.alive = ConnectionError("broker gone"), False
    lineage.observe([shape, lake])
    lineage.observe([shape, lake])  # a failed run fails once
    restarted = FakeRunner("shape")
    lineage.observe([restarted, lake])
    restarted.alive = lake.alive = False
    lineage.finish()

    seen = [(e["job"]["name"], e["eventType"], e["run"]["runId"]) for e in events]
    assert [(name, state) for name, state, _ in seen] == [
        ("plant.shape", "START"), ("plant.lake", "START"), ("plant.shape", "FAIL"),
        ("plant.shape", "START"), ("plant.lake", "COMPLETE"), ("plant.shape", "COMPLETE")]
    assert seen[0][2] == seen[2][2] != seen[3][2] == seen[5][2]
    assert events[2]["run"]["facets"]["errorMessage"]["message"] == "ConnectionError: broker gone"
    for event in events:
        validate_event(event)


def test_running_events_come_every_interval_and_a_hung_runner_fails_at_the_stop() -> None:
    events: list[dict[str, Any]] = []
    lineage = tracker(events, interval_s=0.05)
    runner = FakeRunner("predict")

    lineage.observe([runner])
    lineage.observe([runner])
    time.sleep(0.06)
    lineage.observe([runner])
    lineage.finish()

    assert [e["eventType"] for e in events] == ["START", "RUNNING", "FAIL"]
    assert "shutdown timeout" in events[-1]["run"]["facets"]["errorMessage"]["message"]


def test_an_adopted_rollback_is_shown_at_once_in_a_running_event(tmp_path: Path) -> None:
    """The checkpoint after an adoption is a version continuing from the rollback: the next
    observation sends a RUNNING event whose version facet names it; later events go on
    showing it, without another event of their own."""
    config = pipeline(lineage={"transport": {"type": "file", "path": "x"},
                               "running_interval_s": 3600})
    config.models[0].checkpoint.path = str(tmp_path)
    events: list[dict[str, Any]] = []
    lineage = LineageTracker(config, BOOTSTRAP, "abc123", lambda e: events.append(as_json(e)))
    writer, runner = VersionWriter(tmp_path, "plant", "predict"), FakeRunner("predict")
    for count in (10, 20):
        writer.learn(count)
        writer.checkpoint()
    lineage.observe([runner])
    lineage.observe([runner])
    writer.roll_back(1)
    writer.learn(5)
    lineage.observe([runner])  # adopted, not checkpointed yet: nothing to show
    writer.checkpoint()
    lineage.observe([runner])
    lineage.observe([runner])
    runner.alive = False
    lineage.finish()

    facets = [(e["eventType"], e["run"]["facets"]["streamflow_model_version"]) for e in events]
    assert [(state, facet["version"]) for state, facet in facets] == [
        ("START", 2), ("RUNNING", 3), ("COMPLETE", 3)]
    assert "rollbackTo" not in facets[0][1]
    request = writer.registry.rollback_request()
    assert request is not None
    for _state, facet in facets[1:]:
        assert (facet["rollbackFrom"], facet["rollbackTo"], facet["rollbackId"],
                facet["recordsLearned"]) == (2, 1, request.id, 15)
    for event in events:
        validate_event(event)


def failures() -> Counter:
    return Counter("lineage_failures", "test", registry=CollectorRegistry())


def test_failed_sends_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    counter = failures()

    def send(_event: Any) -> None:
        raise OSError("unreachable")

    emitter = LineageEmitter(send, counter)
    with caplog.at_level(logging.WARNING, "streamflow.runtime.lineage"):
        for _ in range(3):
            emitter.emit(object())  # type: ignore[arg-type]
        emitter.close(5)

    assert counter._value.get() == 3
    assert [r.message for r in caplog.records if "could not be sent" in r.message] == [
        "lineage: an OpenLineage event could not be sent (OSError: unreachable); further "
        "failures are only counted in streamflow_lineage_emit_failures_total"]


def test_a_stuck_backend_neither_blocks_emit_nor_the_stop_beyond_its_timeout() -> None:
    counter, release, closed = failures(), threading.Event(), []
    emitter = LineageEmitter(lambda _event: release.wait(10), counter,
                             close=lambda: closed.append(True))

    started = time.monotonic()
    for _ in range(2000):  # more than the queue holds
        emitter.emit(object())  # type: ignore[arg-type]
    emitted_in = time.monotonic() - started
    emitter.close(0.2)
    stopped_in = time.monotonic() - started
    release.set()

    assert emitted_in < 0.5 and stopped_in < 1.5
    assert counter._value.get() == 2000  # 999 over the queue's size, 1001 unsent at the stop
    assert not closed


def test_each_transport_is_built_from_its_settings(tmp_path: Path) -> None:
    def transport(settings: dict[str, Any]) -> Any:
        return create_client(LineageConfig.model_validate({"transport": settings}), BOOTSTRAP
                             ).transport

    file = transport({"type": "file", "path": str(tmp_path / "events")})
    http = transport({"type": "http", "url": "http://marquez:5000", "timeout_s": 2,
                      "api_key": "k"})
    kafka = transport({"type": "kafka", "topic": "ol", "config": {"acks": "all"}})

    assert (file.kind, file.config.log_file_path, file.config.append) == (
        "file", str(tmp_path / "events"), True)
    assert (http.kind, http.url, http.endpoint, http.timeout) == (
        "http", "http://marquez:5000", "api/v1/lineage", 2)
    assert http.config.auth.get_bearer() == "Bearer k"
    assert (kafka.kind, kafka.topic, kafka.kafka_config.config["bootstrap.servers"],
            kafka.kafka_config.config["acks"]) == ("kafka", "ol", BOOTSTRAP, "all")


@pytest.mark.parametrize("corrupt", [
    lambda e: e.update(eventType="FINISHED"),
    lambda e: e["run"].update(runId="not-a-uuid"),
    lambda e: e["inputs"][0]["facets"]["schema"]["fields"][0].pop("name"),
    lambda e: e["outputs"][0]["facets"]["columnLineage"]["fields"]["temp"].pop("inputFields"),
    lambda e: e["job"]["facets"]["jobType"].pop("processingType"),
    lambda e: e["run"]["facets"]["errorMessage"].pop("programmingLanguage"),
])
def test_the_schema_check_refuses_an_event_off_the_spec(corrupt: Any) -> None:
    job = describe_jobs(pipeline(), BOOTSTRAP)["shape"]
    event = as_json(run_event(RunState.FAIL, "0190e5a8-0000-7000-8000-000000000000", job,
                              "plant", "plant", "abc123", ValueError("x")))
    validate_event(event)

    corrupt(event)

    with pytest.raises(ValidationError):
        validate_event(event)
