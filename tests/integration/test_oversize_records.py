"""Records too large for Kafka: dead-lettered (whole, or else truncated) instead of stopping a source
or a stage; the rest goes on, and positions advance once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from streamflow.config import parse_pipeline
from streamflow.runtime.dead_letters import TRUNCATED_BYTES
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import (
    CLIENTS,
    OutgoingBatch,
    RecordTooLargeError,
    TopicSpec,
    create_transport,
)
from tests.helpers import read_topic
from tests.source_runs import unique

BIG = 5_000_000  # over every client's default limit (librdkafka 1,000,000; kafka-python 1 MiB)


def run(pipeline: dict[str, Any]) -> PipelineRunner:
    runner = PipelineRunner(parse_pipeline(pipeline), until_idle_s=1, metrics_port=0)
    result = runner.run()
    assert result.exit_code == 0, result.errors
    return runner


def latest_dead_letters(runner: PipelineRunner) -> list[dict[str, Any]]:
    """The dead letters the dashboard lists for ``runner``, newest first."""
    return list(runner.metrics.latest_dead_letters.document()["letters"])


def headers(record_headers: list[tuple[str, bytes]] | None) -> dict[str, bytes]:
    return dict(record_headers or [])


@pytest.mark.parametrize("client", CLIENTS)
def test_a_record_the_client_refuses_raises_after_the_rest_is_acknowledged(
    bootstrap: str, client: str
) -> None:
    transport = create_transport(client, bootstrap)
    topic = unique("oversize")
    admin = transport.admin()
    admin.create_topics([TopicSpec(topic)])
    admin.close()
    producer = transport.producer()
    with pytest.raises(RecordTooLargeError) as raised:
        producer.produce([OutgoingBatch(topic, [b"a", b"x" * BIG, b"b"]),
                          OutgoingBatch(topic, [b"y" * BIG, b"c"])])
    producer.close()
    assert raised.value.rejected == [(0, 1), (1, 0)]
    assert not raised.value.by_broker
    assert read_topic(bootstrap, topic).values == [b"a", b"b", b"c"]


def small_topic(client: str, bootstrap: str) -> str:
    """A new topic that takes records of up to 100,000 bytes."""
    topic = unique("small")
    admin = create_transport(client, bootstrap).admin()
    admin.create_topics([TopicSpec(topic, config={"max.message.bytes": "100000"})])
    admin.close()
    return topic


@pytest.mark.parametrize("client", CLIENTS)
def test_a_record_the_broker_refuses_is_named_and_the_rest_is_acknowledged(
    bootstrap: str, broker_kind: str, client: str
) -> None:
    if broker_kind != "kafka":
        pytest.skip("Tansu has no message size limit")
    topic = small_topic(client, bootstrap)
    big = b"x" * 200_000  # under both clients' own limits, over the topic's
    producer = create_transport(client, bootstrap).producer()
    with pytest.raises(RecordTooLargeError) as raised:
        producer.produce([OutgoingBatch(topic, [b"a", big, b"b"]),
                          OutgoingBatch(topic, [b"c"] * 500)])
    producer.close()
    assert raised.value.by_broker
    assert raised.value.rejected == [(0, 1)]
    assert read_topic(bootstrap, topic).values == [b"a", b"b"] + [b"c"] * 500


@pytest.mark.parametrize("client", CLIENTS)
def test_records_sent_without_waiting_are_refused_at_the_flush_numbered_across_sends(
    bootstrap: str, broker_kind: str, client: str
) -> None:
    if broker_kind != "kafka":
        pytest.skip("Tansu has no message size limit")
    topic = small_topic(client, bootstrap)
    producer = create_transport(client, bootstrap).producer()
    producer.send([OutgoingBatch(topic, [b"a", b"x" * BIG])])  # refused by the client
    producer.send([OutgoingBatch(topic, [b"b"]), OutgoingBatch(topic, [b"y" * 200_000, b"c"])])
    with pytest.raises(RecordTooLargeError) as raised:
        producer.flush()
    assert raised.value.by_broker
    assert raised.value.rejected == [(0, 1), (2, 0)]
    producer.send([OutgoingBatch(topic, [b"d"])])
    producer.flush()  # a flush answers for what was sent since the previous one only
    producer.close()
    assert sorted(read_topic(bootstrap, topic).values) == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_record_the_broker_refuses_in_a_transaction_is_named_and_the_rest_can_go_again(
    bootstrap: str, broker_kind: str, client: str
) -> None:
    if broker_kind != "kafka":
        pytest.skip("Tansu has no message size limit")
    transport = create_transport(client, bootstrap)
    topic = small_topic(client, bootstrap)
    big = b"x" * 200_000  # under both clients' own limits, over the topic's
    batches = [OutgoingBatch(topic, [b"a", big, b"b"]), OutgoingBatch(topic, [b"c"] * 500)]
    transactional_id = unique("tx")
    producer = transport.producer(transactional_id=transactional_id)
    producer.begin_transaction()
    with pytest.raises(RecordTooLargeError) as raised:
        producer.produce(batches)
    producer.close()
    assert raised.value.by_broker
    assert (0, 1) in raised.value.rejected
    # the records queued behind the refused one were never sent: they are not called too large
    assert all(len(batches[number].values[index]) > 1 for number, index in raised.value.rejected)

    producer = transport.producer(transactional_id=transactional_id)  # aborts the first transaction
    producer.begin_transaction()
    producer.produce([OutgoingBatch(topic, [b"a", b"b"]), batches[1]])
    producer.commit_transaction()
    producer.close()
    assert read_topic(bootstrap, topic).values == [b"a", b"b"] + [b"c"] * 500


@pytest.mark.parametrize("client", CLIENTS)
def test_a_record_the_broker_refuses_alone_in_a_transaction_is_named_and_the_rest_can_go_again(
    bootstrap: str, broker_kind: str, client: str
) -> None:
    """In message sets smaller than the refused record it goes alone: librdkafka then purges
    the records queued behind it and holds those in flight until the transaction is aborted."""
    if broker_kind != "kafka":
        pytest.skip("Tansu has no message size limit")
    transport = create_transport(client, bootstrap, {"batch.size": "50000"})
    topic = small_topic(client, bootstrap)
    small = [b"%04d" % n + b"s" * 996 for n in range(300)]
    transactional_id = unique("tx")
    producer = transport.producer(transactional_id=transactional_id)
    producer.begin_transaction()
    started = time.monotonic()
    with pytest.raises(RecordTooLargeError) as raised:
        producer.produce([OutgoingBatch(topic, [*small[:150], b"x" * 200_000, *small[150:]])])
    producer.abort_transaction()
    producer.close()
    assert time.monotonic() - started < 10  # no wait for records that will never be acknowledged
    assert raised.value.by_broker
    assert raised.value.rejected == [(0, 150)]

    producer = transport.producer(transactional_id=transactional_id)
    producer.begin_transaction()
    producer.produce([OutgoingBatch(topic, small)])
    producer.commit_transaction()
    producer.close()
    assert read_topic(bootstrap, topic).values == small


@pytest.mark.parametrize("client", CLIENTS)
def test_file_source_dead_letters_a_huge_line_truncated_and_goes_on(
    bootstrap: str, tmp_path: Path, client: str
) -> None:
    big_line = json.dumps({"n": 1, "blob": "x" * BIG})
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join([json.dumps({"n": 0}), big_line, json.dumps({"n": 2})]) + "\n")
    topic, name = unique("lines"), unique("p")
    pipeline = {
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap, "client": client},
        "topics": [{"name": topic, "partitions": 1}],
        "sources": [{"name": "src", "type": "file", "topic": topic, "path": str(path)}],
        "metrics": {"port": 0},
    }
    first = run(pipeline)
    run(pipeline)  # a restart resumes after the position: nothing is published again

    assert [json.loads(value)["n"] for value in read_topic(bootstrap, topic).values] == [0, 2]
    dead = read_topic(bootstrap, f"{name}.dlq")
    assert len(dead) == 1
    assert dead.values[0] == big_line.encode()[:TRUNCATED_BYTES]
    found = headers(dead.headers[0])
    assert found["streamflow.original.size"] == str(len(big_line)).encode()
    assert found["streamflow.truncated"] == b"true"
    assert found["streamflow.stage"] == b"src"
    assert found["streamflow.step"] == b"produce"
    assert found["streamflow.original.topic"] == topic.encode()
    assert json.loads(found["streamflow.source.position"]) is None  # the first batch of the file
    assert found["streamflow.source.index"] == b"1"
    [listed] = latest_dead_letters(first)
    assert big_line.startswith(listed["value"]) and listed["size"] == len(big_line)
    assert dict(listed["headers"])["streamflow.stage"] == "src"


@pytest.mark.parametrize("client", CLIENTS)
def test_a_record_the_broker_refuses_is_dead_lettered_whole(
    bootstrap: str, broker_kind: str, tmp_path: Path, client: str
) -> None:
    if broker_kind != "kafka":
        pytest.skip("Tansu has no message size limit")
    line = json.dumps({"n": 1, "blob": "x" * 200_000})
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join([json.dumps({"n": 0}), line]) + "\n")
    topic, name = unique("small"), unique("p")
    run({
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap, "client": client},
        "topics": [{"name": topic, "partitions": 1, "config": {"max.message.bytes": "100000"}}],
        "sources": [{"name": "src", "type": "file", "topic": topic, "path": str(path)}],
        "metrics": {"port": 0},
    })

    dead = read_topic(bootstrap, f"{name}.dlq")
    assert line.encode() in dead.values
    letter = headers(dead.headers[dead.values.index(line.encode())])
    assert "streamflow.truncated" not in letter
    assert letter["streamflow.source.index"] == b"1"
    published = [json.loads(value)["n"] for value in read_topic(bootstrap, topic).values]
    dead_numbers = [json.loads(value)["n"] for value in dead.values]
    assert sorted(published + dead_numbers) == [0, 1]  # each record once, in one place


@pytest.mark.parametrize("client", CLIENTS)
def test_processor_output_too_large_dead_letters_its_input(bootstrap: str, client: str) -> None:
    source, output, name = unique("in"), unique("out"), unique("p")
    transport = create_transport(client, bootstrap)
    admin = transport.admin()
    admin.create_topics([TopicSpec(source)])
    admin.close()
    records = [json.dumps({"n": n, "grow": n == 1}).encode() for n in range(3)]
    producer = transport.producer()
    producer.produce([OutgoingBatch(source, records)])
    producer.close()
    runner = run({
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap, "client": client},
        "processors": [{"name": "grow", "input": source, "output": output, "steps": [
            {"sql": f"SELECT *, CASE WHEN grow THEN repeat('x', {BIG}) END AS blob FROM batch"},
        ]}],
        "metrics": {"port": 0},
    })

    assert sorted(json.loads(value)["n"] for value in read_topic(bootstrap, output).values) == [0, 2]
    dead = read_topic(bootstrap, f"{name}.dlq")
    assert dead.values == [records[1]]
    letter = headers(dead.headers[0])
    assert letter["streamflow.step"] == b"produce"
    assert letter["streamflow.error.class"] == b"OversizeRecordError"
    assert letter["streamflow.original.offset"] == b"1"
    [listed] = latest_dead_letters(runner)
    assert listed["value"] == records[1].decode()
    assert dict(listed["headers"])["streamflow.error.class"] == "OversizeRecordError"


@pytest.mark.parametrize("client", CLIENTS)
def test_processor_output_the_broker_refuses_alone_in_a_transaction_dead_letters_its_input(
    bootstrap: str, broker_kind: str, client: str
) -> None:
    if broker_kind != "kafka":
        pytest.skip("Tansu has no message size limit")
    source, output, name = unique("in"), unique("out"), unique("p")
    transport = create_transport(client, bootstrap)
    admin = transport.admin()
    admin.create_topics([TopicSpec(source)])
    admin.close()
    records = [json.dumps({"n": n, "grow": n == 150, "pad": "s" * 1000}).encode() for n in range(301)]
    producer = transport.producer()
    producer.produce([OutgoingBatch(source, records)])
    producer.close()
    run({
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap, "client": client, "config": {"batch.size": 50000}},
        "topics": [{"name": output, "partitions": 1, "config": {"max.message.bytes": "100000"}}],
        "processors": [{"name": "grow", "input": source, "output": output, "steps": [
            {"sql": "SELECT *, CASE WHEN grow THEN repeat('x', 200000) END AS blob FROM batch"},
        ]}],
        "runtime": {"guarantee": "exactly_once", "batch": {"max_records": 1000}},
        "metrics": {"port": 0},
    })

    numbers = [json.loads(value)["n"] for value in read_topic(bootstrap, output).values]
    assert numbers == [n for n in range(301) if n != 150]  # each once
    dead = read_topic(bootstrap, f"{name}.dlq")
    assert dead.values == [records[150]]
    assert headers(dead.headers[0])["streamflow.error.class"] == b"OversizeRecordError"
