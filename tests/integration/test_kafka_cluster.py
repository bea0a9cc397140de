"""Broker failures on a real three-node Apache Kafka cluster (KRaft, replication factor 3,
``min.insync.replicas`` 2): a 200,000-event pipeline keeps running through a SIGKILLed partition
leader, a SIGSTOPped broker and a restarted stage replica; /readyz and the metrics show the
outage; with ``runtime.guarantee: exactly_once`` every valid event lands exactly once in both
sinks and every malformed one exactly once in the dead letters.

generator → clean (2 replicas) → predict → PostgreSQL and Parquet, each stage its own
``streamflow run --stage`` process, as containers would run them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.sources.generator import GeneratorConfig, sensor_event
from streamflow.transport.broker import free_port
from tests.helpers import read_topic, start_logged
from tests.kafka_broker import KafkaCluster
from tests.source_runs import unique, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")]

COUNT = 200_000
RATE = 4_000
SEED = 7
PARTITIONS = 4
GROUPS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def pipeline(bootstrap: str, name: str, folder: Path, dsn: str) -> dict[str, Any]:
    return {
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap, "config": GROUPS},
        "topics": [{"name": f"{name}.{topic}", "partitions": PARTITIONS}
                   for topic in ("raw", "clean", "scored")],
        "sources": [{"name": "sensors", "type": "generator", "topic": f"{name}.raw", "count": COUNT,
                     "rate": RATE, "seed": SEED, "malformed_fraction": 0.02}],
        "processors": [{"name": "clean", "input": f"{name}.raw", "output": f"{name}.clean", "steps": [
            {"schema": {"device_id": {"type": "string", "required": True},
                        "ts": {"type": "int", "required": True},
                        "temperature": {"type": "float", "required": True},
                        "humidity": {"type": "float", "required": True},
                        "pressure": {"type": "float", "required": True},
                        "battery": {"type": "float"}}},
            {"sql": "SELECT *, temperature * 1.8 + 32 AS temperature_f FROM batch"}]}],
        "models": [{"name": "predict", "input": f"{name}.clean", "output": f"{name}.scored",
                    "target": "temperature", "features": ["humidity", "pressure"],
                    "estimator": [{"preprocessing.StandardScaler": {}},
                                  {"linear_model.LinearRegression": {}}],
                    "metrics": ["MAE"], "checkpoint": {"path": str(folder / "checkpoints")}}],
        "sinks": [{"name": "lake", "type": "parquet", "input": f"{name}.scored",
                   "path": str(folder / "lake")},
                  {"name": "warehouse", "type": "postgres", "input": f"{name}.scored", "dsn": dsn,
                   "table": name}],
        "runtime": {"guarantee": "exactly_once"},
    }


def start_stage(config: Path, stage: str, log: Path, port: int = 0) -> subprocess.Popen[bytes]:
    return start_logged([sys.executable, "-m", "streamflow", "run", str(config), "--stage", stage,
                         "--metrics-port", str(port)], log)


class HealthWatcher(threading.Thread):
    """Polls daemons' /readyz and /metrics: the reasons they gave for not being ready, and
    whether ``streamflow_broker_reachable`` was ever 0."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.reasons: set[str] = set()
        self.unreachable_seen = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            for port in self.ports:
                self._check(f"http://127.0.0.1:{port}")

    def _check(self, base: str) -> None:
        try:
            urllib.request.urlopen(f"{base}/readyz", timeout=2).close()
        except urllib.error.HTTPError as error:  # 503: not ready, and why
            self.reasons.update(json.loads(error.read()).get("components", {}).values())
        except OSError:  # not listening yet, or stopped
            return
        with contextlib.suppress(OSError):
            metrics = urllib.request.urlopen(f"{base}/metrics", timeout=2).read().decode()
            self.unreachable_seen |= any(line.startswith("streamflow_broker_reachable{")
                                         and line.endswith(" 0.0") for line in metrics.splitlines())


def leader_of(bootstrap: str, topic: str, partition: int) -> int:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return int(metadata.topics[topic].partitions[partition].leader)


class Progress:
    """Records written to the scored topic over time, and the longest time it did not grow."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        # Read committed: its end offsets are the last stable ones, past committed transactions.
        self.bootstrap = bootstrap
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("watch"),
                                  "isolation.level": "read_committed"})
        self.uncommitted = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("watch"),
                                     "isolation.level": "read_uncommitted"})
        self.topic = topic
        self.count, self.changed_at, self.longest_stall_s = 0, time.monotonic(), 0.0

    def poll(self) -> int:
        try:
            count = sum(self.consumer.get_watermark_offsets(TopicPartition(self.topic, p),
                                                            timeout=5)[1] for p in range(PARTITIONS))
        except Exception:  # a broker is down: no answer is no progress
            count = self.count
            # A client that asked during a leader change can keep timing out afterwards (in one
            # run it saw no progress for 240 s while every stage had committed all its input).
            self.consumer.close()
            self.consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("watch"),
                                      "isolation.level": "read_committed"})
        now = time.monotonic()
        if count > self.count:
            self.count, self.changed_at = count, now
        self.longest_stall_s = max(self.longest_stall_s, now - self.changed_at)
        return self.count

    def wait_for(self, count: int, timeout_s: float, processes: Callable[[], list[Any]]) -> None:
        deadline = time.monotonic() + timeout_s
        while self.poll() < count:
            assert all(p.poll() is None for p in processes()), "a stage process exited"
            assert time.monotonic() < deadline, (f"only {self.count} of {count} records scored; "
                                                 f"{self.diagnosis()}")
            time.sleep(0.5)

    def diagnosis(self) -> str:
        """Per topic of the pipeline, each partition's high watermark / last stable offset, and
        each stage group's committed offsets: where a stalled pipeline stands."""
        name = self.topic.rsplit(".", 1)[0]
        lines = []
        for topic, group in (("raw", "clean"), ("clean", "predict"), ("scored", "lake"),
                             ("scored", "warehouse")):
            places = [TopicPartition(f"{name}.{topic}", p) for p in range(PARTITIONS)]
            try:
                ends = [(self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1],
                         self.uncommitted.get_watermark_offsets(tp, timeout=5, cached=False)[1])
                        for tp in places]
                reader = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{name}.{group}",
                                   "isolation.level": "read_committed"})
                committed = [tp.offset for tp in reader.committed(places, timeout=10)]
                reader.close()
            except Exception as exc:  # a diagnosis, best effort
                lines.append(f"{topic}/{group}: {exc}")
                continue
            lines.append(f"{topic} (stable/high) {ends}, {group} committed {committed}")
        return "; ".join(lines)


def is_valid(value: bytes) -> bool:
    try:
        event = json.loads(value)
    except ValueError:
        return False
    return (isinstance(event, dict) and isinstance(event.get("device_id"), str)
            and isinstance(event.get("temperature"), float | int))


def test_broker_failures_lose_and_duplicate_nothing(tmp_path: Path, postgres_dsn: str) -> None:
    name = unique("chaos")
    config = tmp_path / "pipeline.yaml"
    with KafkaCluster(3, log_dir=tmp_path) as cluster:
        config.write_text(json.dumps(pipeline(cluster.bootstrap, name, tmp_path, postgres_dsn)))
        stages = {"sensors": 1, "clean": 2, "predict": 1, "lake": 1, "warehouse": 1}
        ports = {(stage, i): free_port() for stage, replicas in stages.items() for i in range(replicas)}
        processes = {key: start_stage(config, key[0], tmp_path / f"{key[0]}-{key[1]}.log", port)
                     for key, port in ports.items()}
        progress = Progress(cluster.bootstrap, f"{name}.scored")
        health = HealthWatcher([ports[key] for key in (("lake", 0), ("warehouse", 0), ("predict", 0))])
        health.start()
        try:
            progress.wait_for(COUNT // 10, 240, lambda: list(processes.values()))
            leader = leader_of(cluster.bootstrap, f"{name}.raw", 0) - 1
            cluster.kill_node(leader)
            time.sleep(8)
            cluster.start_node(leader)
            progress.wait_for(COUNT // 4, 240, lambda: list(processes.values()))
            paused = (leader + 1) % 3
            cluster.pause_node(paused)
            time.sleep(20)
            cluster.resume_node(paused)
            progress.wait_for(COUNT * 2 // 5, 240, lambda: list(processes.values()))
            replica = processes[("clean", 1)]
            replica.send_signal(signal.SIGTERM)
            assert replica.wait(60) == 0
            processes[("clean", 1)] = start_stage(config, "clean", tmp_path / "clean-1.log")

            generator = GeneratorConfig(seed=SEED, malformed_fraction=0.02)
            values = [sensor_event(generator, index)[1] for index in range(COUNT)]
            expected = sorted(json.loads(value)["ts"] for value in values if is_valid(value))
            invalid = sorted(value for value in values if not is_valid(value))
            progress.wait_for(len(expected), 600, lambda: list(processes.values()))
            sinks = Sinks(tmp_path / "lake", postgres_dsn, name)
            wait_until(lambda: sinks.settled(set(expected)), 180,
                       "both sinks to hold every valid record and stop growing")
        finally:
            health.stopped.set()
            for process in processes.values():
                process.send_signal(signal.SIGTERM)
            exits = [process.wait(90) for process in processes.values()]
        dead = sorted(read_topic(cluster.bootstrap, f"{name}.dlq").values)
    duplicates = {"parquet": len(sinks.parquet) - len(expected),
                  "postgres": len(sinks.postgres) - len(expected),
                  "dead letters": len(dead) - len(invalid)}
    print(f"scored {progress.count} offsets for {len(expected)} valid records; longest stall "
          f"{progress.longest_stall_s:.1f} s; duplicates {duplicates}; outages on /readyz: "
          f"{sorted(health.reasons)}")
    assert set(dead) == set(invalid), "a dead letter is missing, or one is not malformed"
    assert any(reason.startswith("brokers unreachable") for reason in health.reasons), health.reasons
    assert health.unreachable_seen, "streamflow_broker_reachable never showed the outage"
    assert exits == [0] * len(exits)
    assert duplicates == {"parquet": 0, "postgres": 0, "dead letters": 0}


class Sinks:
    """The ``ts`` of every row in both sinks, read until they hold every expected one and
    stopped growing for 5 s."""

    def __init__(self, lake: Path, dsn: str, table: str) -> None:
        self.lake, self.dsn, self.table = lake, dsn, table
        self.parquet: list[int] = []
        self.postgres: list[int] = []
        self.changed_at = time.monotonic()

    def settled(self, expected: set[int]) -> bool:
        parquet, postgres = parquet_ts(self.lake), postgres_ts(self.dsn, self.table)
        if (parquet, postgres) != (self.parquet, self.postgres):
            self.parquet, self.postgres, self.changed_at = parquet, postgres, time.monotonic()
        return (set(parquet) == set(postgres) == expected
                and time.monotonic() - self.changed_at >= 5)


def parquet_ts(folder: Path) -> list[int]:
    if not any(folder.rglob("*.parquet")):
        return []
    pattern = str(folder / "**" / "*.parquet")
    return sorted(row[0] for row in duckdb.sql(f"SELECT ts FROM read_parquet('{pattern}')").fetchall())


def postgres_ts(dsn: str, table: str) -> list[int]:
    with psycopg.connect(dsn) as connection:
        if connection.execute("SELECT to_regclass(%s)", (f'"{table}"',)).fetchone() == (None,):
            return []
        return sorted(row[0] for row in connection.execute(f'SELECT ts FROM "{table}"'))
