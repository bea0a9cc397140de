"""The broker a benchmark runs on, and timing a streamflow stage from inside its own process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from confluent_kafka import Consumer, KafkaException, TopicPartition

from benchmarks.processes import Measures, tree_cpu_seconds
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import TopicSpec, create_transport
from streamflow.transport.broker import EmbeddedBroker
from tests.kafka_broker import KafkaCluster

POLL_S = 0.002
MAX_POLL_S = 1.0  # an early estimate from a few records may be far too long
BROKERS = ("tansu", "kafka")
_chosen = {"broker": "tansu"}
_running_brokers: list[psutil.Process] = []
WARM_UP_TOPIC = "bench.warm-up"
WARM_UP_TIMEOUT_S = 60.0


def choose_broker(kind: str) -> None:
    """Run the following workloads on ``kind``: the embedded Tansu or Apache Kafka (KRaft)."""
    if kind not in BROKERS:
        raise ValueError(f"unknown broker {kind!r}: one of {', '.join(BROKERS)}")
    _chosen["broker"] = kind


def chosen_broker() -> str:
    return _chosen["broker"]


@contextmanager
def local_broker(**kafka_settings: Any) -> Iterator[str]:
    """The bootstrap address of a broker of the chosen kind, started for this run and stopped
    after it (``kafka_settings`` are extra broker settings, for Apache Kafka only). While it
    runs, :func:`broker_cpu_seconds` reads its CPU time."""
    if chosen_broker() == "kafka":
        with KafkaCluster(1, settings=kafka_settings) as cluster:
            _create_offsets_topic(cluster.bootstrap)
            with _broker_processes(process.pid for process in cluster.processes if process):
                yield cluster.bootstrap
    else:
        with EmbeddedBroker() as broker, _broker_processes([broker.pid] if broker.pid else []):
            yield broker.bootstrap


@contextmanager
def _broker_processes(pids: Iterable[int]) -> Iterator[None]:
    _running_brokers[:] = [psutil.Process(pid) for pid in pids]
    try:
        yield
    finally:
        _running_brokers.clear()


def broker_cpu_seconds() -> float:
    """The CPU time the running :func:`local_broker` has used so far."""
    if not _running_brokers:
        raise RuntimeError("no local_broker is running")
    return sum(tree_cpu_seconds(process) for process in _running_brokers)


def _create_offsets_topic(bootstrap: str) -> None:
    """Have Kafka create ``__consumer_offsets`` (50 partitions), as a fresh broker does for its
    first consumer group, in seconds: the start-up of whichever system ran first would count it."""
    create_transport("confluent", bootstrap).admin().create_topics([TopicSpec(WARM_UP_TOPIC, 1)])
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": WARM_UP_TOPIC,
                         "enable.auto.commit": False})
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    try:
        while True:
            try:
                consumer.commit(offsets=[TopicPartition(WARM_UP_TOPIC, 0, 0)], asynchronous=False)
                return
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def measure_stage(runner: PipelineRunner, stage: str, records: int,
                  on_running: Callable[[PipelineRunner], None] = lambda runner: None,
                  done: Callable[[PipelineRunner], float] | None = None,
                  cpu_seconds: Callable[[], float] | None = None) -> Measures:
    """Run the pipeline until ``stage`` has handled ``records``: its records per second, and
    with ``cpu_seconds`` (the CPU time used so far by what runs the pipeline), the CPU each
    record cost.

    Time runs from the first handled batch to the last one, so the consumer-group join is not
    counted, and neither are the records handled before the clock started. A run so short that
    the first poll already saw every record handled is timed from the pipeline's start instead,
    group join included.
    ``streamflow_records_in_total`` grows only after a batch's output was acknowledged. ``done``,
    when given, counts the finished records instead (e.g. rows a sink made durable).
    Each poll wakes this thread and reads the registry, which holds the GIL and may take the
    core from the stage or its model worker: once the stage runs, polls come at half the
    expected remaining time, down to every ``POLL_S`` and up to every ``MAX_POLL_S`` (a stage
    that handles its first records one by one, as Faust does, made the estimate from 2 records
    and slept 566 s), so that they stay few.
    """
    thread = threading.Thread(target=runner.run)
    launched = time.perf_counter()
    cpu_at_launch = cpu_seconds() if cpu_seconds else 0.0
    thread.start()
    labels = {"pipeline": runner.config.pipeline, "stage": stage}

    def handled(runner: PipelineRunner) -> float:
        return runner.metrics.registry.get_sample_value("streamflow_records_in_total", labels) or 0

    count = done or handled
    started = finished = None
    at_start = counted = 0.0  # records handled when the clock started; records done now
    cpu_at_start = cpu_at_end = 0.0
    notified = False
    interval = POLL_S
    while finished is None:
        time.sleep(interval)
        if not notified and runner.stages:
            on_running(runner)
            notified = True
        if started is None:
            at_start = handled(runner)
            if at_start:
                started = time.perf_counter()
                cpu_at_start = cpu_seconds() if cpu_seconds else 0.0
            continue
        counted = count(runner)
        if counted >= records:
            finished = time.perf_counter()
            cpu_at_end = cpu_seconds() if cpu_seconds else 0.0
        elif counted > at_start:  # sleep half the expected remaining time: few, short at the end
            elapsed = time.perf_counter() - started
            interval = min(MAX_POLL_S, max(
                POLL_S, elapsed * (records - counted) / (counted - at_start) / 2))
    runner.stop()
    thread.join()
    assert started is not None
    if counted == at_start:  # nothing handled within the clock's window: time the whole run
        started, cpu_at_start, at_start = launched, cpu_at_launch, 0.0
    measures = {"events_per_s": (counted - at_start) / (finished - started)}
    if cpu_seconds:
        measures["cpu_us_per_event"] = (cpu_at_end - cpu_at_start) * 1e6 / (counted - at_start)
    return measures
