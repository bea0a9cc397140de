"""Core workload: one topic → topic stage doing JSON parse, schema check, one derived field, produce.

Both systems read the same pre-loaded input topic on one broker and write every record
to an output topic. Timing runs from the first consumed record to the last acknowledged output
record, so the consumer-group join is not counted for either.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import Consumer, Producer

from benchmarks.common import local_broker, measure_stage
from benchmarks.processes import Measures
from benchmarks.stats import measures_line, medians, rotated
from connectors.sources.generator import GeneratorConfig, sensor_event
from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import TopicSpec, create_transport
from streamflow.transport.broker import free_port

WORKLOAD = "json-parse-schema-derive-produce"
PARTITIONS = 4
REQUIRED = {"device_id": str, "ts": int, "temperature": float, "humidity": float, "pressure": float}
TYPE_NAMES = {str: "string", int: "int", float: "float"}


def schema_step() -> dict[str, Any]:
    """The schema step the stage workloads start with: REQUIRED's fields, each required."""
    return {"schema": {field: {"type": TYPE_NAMES[kind], "required": True}
                       for field, kind in REQUIRED.items()}}


def load_input(bootstrap: str, topic: str, records: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    config = GeneratorConfig(seed=1)
    for index in range(records):
        key, value = sensor_event(config, index)
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()


def run_raw_confluent(bootstrap: str, source: str, records: int) -> float:
    """A hand-written consume → json.loads → check → derive → json.dumps → produce loop."""
    target = f"raw-out-{uuid.uuid4().hex[:8]}"
    create_transport("confluent", bootstrap).admin().create_topics([TopicSpec(target, PARTITIONS)])
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False, "session.timeout.ms": 6000,
    })
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    consumer.subscribe([source])
    seen = 0
    started = None
    while seen < records:
        messages = consumer.consume(5000, 0.5)
        if not messages:
            continue
        if started is None:
            started = time.perf_counter()
        for message in messages:
            if message.error():
                continue
            seen += 1
            try:
                event = json.loads(message.value())
            except ValueError:
                continue
            if not isinstance(event, dict) or any(
                not isinstance(event.get(name), kind) for name, kind in REQUIRED.items()
            ):
                continue
            event["temperature_f"] = event["temperature"] * 1.8 + 32
            while True:
                try:
                    producer.produce(target, json.dumps(event).encode(), message.key())
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush()
        consumer.commit(asynchronous=True)
    assert started is not None
    elapsed = time.perf_counter() - started
    consumer.close()
    return records / elapsed


def stage_settings(bootstrap: str, source: str, name: str, stage: dict[str, Any],
                   metrics: bool = False, guarantee: str = "at_least_once") -> dict[str, Any]:
    """Pipeline ``name``: one processor stage named ``stage`` reading ``source`` into
    ``<name>.out`` (``stage``: its settings besides name, input and output); its dead letters go
    to ``<name>.dlq``."""
    return {
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": f"{name}.out", "partitions": PARTITIONS}],
        "processors": [{"name": "stage", "input": source, "output": f"{name}.out", **stage}],
        "metrics": {"enabled": metrics, "port": free_port()},
        "runtime": {"batch": {"max_records": 10_000, "max_wait_ms": 50}, "guarantee": guarantee},
    }


def run_stage(bootstrap: str, source: str, records: int, stage: dict[str, Any],
              on_running: Callable[[PipelineRunner], None] | None = None,
              guarantee: str = "at_least_once", name: str | None = None) -> Measures:
    """Events per second of one processor stage reading ``source`` (``stage``: its settings
    besides name, input and output) in pipeline ``name`` (a fresh one by default). With
    ``on_running``, the metrics endpoint and dashboard are served on a free port and
    ``on_running`` is called once the stage runs."""
    config = parse_pipeline(stage_settings(bootstrap, source, name or f"bench{uuid.uuid4().hex[:8]}",
                                           stage, on_running is not None, guarantee))
    return measure_stage(PipelineRunner(config), "stage", records, on_running or (lambda r: None))


def run_streamflow(bootstrap: str, source: str, records: int,
                   on_running: Callable[[PipelineRunner], None] | None = None,
                   guarantee: str = "at_least_once") -> Measures:
    """The same work as a streamflow processor stage: schema step, then a SQL derived field."""
    return run_stage(bootstrap, source, records, {"steps": [
        schema_step(), {"sql": "SELECT *, temperature * 1.8 + 32 AS temperature_f FROM batch"},
    ]}, on_running, guarantee)


def compare(systems: dict[str, Callable[[str, str, int], float | Measures]], workload: str,
            records: int, repeat: int, skipped: str | None = None) -> list[dict[str, Any]]:
    """Run each system in turn (see :func:`rotated`), ``repeat`` rounds, on the same pre-loaded
    topic; report each one's median events per second (and of its other measures, when it has
    some)."""
    runs: dict[str, list[Measures]] = {system: [] for system in systems}
    with local_broker() as bootstrap:
        source = "bench.input"
        create_transport("confluent", bootstrap).admin().create_topics([TopicSpec(source, PARTITIONS)])
        load_input(bootstrap, source, records)
        for round_number in range(repeat):
            for system in rotated(list(systems), round_number):
                measured = systems[system](bootstrap, source, records)
                if not isinstance(measured, dict):
                    measured = {"events_per_s": measured}
                print(measures_line(system, measured), flush=True)
                runs[system].append(measured)
    if skipped:
        print(skipped, flush=True)
    return [{"system": system, "workload": workload,
             **{name: round(value, 1) for name, value in medians(measured).items()},
             "events_per_s": round(medians(measured)["events_per_s"]), "records": records}
            for system, measured in runs.items()]


def run_core(records: int, repeat: int) -> list[dict[str, Any]]:
    return compare({"streamflow": run_streamflow,
                    "streamflow-exactly-once": partial(run_streamflow, guarantee="exactly_once"),
                    "raw-confluent": run_raw_confluent}, WORKLOAD, records, repeat)
