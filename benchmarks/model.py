"""Model workload: a river ``learn_one`` model as a streamflow stage vs a plain river loop.

Both see the same records (river's synthetic Friedman stream) and the same model
(StandardScaler | LinearRegression), predicting then learning each record and updating MAE.
The stage reads them from a one-partition topic on the chosen broker and writes predictions
to another; its time runs from the first consumed record to the last acknowledged output. The
stage runs under both guarantees (``streamflow-exactly-once``: a transaction per batch).
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
import uuid
from typing import Any

from confluent_kafka import Producer
from river import datasets, linear_model, metrics, preprocessing

from benchmarks.common import local_broker, measure_stage
from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import TopicSpec, create_transport

WORKLOAD = "river-learn-one-regression"


def records(count: int) -> list[tuple[dict[str, float], float]]:
    return [({f"x{k}": v for k, v in x.items()}, y)
            for x, y in itertools.islice(datasets.synth.Friedman(seed=42), count)]


def run_river(stream: list[tuple[dict[str, float], float]]) -> float:
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    metric = metrics.MAE()
    started = time.perf_counter()
    for x, y in stream:
        y_pred = model.predict_one(x)
        metric.update(y, y_pred)
        model.learn_one(x, y)
    return len(stream) / (time.perf_counter() - started)


def run_streamflow(bootstrap: str, topic: str, count: int, guarantee: str = "at_least_once"
                   ) -> float:
    name = f"model{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as checkpoints:
        config = parse_pipeline({
            "pipeline": name,
            "kafka": {"bootstrap": bootstrap},
            "topics": [{"name": f"{name}.out", "partitions": 1}],
            "models": [{
                "name": "model", "input": topic, "output": f"{name}.out", "target": "y",
                "estimator": [{"preprocessing.StandardScaler": {}},
                              {"linear_model.LinearRegression": {}}],
                "metrics": ["MAE"], "checkpoint": {"path": checkpoints},
            }],
            "metrics": {"enabled": False},
            "runtime": {"batch": {"max_records": 5000, "max_wait_ms": 20}, "guarantee": guarantee},
        })
        return measure_stage(PipelineRunner(config), "model", count)


def run_model(records_count: int, repeat: int) -> list[dict[str, Any]]:
    stream = records(records_count)
    best = {"streamflow": 0.0, "streamflow-exactly-once": 0.0, "river": 0.0}
    with local_broker() as bootstrap:
        topic = "bench.model.input"
        create_transport("confluent", bootstrap).admin().create_topics([TopicSpec(topic, 1)])
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        for x, y in stream:
            producer.produce(topic, json.dumps({**x, "y": y}).encode())
            producer.poll(0)
        producer.flush()
        for _round in range(repeat):
            for system, run in (
                ("river", lambda: run_river(stream)),
                ("streamflow", lambda: run_streamflow(bootstrap, topic, len(stream))),
                ("streamflow-exactly-once",
                 lambda: run_streamflow(bootstrap, topic, len(stream), "exactly_once")),
            ):
                rate = run()
                print(f"{system}: {rate:,.0f} events/s", flush=True)
                best[system] = max(best[system], rate)
    overhead = best["river"] / best["streamflow"] - 1
    print(f"stage overhead vs plain river: {overhead:.1%}", flush=True)
    return [{"system": system, "workload": WORKLOAD, "events_per_s": round(rate),
             "records": records_count} for system, rate in best.items()]
