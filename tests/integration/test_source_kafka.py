"""The kafka source: copies a topic of another cluster (a second embedded broker), resumes exactly
after SIGKILL, and names an unreachable cluster."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from connectors.sources.kafka import KafkaSource, KafkaSourceConfig
from streamflow.plugins import ComponentContext, TransientError
from streamflow.transport import OutgoingBatch, TopicSpec, create_transport
from streamflow.transport.broker import free_port
from tests.helpers import read_topic, recent_timestamp_ms
from tests.source_runs import TopicWatcher, kill_and_restart, running, source_pipeline, unique

# The copies keep these timestamps: ones of 2023 had Kafka delete them before a read-back.
STAMP_MS = recent_timestamp_ms()


def external_topic(bootstrap: str, partitions: int) -> str:
    name = unique("upstream")
    admin = create_transport("confluent", bootstrap).admin()
    admin.create_topics([TopicSpec(name, partitions)])
    return name


def produce(bootstrap: str, topic: str, first: int, count: int) -> None:
    producer = create_transport("confluent", bootstrap).producer()
    try:
        producer.produce([OutgoingBatch(
            topic, [f"value-{n}".encode() for n in range(first, first + count)],
            [f"key-{n % 7}".encode() for n in range(first, first + count)],
            timestamps_ms=[STAMP_MS + n for n in range(first, first + count)],
        )])
    finally:
        producer.close()


def test_copies_keys_values_and_timestamps(bootstrap: str, fresh_broker: str) -> None:
    upstream, topic = external_topic(fresh_broker, 3), unique("copy")
    produce(fresh_broker, upstream, 0, 40)
    with running(_pipeline(bootstrap, fresh_broker, upstream, topic)):
        watcher = TopicWatcher(bootstrap, topic)
        watcher.wait_for(40)
        produce(fresh_broker, upstream, 40, 10)
        watcher.wait_for(50)
        watcher.close()
    copied = read_topic(bootstrap, topic)
    assert sorted(zip(copied.values, copied.keys, copied.timestamps_ms, strict=True)) == sorted(
        (f"value-{n}".encode(), f"key-{n % 7}".encode(), STAMP_MS + n) for n in range(50)
    )


def test_copies_stamped_with_the_time_of_copying(bootstrap: str, fresh_broker: str) -> None:
    upstream, topic = external_topic(fresh_broker, 2), unique("copy")
    produce(fresh_broker, upstream, 0, 20)
    started_ms = int(time.time() * 1000)
    with running(_pipeline(bootstrap, fresh_broker, upstream, topic, timestamps="copying")):
        watcher = TopicWatcher(bootstrap, topic)
        watcher.wait_for(20)
        watcher.close()
    finished_ms = int(time.time() * 1000)
    copied = read_topic(bootstrap, topic)
    assert sorted(zip(copied.values, copied.keys, strict=True)) == sorted(
        (f"value-{n}".encode(), f"key-{n % 7}".encode()) for n in range(20))
    assert all(started_ms <= stamp <= finished_ms for stamp in copied.timestamps_ms), (
        started_ms, copied.timestamps_ms, finished_ms)


def _pipeline(bootstrap: str, external: str, upstream: str, topic: str,
              **settings: object) -> dict[str, object]:
    pipeline = source_pipeline(bootstrap, "kafka", topic, topics=[upstream], **settings)
    pipeline["sources"][0]["bootstrap"] = external  # type: ignore[index]
    return pipeline


def test_sigkill_mid_copy_then_restart_copies_every_record_once(
    tmp_path: Path, bootstrap: str, fresh_broker: str
) -> None:
    upstream, topic = external_topic(fresh_broker, 2), unique("copy")
    stop, produced = threading.Event(), [0]

    def writer() -> None:
        while not stop.is_set() and produced[0] < 4000:
            produce(fresh_broker, upstream, produced[0], 50)
            produced[0] += 50
            time.sleep(0.02)

    pipeline = _pipeline(bootstrap, fresh_broker, upstream, topic)
    pipeline["runtime"] = {"batch": {"max_records": 40}}
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()

    def stop_writing() -> None:
        stop.set()
        thread.join(10)

    watcher = TopicWatcher(bootstrap, topic)
    try:
        kill_and_restart(pipeline, tmp_path, before_kill=lambda: watcher.wait_for(500, timeout_s=40),
                         while_down=stop_writing,
                         after_restart=lambda: watcher.wait_for(produced[0], timeout_s=40))
    finally:
        watcher.close()
    values = read_topic(bootstrap, topic).values
    assert len(values) == produced[0] == len(set(values)), "a record was lost or copied twice"


def test_an_unreachable_cluster_is_named() -> None:
    address = f"127.0.0.1:{free_port()}"
    source = KafkaSource(KafkaSourceConfig(bootstrap=address, topics=["t"]), ComponentContext("p", "k"))
    with pytest.raises(TransientError, match=f"external Kafka cluster at {address} is unreachable"):
        source.open(None)
