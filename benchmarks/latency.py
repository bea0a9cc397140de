"""Latency workload: a producer writes sensor records at a fixed rate, each with its send time
(``sent_us``), into a topic → topic clean stage (benchmarks.clean's rules, the send time declared
too); a reader takes arrival minus send time of every output record. Each system runs in a
process of its own (streamflow through ``benchmarks.isolated``, the peers with .venv-peers'
python) with its peak RSS sampled; ``cpu_us_per_event`` is the CPU time it (with its
descendants) used from the start of the timed sending until the output was complete, per record
sent in that time. Records sent before the measured period (one every 100 ms until the first
comes out: the group join) are checked but not timed. ``startup_s`` is the time from the
process's start to the first output record's arrival (the first record is sent as the process
starts): imports, group join and the first batch."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from benchmarks.clean import PEERS, canonical, clean_steps, expected_sets
from benchmarks.common import local_broker
from benchmarks.core import PARTITIONS, stage_settings
from benchmarks.peers.cleaning import LATENCY_FIELD
from benchmarks.processes import (
    Measures,
    TopicWatch,
    check_output,
    peer_command,
    peers_missing,
    running,
    scratch,
    streamflow_command,
)
from benchmarks.stats import latency_summary, medians, rotated
from connectors.sources.generator import GeneratorConfig, sensor_event
from streamflow.transport import TopicSpec, create_transport

WORKLOAD = "latency-topic-to-topic-clean"
TICK_S = 0.005
WARMUP_TIMEOUT_S = 120.0
QUIET_S = 3.0  # the output is complete once nothing arrived for this long after the last send
# Each system's first run on a fresh broker is not measured, and lasts at most this long: on
# 2 December, each system's first 20 s run after the broker started had about twice the p99 of
# its second (streamflow 62.8 then 29.2 ms, Quix 64.5 then 28.1 ms).
WARM_UP_RUN_S = 10.0


class Reader:
    """Reads ``topic`` from its start in a thread: each record's value and arrival time."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-latency",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        self._consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)
                               for partition in range(PARTITIONS)])
        self.arrivals: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.05)
            if message is not None and message.error() is None:
                self.arrivals.append((time.time(), message.value()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def stamped(value: bytes) -> bytes:
    """``value`` with the send time (now) as its last field, when it is a JSON object."""
    if value.startswith(b"{") and value.endswith(b"}"):
        return value[:-1] + b',"%s":%d}' % (LATENCY_FIELD.encode(), time.time_ns() // 1000)
    return value


class PacedProducer:
    """Writes the generator's sensor records, each with its send time, to ``topic``: one every
    100 ms until the system answers (its group join, not timed), then at a fixed rate."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
        self._topic = topic
        self._events = GeneratorConfig(seed=2)
        self.sent: list[bytes] = []
        self.warm_up_count = 0
        self.started = 0.0  # when the timed sending began (unix time)
        self.sending_s = 0.0

    def _send(self) -> None:
        key, value = sensor_event(self._events, len(self.sent))
        self.sent.append(stamped(value))
        self._producer.produce(self._topic, self.sent[-1], key)

    def warm_up(self, answered: Callable[[], bool], process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        while not answered():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args!r} produced no output")
            self._send()
            self._producer.poll(0.1)
        self.warm_up_count = len(self.sent)

    def at_rate(self, rate: int, seconds: float) -> int:
        """Send ``rate`` records a second for ``seconds``; how many."""
        self.started = time.time()
        total = int(rate * seconds)
        while (index := len(self.sent) - self.warm_up_count) < total:
            due = min(total, int((time.time() - self.started) * rate) + 1)
            for _ in range(due - index):
                self._send()
            self._producer.poll(0)
            time.sleep(TICK_S)
        self.sending_s = time.time() - self.started
        self._producer.flush()
        return total


def cpu_per_event(cpu_s: float, events: int) -> float:
    """Microseconds of CPU per event, to 0.1: ``cpu_s`` seconds spent on ``events`` events."""
    return round(cpu_s / events * 1e6, 1)


def wait_until_quiet(arrivals: list[Any], expected: int, sending_ended: float) -> None:
    """Until ``expected`` arrivals, or nothing arrived for ``QUIET_S`` after the sending ended."""
    while len(arrivals) < expected and time.time() - max(
            [arrivals[-1][0], sending_ended]) < QUIET_S:
        time.sleep(0.1)


def timed_latencies(arrivals: list[tuple[float, int]], started: float) -> list[float]:
    """Arrival minus send time in ms of the ``(arrival, sent_us)`` pairs sent from ``started``."""
    started_us = started * 1e6
    return [(arrival * 1e6 - sent_us) / 1000 for arrival, sent_us in arrivals
            if sent_us >= started_us]


def measure(bootstrap: str, system: str, rate: int, seconds: float) -> Measures:
    """One run of ``system`` at ``rate`` records per second for ``seconds``, checked."""
    name = f"{system.replace('-', '')}{uuid.uuid4().hex[:8]}"
    source, output, dead = f"{name}.in", f"{name}.out", f"{name}.dlq"
    create_transport("confluent", bootstrap).admin().create_topics(
        [TopicSpec(topic, PARTITIONS) for topic in (source, output, dead)])
    producer = PacedProducer(bootstrap, source)
    with scratch() as folder:
        if system == "streamflow":
            steps = clean_steps()
            steps[0]["schema"][LATENCY_FIELD] = {"type": "int", "required": True}
            command = streamflow_command(stage_settings(bootstrap, source, name, {"steps": steps}),
                                         "stage", None, folder)
        else:
            command = peer_command(system, f"{system}_clean", {
                "bootstrap": bootstrap, "input": source, "output": output, "dlq": dead,
                "group": name, "mark": str(folder / "first"), "latency": "1"})
        reader = Reader(bootstrap, output)
        spawned = time.time()
        with running(*command) as (process, sampler):
            producer.warm_up(lambda: bool(reader.arrivals), process)
            cpu_before = sampler.cpu_seconds()
            total = producer.at_rate(rate, seconds)
            expected = expected_sets(0, producer.sent)
            wait_until_quiet(reader.arrivals, sum(expected[0].values()),
                             producer.started + producer.sending_s)
            cpu_s = sampler.cpu_seconds() - cpu_before
            rss = sampler.stop()
        reader.stop()
    watch = TopicWatch(bootstrap)
    try:
        check_output(watch, system, output, dead, *expected, canonical)
    finally:
        watch.close()
    latencies = timed_latencies([(arrival, json.loads(value)[LATENCY_FIELD])
                                 for arrival, value in reader.arrivals], producer.started)
    return {"events_per_s": total / producer.sending_s, **latency_summary(latencies),
            "rss_peak_mb": rss, "pss_peak_mb": sampler.pss_peak_mb,
            "cpu_us_per_event": cpu_per_event(cpu_s, total),
            "startup_s": round(reader.arrivals[0][0] - spawned, 2)}


def warmed_up(system: str, found: Measures) -> None:
    """Say that ``system``'s warm-up run (see :data:`WARM_UP_RUN_S`) ended, with what it
    ``found``, which no result counts."""
    print(f"{system} (warm-up, not counted): p99_ms {found['p99_ms']:,.1f}", flush=True)


def run_latency(rate: int, seconds: float, repeat: int) -> list[dict[str, Any]]:
    """Each system in turn (see :func:`rotated`), ``repeat`` rounds after a warm-up run of each;
    each one's median of every measure."""
    systems = ["streamflow"]
    skipped = peers_missing()
    if not skipped:
        systems += PEERS
    runs: dict[str, list[Measures]] = {system: [] for system in systems}
    with local_broker() as bootstrap:
        for system in systems:
            warmed_up(system, measure(bootstrap, system, rate, min(seconds, WARM_UP_RUN_S)))
        for round_number in range(repeat):
            for system in rotated(systems, round_number):
                found = measure(bootstrap, system, rate, seconds)
                print(f"{system}: " + ", ".join(f"{k} {v:,.1f}" for k, v in found.items()),
                      flush=True)
                runs[system].append(found)
    if skipped:
        print(skipped, flush=True)
    return [{"system": system, "workload": WORKLOAD, **medians(found),
             "events_per_s": round(medians(found)["events_per_s"]), "rate": rate,
             "seconds": seconds} for system, found in runs.items()]

