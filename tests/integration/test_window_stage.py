"""Windowed processor stages on a real broker: aggregates, late and dead-lettered records, and
window state that survives a graceful stop and a SIGKILL without counting a record twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, Message, TopicPartition

from streamflow.api import Pipeline, route, sql, window
from streamflow.config import load_pipeline
from streamflow.processing.windows import iso_utc
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import OutgoingBatch, TopicSpec, create_transport

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
# Short sessions: quicker group joins, and a killed member leaves its group sooner.
FAST_GROUPS = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}


def produce(bootstrap: str, topic: str, records: list[tuple[str, dict[str, Any]]]) -> None:
    producer = create_transport("confluent", bootstrap).producer()
    producer.produce([OutgoingBatch(topic, [json.dumps(value).encode() for _key, value in records],
                                    [key.encode() for key, _value in records])])
    producer.close()


def peek(bootstrap: str, topic: str, timeout_s: float = 15) -> list[Message]:
    """Every record of ``topic`` (partition by partition), read without joining a group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "peek",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}
        messages: list[Message] = []
        for partition, end in ends.items():
            if not end:
                continue
            consumer.assign([TopicPartition(topic, partition, 0)])
            last, deadline = -1, time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                batch = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
                messages += batch
                last = batch[-1].offset() if batch else last
                if not batch and last >= end - 1:  # Tansu's end is the last batch's base + 1
                    break
            else:
                raise TimeoutError(f"reading {topic}[{partition}] took over {timeout_s}s")
        return messages
    finally:
        consumer.close()


def at(seconds: float) -> str:
    return iso_utc(T0 + round(seconds * 1000))


def test_windowed_stage_emits_aggregates_and_sends_late_records_aside(fresh_broker: str) -> None:
    pipeline = (
        Pipeline("win", bootstrap=fresh_broker, config=FAST_GROUPS)
        .topic("readings", partitions=2)
        .processor("agg", input="readings", output="per10s",
                   steps=[sql("SELECT * FROM batch WHERE device <> 'ignored'"),
                          route({"device = 'c'": "win.other"})],
                   batch={"max_records": 4, "max_wait_ms": 20},
                   window=window("tumbling", size_s=10, key=["device"], time_field="ts",
                                 allowed_lateness_s=5,
                                 aggregates={"n": "count", "avg": "mean:temp", "high": "max:temp",
                                             "p50": {"fn": "quantile", "field": "temp", "q": 0.5}}))
        .configure("metrics", port=0)
    )
    config = pipeline.build()
    admin = create_transport("confluent", fresh_broker).admin()
    admin.create_topics([TopicSpec(t.name, t.partitions, config=t.config) for t in config.topic_specs()])
    readings = [
        ("a", 1, 10), ("b", 2, 20), ("a", 4, 12), ("ignored", 5, 0), ("c", 5, 30),  # not windowed
        ("b", 6, 22), ("a", 11, 14),
        ("b", 12, 24),
        ("a", 9, 16),  # out of order, within the allowed lateness
        ("a", None, 1), ("b", 13, None),  # dead letters: no event time, no temp
        ("a", 25, 18), ("b", 26, 26),
        ("a", 3, 99), ("b", 8, 98), ("a", 17, 15),  # late: their windows closed at watermark 20
    ]
    produce(fresh_broker, "readings", [
        (device, {"device": device, **({"temp": temp} if temp is not None else {}),
                  **({"ts": at(second)} if second is not None else {})})
        for device, second, temp in readings
    ])
    runner = PipelineRunner(config, until_idle_s=1, metrics_port=0)
    assert runner.run().exit_code == 0

    output = peek(fresh_broker, "per10s")
    records = sorted((json.loads(m.value()) for m in output),
                     key=lambda r: (r["window_start"], r["device"]))
    assert records == [  # p50: the lower median, within the sketch's 1 %
        {"device": "a", "window_start": at(0), "window_end": at(10), "n": 3, "avg": 38 / 3,
         "high": 16, "p50": pytest.approx(12, rel=0.01)},
        {"device": "b", "window_start": at(0), "window_end": at(10), "n": 2, "avg": 21.0,
         "high": 22, "p50": pytest.approx(20, rel=0.01)},
        {"device": "a", "window_start": at(10), "window_end": at(20), "n": 1, "avg": 14.0,
         "high": 14, "p50": pytest.approx(14, rel=0.01)},
        {"device": "b", "window_start": at(10), "window_end": at(20), "n": 1, "avg": 24.0,
         "high": 24, "p50": pytest.approx(24, rel=0.01)},
    ]
    assert sorted(m.key() for m in output) == [b'["a"]', b'["a"]', b'["b"]', b'["b"]']

    assert [json.loads(m.value()) for m in peek(fresh_broker, "win.other")] == [
        {"device": "c", "temp": 30, "ts": at(5)}]
    late = peek(fresh_broker, "win.late")
    assert sorted(json.loads(m.value())["temp"] for m in late) == [15, 98, 99]
    headers = dict(late[0].headers())
    assert headers["streamflow.error.class"] == b"LateRecordError"
    assert b"closed windows missed" in headers["streamflow.error.message"]
    dead = peek(fresh_broker, "win.dlq")
    assert sorted(dict(m.headers())["streamflow.error.message"].decode() for m in dead) == [
        "event time is missing", "field 'temp' is missing, not a number"]

    def sample(name: str) -> float | None:
        return runner.metrics.registry.get_sample_value(name, {"pipeline": "win", "stage": "agg"})

    assert sample("streamflow_records_in_total") == 16
    assert sample("streamflow_records_out_total") == 10  # aggregated into a window, or routed
    assert sample("streamflow_records_filtered_total") == 4  # 'ignored' and the 3 late ones
    assert sample("streamflow_records_dead_lettered_total") == 2
    assert sample("streamflow_records_late_total") == 3
    assert sample("streamflow_window_results_total") == 4
    assert sample("streamflow_window_open") == 2  # [20, 30) of a and b


# --- restarts -----------------------------------------------------------------------------------

SIZE_S, LATENESS_S = 5, 2
DEVICES = ("d0", "d1", "d2")


def events(first: int, last: int) -> list[tuple[str, dict[str, Any]]]:
    """Every 100 ms a reading of the next device; every 37th goes back 30 s (late)."""
    produced = []
    for i in range(first, last):
        device = DEVICES[i % 3]
        seconds = i / 10 - (30 if i % 37 == 36 else 0)
        produced.append((device, {"device": device, "ts": at(seconds), "value": i}))
    return produced


def expected_windows(stream: list[tuple[str, dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Tumbling windows of one partition's events closed by its watermark, by hand."""
    windows: dict[tuple[str, int], list[int]] = defaultdict(list)
    max_ms = None
    for device, value in stream:
        ms = round((value["value"] / 10 - (30 if value["value"] % 37 == 36 else 0)) * 1000)
        max_ms = ms if max_ms is None else max(max_ms, ms)
        start = ms // (SIZE_S * 1000) * SIZE_S * 1000
        if start + SIZE_S * 1000 > max_ms - LATENESS_S * 1000:
            windows[(device, start)].append(value["value"])
    assert max_ms is not None
    return {
        (device, iso_utc(T0 + start)): {"n": len(values), "total": sum(values), "last": values[-1]}
        for (device, start), values in windows.items()
        if start + SIZE_S * 1000 <= max_ms - LATENESS_S * 1000
    }




def values(bootstrap: str, topic: str) -> list[bytes]:
    return [message.value() for message in peek(bootstrap, topic)]


def test_window_state_survives_a_stop_and_a_sigkill(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": "restart",
        "kafka": {"bootstrap": fresh_broker, "config": FAST_GROUPS},
        "topics": [{"name": "events", "partitions": 1, "external": True},
                   {"name": "windows", "partitions": 1}, {"name": "restart.late", "partitions": 1}],
        "processors": [{
            "name": "agg", "input": "events", "output": "windows",
            "batch": {"max_records": 50, "max_wait_ms": 10},
            "window": {"kind": "tumbling", "size_s": SIZE_S, "time_field": "ts", "key": ["device"],
                       "allowed_lateness_s": LATENESS_S,
                       "aggregates": {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "value"},
                                      "last": {"fn": "last", "field": "value"}}},
            # run 2 (offsets 300-649) snapshots once, between 500 and 549
            "checkpoint": {"every_records": 200, "every_seconds": 60},
        }],
        "metrics": {"port": 0},
    }))
    config = load_pipeline(path)
    admin = create_transport("confluent", fresh_broker).admin()
    admin.create_topics([TopicSpec(t.name, t.partitions, config=t.config) for t in config.topic_specs()])

    # 1. Part one, then a graceful stop: the drain snapshots everything.
    produce(fresh_broker, "events", events(0, 300))
    assert PipelineRunner(config, until_idle_s=0.5, metrics_port=0).run().exit_code == 0
    assert json.loads(zlib.decompress(values(fresh_broker, "restart.agg.changelog")[-1]))[
        "next_offset"] == 300

    # A crash between writing a snapshot and committing leaves the commit behind the snapshot:
    # the restart must skip the records the snapshot already holds.
    rewind = Consumer({"bootstrap.servers": fresh_broker, "group.id": "restart.agg"})
    rewind.commit(offsets=[TopicPartition("events", 0, 200)], asynchronous=False)
    rewind.close()

    # 2. Part two, killed once its last windows are out but before a snapshot covers them.
    produce(fresh_broker, "events", events(300, 650))
    last_window = {"device": "d2", "window_start": at(55)}  # closed by the event at 62.0 s
    killed = subprocess.Popen(
        [sys.executable, "-m", "streamflow", "run", str(path), "--metrics-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        {k: v for k, v in json.loads(value).items() if k in last_window} == last_window
        for value in values(fresh_broker, "windows")
    ):
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    snapshot = json.loads(zlib.decompress(values(fresh_broker, "restart.agg.changelog")[-1]))
    assert 300 < snapshot["next_offset"] < 620, "the kill did not leave records to replay"

    # 3. Part three; the restart replays what the kill lost and skips what the snapshot holds.
    produce(fresh_broker, "events", events(650, 800))
    assert PipelineRunner(config, until_idle_s=0.5, metrics_port=0).run().exit_code == 0

    emitted: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for value in values(fresh_broker, "windows"):
        record = json.loads(value)
        emitted[(record.pop("device"), record.pop("window_start"))].append(record)
    replayed = [versions for versions in emitted.values() if len(versions) > 1]
    assert replayed, "the kill left nothing to replay"
    assert all(versions.count(versions[0]) == len(versions) for versions in replayed)
    assert {key: {k: v for k, v in versions[0].items() if k != "window_end"}
            for key, versions in emitted.items()} == expected_windows(events(0, 800))
    late = {json.loads(value)["value"] for value in values(fresh_broker, "restart.late")}
    assert sorted(late) == [i for i in range(800) if i % 37 == 36]  # replays may repeat some


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_window_state_moves_with_its_partition_in_a_rebalance(fresh_broker: str, client: str) -> None:
    config = (
        # kafka-python heartbeats from a Python thread: keep its default session under load.
        Pipeline("moving", bootstrap=fresh_broker, client=client,
                 config=FAST_GROUPS if client == "confluent" else {})
        .topic("events", partitions=2)
        .topic("windows", partitions=1)
        .processor("agg", input="events", output="windows", steps=[],
                   batch={"max_records": 20, "max_wait_ms": 10},
                   window=window("tumbling", size_s=SIZE_S, key=["device"], time_field="ts",
                                 allowed_lateness_s=LATENESS_S,
                                 aggregates={"n": "count", "total": "sum:value", "last": "last:value"}))
        .configure("metrics", port=0)
        .build()
    )
    admin = create_transport("confluent", fresh_broker).admin()
    admin.create_topics([TopicSpec(t.name, t.partitions, config=t.config) for t in config.topic_specs()])
    members: list[tuple[PipelineRunner, threading.Thread]] = []

    def join() -> PipelineRunner:
        runner = PipelineRunner(config, metrics_port=0)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        members.append((runner, thread))
        return runner

    def settled(runner: PipelineRunner) -> bool:
        if not runner.stages:
            return False
        stage = runner.stages[0]
        return time.monotonic() - stage.idle_since >= 1.0 and stage.is_idle(stage.idle_since)

    def wait_until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)

    produce(fresh_broker, "events", events(0, 400))
    first = join()
    wait_until(lambda: settled(first))
    second = join()  # the first member hands one partition over, with its snapshot
    wait_until(lambda: settled(second) and settled(first)
               and all(len(r.stages[0].states) == 1 for r in (first, second)))
    produce(fresh_broker, "events", events(400, 800))

    def consumed() -> float:
        return sum(runner.metrics.registry.get_sample_value(
            "streamflow_records_in_total", {"pipeline": "moving", "stage": "agg"}) or 0
            for runner in (first, second))

    wait_until(lambda: consumed() >= 800 and settled(first) and settled(second))
    for runner, thread in members:
        runner.stop()
        thread.join(30)

    by_partition: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for message in peek(fresh_broker, "events"):
        value = json.loads(message.value())
        by_partition[message.partition()].append((value["device"], value))
    expected = {}
    for partition_events in by_partition.values():
        expected |= expected_windows(partition_events)
    emitted = defaultdict(list)
    for value in values(fresh_broker, "windows"):
        record = json.loads(value)
        emitted[(record.pop("device"), record.pop("window_start"))].append(record)
    # A new owner that got the partition before the old one's revoke commit landed replays
    # from the committed offset (at-least-once output): any repeat must be identical.
    assert all(versions.count(versions[0]) == len(versions) for versions in emitted.values())
    assert {key: {k: v for k, v in versions[0].items() if k != "window_end"}
            for key, versions in emitted.items()} == expected
