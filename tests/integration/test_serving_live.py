"""Serving on a real broker: a model stage learns TrumpApproval from Kafka and serves its newest
registry version while it runs (``serving:``); ``streamflow serve`` serves the last version once
the pipeline has stopped. The answers equal river's model trained on the same records."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from river import datasets, linear_model, preprocessing

from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner, RunResult
from tests.integration.test_model_stage import pipeline_file, write_dataset

ESTIMATOR = [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}]


def post(url: str, body: bytes) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return [json.loads(line) for line in response.read().splitlines()]


def river_trained_on(stream: list[tuple[dict[str, Any], Any]], count: int) -> Any:
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for x, y in stream[:count]:
        model.learn_one(x, y)
    return model


def test_a_model_stage_serves_its_newest_version_and_serve_the_last_one(
    fresh_broker: str, tmp_path: Path
) -> None:
    stream = list(datasets.TrumpApproval())
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(tmp_path, fresh_broker, ESTIMATOR, ["MAE"],
                         serving={"port": 0, "poll_interval_s": 0.1})
    runner = PipelineRunner(load_pipeline(path))
    results: list[RunResult] = []
    thread = threading.Thread(target=lambda: results.append(runner.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (runner.model_servers and (served := runner.model_servers[0].served)
                   and served.models[""][1].learned >= 1000):
            assert time.monotonic() < deadline, "no version of 1,000 records learned was served"
            time.sleep(0.1)
        server = runner.model_servers[0]
        records = [x for x, _ in stream[-20:]]
        answers = post(server.url, b"\n".join(json.dumps(x).encode() for x in records))
        learned = answers[0]["records_learned"]  # checkpoints come every 500 records or more
        assert {answer["version"] for answer in answers} == {server.registry.numbers()[-1]}
        river = river_trained_on(stream, learned)
        assert [answer["prediction"] for answer in answers] == [
            pytest.approx(river.predict_one(x), abs=1e-9) for x in records]
    finally:
        runner.stop()
        thread.join(timeout=120)
    assert results and results[0].exit_code == 0

    serve = subprocess.Popen([sys.executable, "-m", "streamflow", "serve", str(path), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        url = line.split(" at ", 1)[1].split("/predict", 1)[0]
        [answer] = post(url, json.dumps(stream[0][0]).encode())
        assert answer["records_learned"] == len(stream)  # the checkpoint at the stop
        river = river_trained_on(stream, len(stream))
        assert answer["prediction"] == pytest.approx(river.predict_one(stream[0][0]), abs=1e-9)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) == 0
