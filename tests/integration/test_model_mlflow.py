"""A model stage with an ``mlflow:`` block on a real broker, logging to a real MLflow tracking
server (the ``mlflow_uri`` fixture): its run, its metrics over records learned, a registered
pyfunc model version per checkpoint, and the champion alias on the newest."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from river import datasets

from streamflow.config import load_pipeline
from streamflow.ml.registry import Registry
from streamflow.runtime.pipeline import PipelineRunner


def test_a_model_stage_logs_its_run_metrics_and_versions_to_mlflow(
    bootstrap: str, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = list(datasets.Phishing())
    with open(tmp_path / "data.jsonl", "w") as handle:
        for x, y in stream:
            handle.write(json.dumps({**x, "y": y}) + "\n")
    run_id = uuid.uuid4().hex[:8]
    features, scored = f"features-{run_id}", f"scored-{run_id}"
    experiment, name = f"mlflow-{run_id}", f"phishing-{run_id}"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": f"mlflow-{run_id}",
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": features, "partitions": 1}, {"name": scored, "partitions": 1}],
        "sources": [{"name": "data", "type": "file", "topic": features,
                     "path": str(tmp_path / "data.jsonl")}],
        "models": [{"name": "model", "input": features, "output": scored, "target": "y",
                    "estimator": [{"preprocessing.StandardScaler": {}},
                                  {"linear_model.LogisticRegression": {}}],
                    "metrics": ["Accuracy"], "batch": {"max_records": 100, "max_wait_ms": 10},
                    "checkpoint": {"path": str(tmp_path / "checkpoints"), "every_records": 500},
                    # A server sharing two cores with the rest of the suite has taken 7 to
                    # 10 s to log one version: the stop waits for the last ones.
                    "mlflow": {"tracking_uri": mlflow_uri, "experiment": experiment,
                               "registered_model": name, "close_timeout_s": 120}}],
        "metrics": {"port": 0},
        "runtime": {"shutdown_timeout_s": 180},
    }))
    runner = PipelineRunner(load_pipeline(path), until_idle_s=1.5)
    assert runner.run().exit_code == 0
    assert "View run" not in capsys.readouterr().out  # MLflow's link is not printed
    assert runner.metrics.registry.get_sample_value("streamflow_model_mlflow_errors_total", {
        "pipeline": f"mlflow-{run_id}", "stage": "model",
        "model": "StandardScaler|LogisticRegression"}) == 0

    registry = Registry.of_stage(tmp_path / "checkpoints", f"mlflow-{run_id}", "model")
    versions = registry.versions()
    assert len(versions) >= 2 and versions[-1].records_learned == len(stream)
    client = MlflowClient(mlflow_uri, mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["metrics"] == '["Accuracy"]' and run.data.params["task"] == "classification"
    history = client.get_metric_history(run.info.run_id, "Accuracy.cumulative")
    assert sorted((point.step, point.value) for point in history) == [
        (version.records_learned,
         version.metadata["partitions"][f"{features}+0"]["metrics"]["Accuracy"]["cumulative"])
        for version in versions]
    assert len(client.get_metric_history(run.info.run_id, "Accuracy.rolling")) == len(versions)

    registered = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(version.tags["streamflow.version"]) for version in registered) == [
        version.number for version in versions]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["streamflow.version"] == str(versions[-1].number)

    river_model = registry.load_state(versions[-1].number, f"{features}+0")[1][1][""].model.estimator
    rows = [x for x, _ in itertools.islice(stream, 200)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # where models:/ URIs are looked up
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.predict(pd.DataFrame(rows)) == [river_model.predict_one(x) for x in rows]
