"""The quickstart pipeline with a ``file`` lineage transport: each source, stage and sink is an
OpenLineage job with a START and a COMPLETE event naming its datasets, every event valid by the
official schemas."""

from __future__ import annotations

import json
from pathlib import Path

from streamflow.config import load_pipeline
from streamflow.config.lineage import FileLineageTransport, LineageConfig
from streamflow.runtime.pipeline import PipelineRunner, config_hash
from tests.integration.test_quickstart import QUICKSTART, quickstart_env
from tests.openlineage_schema import validate_event


def test_the_quickstart_emits_start_and_complete_per_component(
    fresh_broker: str, tmp_path: Path
) -> None:
    events_file, output = tmp_path / "lineage.ndjson", tmp_path / "lake"
    config = load_pipeline(QUICKSTART, quickstart_env(fresh_broker, output))
    config = config.model_copy(update={"lineage": LineageConfig(
        transport=FileLineageTransport(type="file", path=str(events_file)))})

    result = PipelineRunner(config, until_idle_s=2, metrics_port=0).run()

    assert result.exit_code == 0, result.errors
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    for event in events:
        validate_event(event)
    by_job: dict[str, list[dict]] = {}
    for event in events:
        by_job.setdefault(event["job"]["name"], []).append(event)
    assert {job: [e["eventType"] for e in job_events] for job, job_events in by_job.items()} == {
        f"quickstart.{name}": ["START", "COMPLETE"]
        for name in ("sensors", "clean", "predict", "lake")}
    assert all(len({e["run"]["runId"] for e in job_events}) == 1 for job_events in by_job.values())

    kafka = f"kafka://{fresh_broker}"
    start = {job: job_events[0] for job, job_events in by_job.items()}
    expected = {
        "sensors": ([], [(kafka, "sensors.raw")]),
        "clean": ([(kafka, "sensors.raw")], [(kafka, "sensors.clean")]),
        "predict": ([(kafka, "sensors.clean")], [(kafka, "sensors.scored")]),
        "lake": ([(kafka, "sensors.scored")], [("file", str(output))]),
    }
    for name, (inputs, outputs) in expected.items():
        event = start[f"quickstart.{name}"]
        assert [(d["namespace"], d["name"]) for d in event["inputs"]] == inputs
        assert [(d["namespace"], d["name"]) for d in event["outputs"]] == outputs
        assert event["job"]["namespace"] == "quickstart"
        assert event["job"]["facets"]["streamflow_config"]["configHash"] == config_hash(config)
    versions = [e["run"]["facets"]["streamflow_model_version"] for e in by_job["quickstart.predict"]]
    assert "version" not in versions[0]  # a fresh checkpoint store has none
    assert versions[1]["version"] >= 1 and versions[1]["recordsLearned"] > 0  # at the stop
    assert all("streamflow_model_version" not in e["run"]["facets"]
               for job, job_events in by_job.items() if job != "quickstart.predict"
               for e in job_events)
    clean_input = start["quickstart.clean"]["inputs"][0]
    assert [f["name"] for f in clean_input["facets"]["schema"]["fields"]] == [
        "device_id", "ts", "temperature", "humidity", "pressure", "battery"]
