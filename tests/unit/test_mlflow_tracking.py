"""MLflow tracking of a model stage against a real MLflow tracking server (the ``mlflow_uri``
fixture): the run and its parameters, metrics over records learned, each registry version as a
registered pyfunc model version that predicts as the river model does, the champion alias, and a
tracking server that cannot be reached."""

from __future__ import annotations

import itertools
import logging
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow import MlflowClient
from river import linear_model, preprocessing

from streamflow.config import ConfigError, parse_pipeline
from streamflow.config.models import ModelConfig
from streamflow.metrics import PipelineMetrics
from streamflow.ml.checkpoint import CheckpointStore, publish
from streamflow.ml.engine import ModelEngine
from streamflow.ml.model import RiverModel
from streamflow.ml.registry import Registry, prepare_version
from streamflow.runtime.logs import config_secrets
from streamflow.runtime.mlflow_tracking import MlflowTracker, run_parameters, version_metrics
from streamflow.transport.broker import free_port
from tests.unit.test_model_registry import (
    STREAM,
    TOPIC,
    learn_and_checkpoint,
    new_engine,
    settings,
)


def model_config(uri: str, **mlflow: str | float) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "model", "input": TOPIC, "output": "scored", "target": "y",
        "estimator": [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}],
        "metrics": ["MAE"], "mlflow": {"tracking_uri": uri, **mlflow}})


def tracker(config: ModelConfig, tmp_path: Path) -> tuple[MlflowTracker, PipelineMetrics]:
    metrics = PipelineMetrics("p")
    return MlflowTracker(
        config, "p", Registry.of_stage(tmp_path, "p", "model"),
        run_parameters(config, "p", "regression", ["MAE"], "c0ffee"),
        {"task": "regression", "features": None, "target": "y", "key_field": None},
        metrics.model("model", "LinearRegression").mlflow_errors), metrics


def errors(metrics: PipelineMetrics) -> float:
    return metrics.registry.get_sample_value(
        "streamflow_model_mlflow_errors_total",
        {"pipeline": "p", "stage": "model", "model": "LinearRegression"}) or 0.0


def test_versions_are_logged_registered_and_the_newest_is_champion(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng = new_engine(tmp_path)
    for first in range(0, 300, 100):
        learn_and_checkpoint(eng, first, 100, keep=5)
    experiment, name = f"exp-{uuid.uuid4().hex[:8]}", f"p.model-{uuid.uuid4().hex[:8]}"
    logger, metrics = tracker(model_config(mlflow_uri, experiment=experiment,
                                           registered_model=name), tmp_path)
    for number in (1, 2, 3):
        logger.version_published(number)
    logger.close(failed=False, timeout_s=120)
    assert errors(metrics) == 0

    client = MlflowClient(mlflow_uri, mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "model"
    params = run.data.params
    assert params["estimator"] == ('[{"preprocessing.StandardScaler": {}}, '
                                   '{"linear_model.LinearRegression": {}}]')
    assert (params["target"], params["metrics"], params["config_hash"]) == ("y", '["MAE"]', "c0ffee")
    assert params["features"] == "numeric fields"

    registry = Registry.of_stage(tmp_path, "p", "model")
    for window in ("cumulative", "rolling"):
        history = client.get_metric_history(run.info.run_id, f"MAE.{window}")
        expected = [(version.records_learned,
                     version.metadata["partitions"][f"{TOPIC}+0"]["metrics"]["MAE"][window])
                    for version in registry.versions()]
        assert sorted((point.step, point.value) for point in history) == expected
    assert [point.step for point in client.get_metric_history(run.info.run_id,
                                                              "records_learned")] == [100, 200, 300]

    versions = sorted(client.search_model_versions(f"name = '{name}'"),
                      key=lambda version: int(version.version))
    assert [version.tags["streamflow.version"] for version in versions] == ["1", "2", "3"]
    assert all(version.run_id == run.info.run_id for version in versions)
    assert client.get_model_version_by_alias(name, "champion").version == versions[-1].version

    requirements = Path(client.download_artifacts(run.info.run_id, "versions/3/requirements.txt",
                                                  str(tmp_path))).read_text().split()
    names = {requirement.split("==")[0] for requirement in requirements}
    assert names >= {"river", "pandas"} and names & {"mlflow", "mlflow-skinny"}
    river_model = registry.load_state(3, f"{TOPIC}+0")[1][1][""].model.estimator
    rows = [x for x, _ in STREAM[300:340]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # where models:/ URIs are looked up
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.predict(pd.DataFrame(rows)) == [river_model.predict_one(x) for x in rows]


def test_set_champion_moves_the_alias_to_an_earlier_version(mlflow_uri: str, tmp_path: Path) -> None:
    eng = new_engine(tmp_path)
    for first in (0, 100):
        learn_and_checkpoint(eng, first, 100, keep=5)
    name = f"p.model-{uuid.uuid4().hex[:8]}"
    logger, metrics = tracker(model_config(mlflow_uri, experiment=f"exp-{uuid.uuid4().hex[:8]}",
                                           registered_model=name), tmp_path)
    logger.version_published(1)
    logger.version_published(2)
    logger.set_champion(1)
    logger.close(failed=True, timeout_s=120)
    assert errors(metrics) == 0
    client = MlflowClient(mlflow_uri, mlflow_uri)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["streamflow.version"] == "1"
    assert client.get_run(champion.run_id).info.status == "FAILED"

    # a later run (the stage restarted) finds the versions an earlier one registered by tag
    again, metrics = tracker(model_config(mlflow_uri, registered_model=name), tmp_path)
    again.set_champion(2)
    again.close(failed=False, timeout_s=60)
    assert errors(metrics) == 0
    assert client.get_model_version_by_alias(name, "champion").tags["streamflow.version"] == "2"

    # a promotion: the first version holding the promoted champion is tagged and aliased
    promoting, metrics = tracker(model_config(mlflow_uri, registered_model=name), tmp_path)
    promoting.set_champion(2)
    promoting.promoted(1, ["poly replaced main on partition 0 from offset 1500"])
    promoting.close(failed=False, timeout_s=60)
    assert errors(metrics) == 0
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["streamflow.version"] == "1"
    assert champion.tags["streamflow.promotions"] == (
        "poly replaced main on partition 0 from offset 1500")


def test_a_keyed_version_predicts_each_row_with_the_model_of_its_key(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    eng = ModelEngine(
        replace(settings(), key_field="k"),
        lambda: RiverModel(preprocessing.StandardScaler() | linear_model.LinearRegression(),
                           "regression"),
        CheckpointStore(tmp_path, "p", "model"))
    eng.assign(0)
    keys = ["a" if y > 43 else "b" for _, y in STREAM[:200]]
    eng.score(0, list(range(200)), [None] * 200, [x for x, _ in STREAM[:200]],
              [y for _, y in STREAM[:200]], keys)
    snapshots = eng.snapshots()
    staged = [snapshot.staged(1, 5) for snapshot in snapshots]
    for snapshot, file in zip(snapshots, staged, strict=True):
        snapshot.write_staged(file)
    prepare_version(snapshots, staged)
    [number] = publish(staged)
    name = f"keyed-{uuid.uuid4().hex[:8]}"
    config = model_config(mlflow_uri, registered_model=name)
    metrics = PipelineMetrics("p")
    logger = MlflowTracker(config, "p", Registry.of_stage(tmp_path, "p", "model"),
                           run_parameters(config, "p", "regression", ["MAE"], "c0ffee"),
                           {"task": "regression", "features": ["ordinal_date", "gallup"],
                            "target": "y", "key_field": "k"},
                           metrics.model("model", "LinearRegression").mlflow_errors)
    logger.version_published(number)
    logger.close(failed=False, timeout_s=60)
    assert errors(metrics) == 0

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    models = {key: slot.model.estimator for (_p, key), slot in eng.slots.items()}
    rows = [{"ordinal_date": x["ordinal_date"], "gallup": x["gallup"], "k": key, "y": 1.0}
            for (x, _), key in zip(STREAM[200:220], itertools.cycle(["a", "b", "c"]))]
    rows[0]["gallup"] = None  # left out of the features, as the stage leaves nulls out
    expected = [models[row["k"]].predict_one(
        {name: row[name] for name in ("ordinal_date", "gallup") if row[name] is not None})
        if row["k"] in models else None for row in rows]
    assert expected[2] is None and set(models) == {"a", "b"}  # "c" has no model: no prediction
    assert loaded.predict(pd.DataFrame(rows)) == expected


def test_an_unreachable_server_is_counted_and_logged_and_never_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in (("MAX_RETRIES", "1"), ("BACKOFF_FACTOR", "0"), ("BACKOFF_JITTER", "0")):
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)
    eng = new_engine(tmp_path)
    learn_and_checkpoint(eng, 0, 100, keep=5)
    uri = f"http://stage:pa55word@127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.WARNING)
    logger, metrics = tracker(model_config(uri), tmp_path)
    started = time.monotonic()
    for _ in range(3):
        logger.version_published(1)
    assert time.monotonic() - started < 0.1
    logger.close(failed=False, timeout_s=60)
    assert errors(metrics) == 3
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings  # once per outage, and no retry of urllib3's
    assert "http://stage:***@127.0.0.1" in warnings[0] and "pa55word" not in warnings[0]


def test_a_server_that_never_answers_holds_a_stop_no_longer_than_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        logger, metrics = tracker(model_config(f"http://127.0.0.1:{silent.getsockname()[1]}",
                                               close_timeout_s=0.5), tmp_path)
        for number in (1, 2):
            logger.version_published(number)
        started = time.monotonic()
        logger.close(failed=False)
        assert time.monotonic() - started < 1.0
        assert errors(metrics) == 3  # the call under way, the other version, and ending the run
        time.sleep(3)  # the call under way times out: it was counted already
        assert errors(metrics) == 3


def test_a_full_queue_drops_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streamflow.runtime.mlflow_tracking.QUEUE_SIZE", 2)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger, metrics = tracker(model_config(f"http://127.0.0.1:{free_port()}"), tmp_path)
    for number in range(1, 50):
        logger.version_published(number)
    logger.close(failed=False, timeout_s=30)
    assert errors(metrics) == 49  # each dropped or failed (the store has no such version)


def test_metrics_of_a_version_with_several_partitions_name_them() -> None:
    metadata = {"created_at": 1.5, "partitions": {
        "f+0": {"partition": 0, "records_learned": 10, "drift_events": 1,
                "metrics": {"MAE": {"cumulative": 2.0, "rolling": float("nan")}}},
        "f+1": {"partition": 1, "records_learned": 5, "drift_events": 0,
                "metrics": {"MAE": {"cumulative": 3.0, "rolling": 4.0}}}}}
    assert version_metrics(metadata) == [
        ("MAE.cumulative.p0", 2.0, 1500, 10), ("drift_events.p0", 1.0, 1500, 10),
        ("MAE.cumulative.p1", 3.0, 1500, 5), ("MAE.rolling.p1", 4.0, 1500, 5),
        ("drift_events.p1", 0.0, 1500, 5), ("records_learned", 15.0, 1500, 15)]


def pipeline(uri: str) -> dict[str, object]:
    return {"pipeline": "p", "models": [{
        "name": "model", "input": "a", "output": "b", "target": "y",
        "estimator": [{"linear_model.LinearRegression": {}}], "mlflow": {"tracking_uri": uri}}],
        "topics": [{"name": "a", "external": True}]}


def test_validate_explains_a_uri_that_is_no_tracking_uri_without_its_password() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_pipeline(pipeline("bob:s3cret-pw@localhost:5000"))
    message = str(raised.value)
    assert "models[0].mlflow.tracking_uri" in message and "is not an MLflow tracking URI" in message
    assert "http://host:port" in message and "s3cret-pw" not in message


def test_the_password_of_a_tracking_uri_is_a_secret_to_mask() -> None:
    config = parse_pipeline(pipeline("https://bob:s3cret-pw@mlflow.example:443"))
    assert "s3cret-pw" in config_secrets(config)
