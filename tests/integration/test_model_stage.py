"""Model stages on a real broker: agreement with river end to end, and exactly-once learning
across a SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from river import datasets, evaluate, linear_model, metrics, preprocessing

from streamflow.config import load_pipeline
from streamflow.ml.checkpoint import CheckpointStore
from streamflow.runtime.model_stage import ModelStage
from streamflow.runtime.pipeline import PipelineRunner, RunResult
from streamflow.transport import TopicSpec, create_transport
from tests.helpers import finish_logged, read_topic, start_logged


def write_dataset(path: Path, stream: list[tuple[dict[str, Any], Any]]) -> None:
    with open(path, "w") as handle:
        for x, y in stream:
            handle.write(json.dumps({**x, "y": y}) + "\n")


def pipeline_file(tmp_path: Path, bootstrap: str, estimator: list[dict[str, Any]],
                  model_metrics: list[str] | None, **model: Any) -> Path:
    config = {
        "pipeline": "learn",
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": "features", "partitions": 1}, {"name": "scored", "partitions": 1}],
        "sources": [{"name": "data", "type": "file", "topic": "features",
                     "path": str(tmp_path / "data.jsonl")}],
        "models": [{"name": "model", "input": "features", "output": "scored", "target": "y",
                    "estimator": estimator, "metrics": model_metrics,
                    "checkpoint": {"path": str(tmp_path / "checkpoints"), "every_records": 500},
                    **model}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "scored",
                   "path": str(tmp_path / "lake")}],
        "metrics": {"port": 0},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def output_rows(tmp_path: Path, columns: str) -> list[tuple[Any, ...]]:
    return duckdb.sql(
        f"SELECT {columns} FROM read_parquet('{tmp_path}/lake/**/*.parquet', filename=true, "
        "file_row_number=true) ORDER BY filename, file_row_number"
    ).fetchall()


def scored_versions(bootstrap: str) -> set[int]:
    """The model versions in the output topic: with one model and every record labelled, a
    record's version is its position in the stream, so these say which records were scored."""
    return {json.loads(value)["model_version"] for value in read_topic(bootstrap, "scored").values}


def stage_command(path: Path, stage: str, until_idle_s: str | None = None) -> list[str]:
    """``streamflow run`` of one stage of the pipeline at ``path``, until idle if given."""
    idle = ["--until-idle", until_idle_s] if until_idle_s else []
    return [sys.executable, "-m", "streamflow", "run", str(path), "--metrics-port", "0",
            "--stage", stage, *idle]


def wait_for_checkpoint(store: CheckpointStore, offset: int, timeout_s: float = 120) -> int:
    """The features offset partition 0's checkpoint covers, once it reaches ``offset`` (or
    whatever it covers when ``timeout_s`` runs out)."""
    deadline = time.monotonic() + timeout_s
    covered = 0
    while time.monotonic() < deadline and covered < offset:
        time.sleep(0.05)
        state = store.load("features+0", "partition-state")
        covered = state[0]["next_offsets"].get("features", 0) if state else 0
    return covered


def test_regression_output_agrees_with_river(fresh_broker: str, tmp_path: Path) -> None:
    stream = list(datasets.TrumpApproval())
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(tmp_path, fresh_broker, [{"preprocessing.StandardScaler": {}},
                                                  {"linear_model.LinearRegression": {}}], ["MAE"])
    runner = PipelineRunner(load_pipeline(path), until_idle_s=1.5)
    assert runner.run().exit_code == 0

    rows = output_rows(tmp_path, "y, prediction, model_version")
    assert len(rows) == len(stream)
    from_output = metrics.MAE()
    for y, prediction, _version in rows:
        from_output.update(y, prediction)
    expected = evaluate.progressive_val_score(
        stream, preprocessing.StandardScaler() | linear_model.LinearRegression(), metrics.MAE()
    )
    assert from_output.get() == pytest.approx(expected.get(), abs=1e-9)
    assert [version for *_, version in rows] == list(range(len(stream)))
    gauge = runner.metrics.registry.get_sample_value("streamflow_model_metric", {
        "pipeline": "learn", "stage": "model", "model": "StandardScaler|LinearRegression",
        "metric": "MAE", "window": "cumulative", "partition": "0"})
    assert gauge == pytest.approx(expected.get(), abs=1e-9)
    age = runner.metrics.registry.get_sample_value("streamflow_model_checkpoint_age_seconds", {
        "pipeline": "learn", "stage": "model", "model": "StandardScaler|LinearRegression"})
    assert age is not None and 0 <= age < 5  # the stage saved its state when it stopped


def test_a_group_behind_the_checkpoint_skips_what_the_model_learned(
    fresh_broker: str, tmp_path: Path
) -> None:
    """Periodic commits are asynchronous: if one is lost, the group resumes behind the
    checkpoint, and whole batches the restored model already learned come again."""
    stream = list(datasets.TrumpApproval())
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(tmp_path, fresh_broker, [{"linear_model.LinearRegression": {}}], ["MAE"],
                         batch={"max_records": 100, "max_wait_ms": 10})
    assert PipelineRunner(load_pipeline(path), until_idle_s=1.5).run().exit_code == 0
    rewind = Consumer({"bootstrap.servers": fresh_broker, "group.id": "learn.model"})
    rewind.commit(offsets=[TopicPartition("features", 0, 0)], asynchronous=False)
    rewind.close()

    assert PipelineRunner(load_pipeline(path), until_idle_s=1.5).run().exit_code == 0
    assert len(read_topic(fresh_broker, "scored").offsets) == len(stream)  # nothing produced again
    _header, (state, models) = CheckpointStore(tmp_path / "checkpoints", "learn", "model").load(
        "features+0", "partition-state")
    assert models[""].learned == len(stream)
    expected = evaluate.progressive_val_score(stream, linear_model.LinearRegression(), metrics.MAE())
    assert state.metrics[0].cumulative.get() == pytest.approx(expected.get(), abs=1e-9)


def test_classification_output_agrees_with_river(fresh_broker: str, tmp_path: Path) -> None:
    stream = list(datasets.Phishing())
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(tmp_path, fresh_broker, [{"preprocessing.StandardScaler": {}},
                                                  {"linear_model.LogisticRegression": {}}],
                         ["Accuracy", "LogLoss"])
    assert PipelineRunner(load_pipeline(path), until_idle_s=1.5).run().exit_code == 0

    rows = output_rows(tmp_path, "y, prediction, probabilities")
    assert len(rows) == len(stream)
    accuracy, log_loss = metrics.Accuracy(), metrics.LogLoss()
    for y, prediction, probabilities in rows:
        if prediction is not None:
            accuracy.update(y, prediction)
        if probabilities:
            log_loss.update(y, {label == "True": p for label, p in probabilities.items()
                                if p is not None})
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    expected_accuracy = evaluate.progressive_val_score(stream, model.clone(), metrics.Accuracy())
    expected_log_loss = evaluate.progressive_val_score(stream, model.clone(), metrics.LogLoss())
    assert accuracy.get() == pytest.approx(expected_accuracy.get(), abs=1e-9)
    assert log_loss.get() == pytest.approx(expected_log_loss.get(), abs=1e-9)


def test_sigkill_mid_stream_then_restart_learns_each_record_once(
    fresh_broker: str, tmp_path: Path
) -> None:
    stream = list(itertools.islice(datasets.synth.Friedman(seed=7), 40_000))
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(tmp_path, fresh_broker, [{"linear_model.LinearRegression": {}}], ["MAE"],
                         batch={"max_records": 100, "max_wait_ms": 10})
    log = tmp_path / "runs.log"
    finish_logged(start_logged(stage_command(path, "data", "0.5"), log), log, timeout_s=120)
    store = CheckpointStore(tmp_path / "checkpoints", "learn", "model")
    stage = start_logged(stage_command(path, "model"), log)
    covered = wait_for_checkpoint(store, 8_000)
    stage.send_signal(signal.SIGKILL)
    stage.wait(timeout=30)
    assert 8_000 <= covered < len(stream), f"killed at {covered}: not mid-stream"
    finish_logged(start_logged(stage_command(path, "model", "1"), log), log, timeout_s=180)

    model = linear_model.LinearRegression()
    expected = evaluate.progressive_val_score(stream, model, metrics.MAE())
    header, (state, models) = store.load("features+0", "partition-state")
    # Offsets are not dense (sources write in transactions, whose markers take offsets too).
    last_offset = max(read_topic(fresh_broker, "features").offsets)
    assert header["next_offsets"] == {"features": last_offset + 1}
    assert state.metrics[0].cumulative.get() == pytest.approx(expected.get(), abs=1e-9)
    slot = models[""]
    assert slot.learned == len(stream)
    assert scored_versions(fresh_broker) == set(range(len(stream)))  # no output skipped
    weights = slot.model.estimator.weights  # JSON turned Friedman's integer keys into strings
    assert set(weights) == {str(name) for name in model.weights}
    for name, weight in model.weights.items():
        assert weights[str(name)] == pytest.approx(weight, abs=1e-9)


def test_a_killed_worker_restarts_its_stage_from_the_checkpoint(
    fresh_broker: str, tmp_path: Path
) -> None:
    stream = list(itertools.islice(datasets.synth.Friedman(seed=3), 20_000))
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(tmp_path, fresh_broker, [{"linear_model.LinearRegression": {}}], ["MAE"],
                         batch={"max_records": 100, "max_wait_ms": 10})
    runner = PipelineRunner(load_pipeline(path), until_idle_s=1.5)
    results: list[RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))
    thread.start()
    store = CheckpointStore(tmp_path / "checkpoints", "learn", "model")
    wait_for_checkpoint(store, 3_000)
    [stage] = [stage for stage in runner.stages if isinstance(stage, ModelStage)]
    assert stage.worker is not None
    os.kill(stage.worker.pids[0], signal.SIGKILL)  # as the kernel's OOM killer would
    thread.join(timeout=180)
    assert not thread.is_alive()
    [result] = results
    assert result.exit_code == 0, result.reason
    restarts = runner.metrics.registry.get_sample_value(
        "streamflow_stage_restarts_total", {"pipeline": "learn", "stage": "model"})
    assert restarts == 1

    _header, (state, models) = store.load("features+0", "partition-state")
    assert models[""].learned == len(stream)  # each record learned once, across the restart
    assert scored_versions(fresh_broker) == set(range(len(stream)))  # no output skipped
    expected = evaluate.progressive_val_score(stream, linear_model.LinearRegression(), metrics.MAE())
    assert state.metrics[0].cumulative.get() == pytest.approx(expected.get(), abs=1e-9)


def test_delayed_labels_drift_and_failures_cross_the_worker(fresh_broker: str, tmp_path: Path) -> None:
    """Labels on their own topic, a drift detector with its topic, a user's estimator factory
    and records it refuses, through the stage and its worker process. The labels come in a
    second run: the features wait for them in the checkpoint (two topics have no order)."""
    config = {
        "pipeline": "late",
        "kafka": {"bootstrap": fresh_broker},
        "topics": [{"name": name, "partitions": 1} for name in ("features", "labels", "scored")],
        "models": [{
            "name": "model", "input": "features", "output": "scored", "target": "y",
            "features": ["x"], "estimator": "tests.estimators:picky",
            "metrics": ["MAE"], "labels": {"topic": "labels"},
            "drift": {"detector": {"drift.PageHinkley": {"mode": "up"}}, "topic": "late.drift"},
            "checkpoint": {"path": str(tmp_path / "checkpoints")},
        }],
        "metrics": {"port": 0},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    count, refused_features, refused_label = 600, range(0, 600, 50), 7
    create_transport("confluent", fresh_broker).admin().create_topics(
        [TopicSpec("features", 1), TopicSpec("labels", 1)]
    )
    producer = Producer({"bootstrap.servers": fresh_broker})
    for i in range(count):
        x = -1.0 if i in refused_features else 1.0
        producer.produce("features", json.dumps({"x": x}).encode(), f"k{i}".encode())
    producer.flush()
    assert PipelineRunner(load_pipeline(path), until_idle_s=1.5).run().exit_code == 0
    for i in range(count):  # the target jumps halfway: drift
        y = -1.0 if i == refused_label else 1.0 if i < count // 2 else 80.0
        producer.produce("labels", json.dumps({"y": y}).encode(), f"k{i}".encode())
    producer.produce("labels", b'{"y": 1.0}', b"nobody")
    producer.flush()

    runner = PipelineRunner(load_pipeline(path), until_idle_s=1.5)
    assert runner.run().exit_code == 0

    def sample(name: str) -> float:
        labels = {"pipeline": "late", "stage": "model", "model": "Picky"}
        return runner.metrics.registry.get_sample_value(name, labels) or 0.0

    assert len(read_topic(fresh_broker, "scored").values) == count - len(refused_features)
    dead = read_topic(fresh_broker, "late.dlq")
    errors = sorted((h["streamflow.original.topic"], h["streamflow.error.class"])
                    for h in map(dict, dead.headers))
    assert errors == [(b"features", b"ValueError")] * len(refused_features) + [
        (b"labels", b"ArithmeticError")]
    assert sample("streamflow_model_records_learned_total") == count - len(refused_features) - 1
    # The refused features never waited for their labels; one label matches no key at all.
    assert sample("streamflow_model_labels_unmatched_total") == len(refused_features) + 1
    drift = read_topic(fresh_broker, "late.drift")
    assert drift.values and sample("streamflow_model_drift_events_total") == len(drift.values)
    assert all(json.loads(value)["offset"] >= count // 2 for value in drift.values)


# Runs ``streamflow run ARGS`` or ``python -m benchmarks.isolated ARGS`` (the benchmarks' stage
# process) in this interpreter, then prints what it imported of river's, pandas and DuckDB, and
# its peak RSS.
IMPORTS = """
import json, runpy, sys
command, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(command, run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
left_out = ("river", "scipy", "sklearn", "pandas", "duckdb")
print(json.dumps({"imported": sorted(name for name in sys.modules
                                     if name.split(".")[0] in left_out),
                  "peak_rss": status["VmHWM"].strip()}))
"""


def imports_of(module: str, *args: str) -> dict[str, Any]:
    ran = subprocess.run([sys.executable, "-c", IMPORTS, module, *args], capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert ran.returncode == 0, ran.stderr[-3000:]
    return json.loads(ran.stdout.splitlines()[-1])


def test_the_stage_process_leaves_river_to_its_workers(fresh_broker: str, tmp_path: Path) -> None:
    """`streamflow run` and the benchmarks' `python -m benchmarks.isolated` run a model stage
    (its task and metrics left to the worker) whose process never imports river, scipy or
    sklearn, nor pandas (streamflow.runtime.process) nor DuckDB (no stage of its runs SQL);
    its workers do, and predict as river does."""
    stream = list(datasets.TrumpApproval())
    write_dataset(tmp_path / "data.jsonl", stream)
    estimator = [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}]
    path = pipeline_file(tmp_path, fresh_broker, estimator, None)
    run = imports_of("streamflow", "run", str(path), "--until-idle", "1.5")
    assert run["imported"] == []
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    expected = []
    for x, y in stream:
        expected.append(model.predict_one(x))
        model.learn_one(x, y)
    assert [prediction for (prediction,) in output_rows(tmp_path, "prediction")] == expected

    config = yaml.safe_load(path.read_text())
    del config["sources"], config["sinks"]
    config["pipeline"] = "isolated"  # a group of its own, from the features topic's start
    config["models"][0]["checkpoint"]["path"] = str(tmp_path / "isolated")
    settings = tmp_path / "isolated.json"
    settings.write_text(json.dumps(config))
    isolated = imports_of("benchmarks.isolated", str(settings), "model", "--records",
                          str(len(stream)))
    assert isolated["imported"] == []
    print(f"peak RSS of the stage's process: streamflow run {run['peak_rss']}, "
          f"benchmarks.isolated {isolated['peak_rss']}")
