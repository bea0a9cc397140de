"""Model workload: a river ``learn_one`` model as a streamflow stage vs a plain river loop and a
Quix Streams app (benchmarks/peers/quix_model.py, when `make bench-peers` installed it).

All see the same records (river's synthetic Friedman stream) and the same model
(StandardScaler | LinearRegression), predicting then learning each record and updating MAE.
The stage reads them from a one-partition topic on the chosen broker and writes predictions
to another; its time runs from the first consumed record to the last acknowledged output. The
stage runs under both guarantees (``streamflow-exactly-once``: a transaction per batch), and
``streamflow-2-partitions`` reads the same records spread over two partitions, which its two
worker processes learn apart (one model per partition: issue 16's "beats plain river on 2
cores").
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer
from river import datasets, linear_model, metrics, preprocessing

from benchmarks.common import broker_cpu_seconds, local_broker
from benchmarks.processes import (
    Measures,
    TopicWatch,
    peer_command,
    peers_missing,
    run_self_timed,
    run_until,
    scratch,
    streamflow_command,
)
from benchmarks.stats import measures_line, medians, rotated
from streamflow.transport import TopicSpec, create_transport

WORKLOAD = "river-learn-one-regression"


def records(count: int) -> list[tuple[dict[str, float], float]]:
    return [({f"x{k}": v for k, v in x.items()}, y)
            for x, y in itertools.islice(datasets.synth.Friedman(seed=42), count)]


def run_river(stream: list[tuple[dict[str, float], float]]) -> Measures:
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    metric = metrics.MAE()
    started, cpu_at_start = time.perf_counter(), time.thread_time()
    for x, y in stream:
        y_pred = model.predict_one(x)
        metric.update(y, y_pred)
        model.learn_one(x, y)
    return {"events_per_s": len(stream) / (time.perf_counter() - started),
            "cpu_us_per_event": (time.thread_time() - cpu_at_start) * 1e6 / len(stream)}


def with_broker_cpu(run: Callable[[], Measures], count: int) -> Measures:
    """``run()``'s measures, with the broker's CPU time over the whole run per record of the
    ``count`` it reads (``broker_cpu_us_per_event``)."""
    cpu_at_start = broker_cpu_seconds()
    measures = run()
    measures["broker_cpu_us_per_event"] = (broker_cpu_seconds() - cpu_at_start) * 1e6 / count
    return measures


def cpu_bound(measures: Measures) -> float:
    """The most records per second this machine's cores allow a stage with ``measures``: its
    processes' CPU per record and the broker's."""
    per_event_us = measures["cpu_us_per_event"] + measures["broker_cpu_us_per_event"]
    return (os.cpu_count() or 1) * 1e6 / per_event_us


def river_predictions(stream: list[tuple[dict[str, float], float]]) -> list[float]:
    """Plain river's prediction of each record, before it learns it."""
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    predictions = []
    for x, y in stream:
        predictions.append(model.predict_one(x))
        model.learn_one(x, y)
    return predictions


def run_quix(bootstrap: str, topic: str, expected: list[float]) -> dict[str, float]:
    """benchmarks/peers/quix_model.py until its output holds a prediction per record; each
    must be plain river's, in order (one partition)."""
    name = f"quix{uuid.uuid4().hex[:8]}"
    output = f"{name}.out"
    create_transport("confluent", bootstrap).admin().create_topics([TopicSpec(output, 1)])
    watch = TopicWatch(bootstrap)
    try:
        with scratch() as folder:
            mark = folder / "first"
            measured = run_until(*peer_command("quix", "quix_model", {
                "bootstrap": bootstrap, "input": topic, "output": output, "group": name,
                "mark": str(mark)}), len(expected), mark, watch.tally([output]), len(expected))
        found = [json.loads(value)["prediction"] for value in watch.values(output)]
    finally:
        watch.close()
    if found != expected:
        wrong = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b),
                     min(len(found), len(expected)))
        raise AssertionError(f"quix: {len(found)} predictions for {len(expected)} records, "
                             f"first differing at record {wrong}")
    return measured


def run_streamflow(bootstrap: str, topic: str, count: int, guarantee: str = "at_least_once"
                   ) -> Measures:
    """The model stage in a process of its own (``benchmarks.isolated``), with the peak RSS and
    PSS of its process tree: the stage's process and its workers."""
    name = f"model{uuid.uuid4().hex[:8]}"
    with scratch() as folder:
        settings = {
            "pipeline": name,
            "kafka": {"bootstrap": bootstrap},
            "topics": [{"name": f"{name}.out", "partitions": 1}],
            "models": [{
                "name": "model", "input": topic, "output": f"{name}.out", "target": "y",
                "estimator": [{"preprocessing.StandardScaler": {}},
                              {"linear_model.LinearRegression": {}}],
                "metrics": ["MAE"], "checkpoint": {"path": str(folder / "checkpoints")},
            }],
            "metrics": {"enabled": False},
            "runtime": {"batch": {"max_records": 5000, "max_wait_ms": 20}, "guarantee": guarantee},
        }
        return run_self_timed(*streamflow_command(settings, "model", count, folder))


def run_model(records_count: int, repeat: int) -> list[dict[str, Any]]:
    stream = records(records_count)
    runs: dict[str, list[dict[str, float]]] = {
        "streamflow": [], "streamflow-exactly-once": [], "streamflow-2-partitions": [],
        "river": []}
    skipped = peers_missing()
    if not skipped:
        runs["quix"] = []
        expected = river_predictions(stream)
    with local_broker() as bootstrap:
        topic, spread = "bench.model.input", "bench.model.input2"
        create_transport("confluent", bootstrap).admin().create_topics(
            [TopicSpec(topic, 1), TopicSpec(spread, 2)])
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        for index, (x, y) in enumerate(stream):
            value = json.dumps({**x, "y": y}).encode()
            producer.produce(topic, value)
            producer.produce(spread, value, partition=index % 2)
            producer.poll(0)
        producer.flush()
        for round_number in range(repeat):
            systems: dict[str, Callable[[], Measures]] = {
                "river": lambda: run_river(stream),
                "streamflow": lambda: run_streamflow(bootstrap, topic, len(stream)),
                "streamflow-exactly-once":
                    lambda: run_streamflow(bootstrap, topic, len(stream), "exactly_once"),
                # the records over two partitions, learned by one worker each (workers: auto)
                "streamflow-2-partitions": lambda: run_streamflow(bootstrap, spread, len(stream)),
                "quix": lambda: run_quix(bootstrap, topic, expected),
            }
            for system in rotated(list(runs), round_number):
                run = systems[system]
                measured = run() if system == "river" else with_broker_cpu(run, len(stream))
                print(measures_line(system, measured), flush=True)
                runs[system].append(measured)
    if skipped:
        print(skipped, flush=True)
    results = {system: medians(measured) for system, measured in runs.items()}
    if results["streamflow"]["events_per_s"]:  # 0 when its first batch held every record
        overhead = results["river"]["events_per_s"] / results["streamflow"]["events_per_s"] - 1
        print(f"stage overhead vs plain river: {overhead:.1%}", flush=True)
    # Issue 16's "1.6x plain river on 2 cores" against what the CPU each record costs allows:
    # the stage's processes and the broker share this machine's cores.
    spread_out = results["streamflow-2-partitions"]
    if spread_out.get("cpu_us_per_event"):
        spread_out["cpu_bound_events_per_s"] = bound = cpu_bound(spread_out)
        print(f"streamflow-2-partitions: {spread_out['cpu_us_per_event']:.1f} µs of CPU a record "
              f"in its processes and {spread_out['broker_cpu_us_per_event']:.1f} µs in the "
              f"broker allow at most {bound:,.0f} events/s on {os.cpu_count()} cores, "
              f"{bound / results['river']['events_per_s']:.2f}x plain river", flush=True)
    return [{"system": system, "workload": WORKLOAD, **{k: round(v, 1) for k, v in found.items()},
             "events_per_s": round(found["events_per_s"]), "records": records_count}
            for system, found in results.items()]
