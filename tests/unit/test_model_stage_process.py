"""A model stage's process imports neither river nor scipy nor sklearn: only its workers do, and
the first one tells the stage what it needs to know of river as it starts (the task, the default
metrics, the model's label: streamflow.ml.worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from river import datasets, linear_model, metrics, preprocessing

HEAVY = ("river", "scipy", "sklearn")  # not pandas: pyarrow imports it at its first pa.array

# A fresh interpreter loads the pipeline and runs its model stage on the in-memory transport as
# `streamflow run` does (which has a child check the models: streamflow.runtime.model_checks),
# then prints the output and what it imported.
STAGE = r"""
import json, sys, time
from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import OutgoingBatch, TopicSpec, read_until
from streamflow.transport.memory import MemoryTransport

path, records = sys.argv[1], [line.encode() for line in open(sys.argv[2], "rb").read().decode().splitlines()]
config = load_pipeline(path, resolve_models=False)
[model] = config.models
transport = MemoryTransport("memory://lean")
transport.admin().create_topics([TopicSpec(topic.name, topic.partitions)
                                 for topic in config.topic_specs()])
producer = transport.producer()
producer.produce([OutgoingBatch("features", records)])
producer.close()
runner = PipelineRunner(config)
stage = runner._model_stage(model, transport)
stage.start()
deadline = time.monotonic() + 120
while sum(transport.cluster.high_watermarks("scored").values()) < len(records):
    assert stage.error is None and time.monotonic() < deadline, repr(stage.error)
    time.sleep(0.05)
stage.stop()
stage.thread.join(60)
assert stage.error is None, repr(stage.error)
output = [json.loads(value) for batch in read_until(transport, {("scored", 0): 0})
          for value in batch.values]
mae = runner.metrics.registry.get_sample_value("streamflow_model_metric", {
    "pipeline": "lean", "stage": "predict", "model": "StandardScaler|LinearRegression",
    "metric": "MAE", "window": "cumulative", "partition": "0"})
print(json.dumps({"imported": sorted(name for name in sys.modules if name.split(".")[0] in HEAVY),
                  "predictions": [record["prediction"] for record in output],
                  "versions": [record["model_version"] for record in output], "mae": mae}))
"""


def test_a_model_stage_runs_without_river_in_its_process(tmp_path: Path) -> None:
    stream = list(datasets.TrumpApproval())
    data = tmp_path / "features.jsonl"
    data.write_text("".join(json.dumps({**x, "y": y}) + "\n" for x, y in stream))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": "lean",
        "kafka": {"bootstrap": "embedded"},  # not started: the stage runs in memory
        "topics": [{"name": "features", "partitions": 1, "external": True},
                   {"name": "scored", "partitions": 1}],
        "models": [{"name": "predict", "input": "features", "output": "scored", "target": "y",
                    # no task and no metrics: the worker tells them
                    "estimator": [{"preprocessing.StandardScaler": {}},
                                  {"linear_model.LinearRegression": {}}],
                    "checkpoint": {"path": str(tmp_path / "checkpoints")}}],
        "metrics": {"enabled": False},
    }))
    ran = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{STAGE}", str(path), str(data)],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    found = json.loads(ran.stdout.splitlines()[-1])
    assert found["imported"] == []

    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    expected, mae = [], metrics.MAE()
    for x, y in stream:
        expected.append(model.predict_one(x))
        mae.update(y, expected[-1])
        model.learn_one(x, y)
    assert found["predictions"] == expected  # bit for bit
    assert found["versions"] == list(range(len(stream)))
    assert found["mae"] == pytest.approx(mae.get(), abs=1e-9)
