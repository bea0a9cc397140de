"""The transport's group-less reader (``Transport.reader``, ``read_until``), on the real broker
with each client, and on the in-memory transport: ranges, transaction markers and aborted
records, empty partitions."""

from __future__ import annotations

import time

import pytest

from streamflow.transport import OutgoingBatch, Transport, create_transport, read_until
from tests.integration.test_transport_contract import CONTRACT_CLIENTS, topic, unique

pytestmark = pytest.mark.parametrize("client", CONTRACT_CLIENTS)


def values(transport: Transport, start: dict, end: dict | None = None) -> list[tuple[int, bytes]]:
    return [(partition, value) for batch in read_until(transport, start, end, timeout_s=30)
            for partition, value in zip(batch.partitions, batch.values, strict=True)]


def test_a_range_is_read_exactly(address: str, client: str) -> None:
    transport = create_transport(client, address)
    name = topic(transport)
    producer = transport.producer()
    producer.produce([OutgoingBatch(name, [str(n).encode() for n in range(10)])])
    producer.close()
    assert values(transport, {(name, 0): 3}, {(name, 0): 7}) == [(0, b"3"), (0, b"4"), (0, b"5"),
                                                                (0, b"6")]


def test_every_partition_is_read_to_its_end(address: str, client: str) -> None:
    transport = create_transport(client, address)
    name = topic(transport, partitions=3)
    producer = transport.producer()
    produced = [str(n).encode() for n in range(30)]
    producer.produce([OutgoingBatch(name, produced, keys=produced)])
    producer.close()
    got = values(transport, {(name, p): None for p in range(3)})
    assert sorted(value for _partition, value in got) == sorted(produced)
    assert len({partition for partition, _value in got}) > 1


def test_reading_to_the_end_skips_aborted_records_and_markers(
    address: str, client: str, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "tansu":
        request.applymarker(pytest.mark.xfail(
            reason="Tansu 0.6.0 hands aborted records to read_committed consumers", strict=True))
    transport = create_transport(client, address)
    name = topic(transport)
    producer = transport.producer(transactional_id=unique("tx"))
    for value, commit in ((b"one", True), (b"aborted", False), (b"two", True)):
        producer.begin_transaction()
        producer.produce([OutgoingBatch(name, [value])])
        if commit:
            producer.commit_transaction()
        else:
            producer.abort_transaction()
    producer.close()
    started = time.monotonic()
    # The log ends with a commit marker: the read must end there, not wait for a record after it.
    assert values(transport, {(name, 0): None}) == [(0, b"one"), (0, b"two")]
    assert time.monotonic() - started < 15
    # Up to an offset that is a marker's: the records before it, and the read ends.
    ends = transport.reader({(name, 0): None}).end_offsets()
    assert values(transport, {(name, 0): 0}, ends) == [(0, b"one"), (0, b"two")]


def test_an_empty_partition_or_range_reads_nothing_at_once(address: str, client: str) -> None:
    transport = create_transport(client, address)
    name = topic(transport)
    started = time.monotonic()
    assert values(transport, {(name, 0): None}) == []
    assert values(transport, {(name, 0): 5}, {(name, 0): 5}) == []
    assert time.monotonic() - started < 15


def test_offsets_for_times_finds_the_first_record_at_or_after_a_time(address: str,
                                                                       client: str) -> None:
    transport = create_transport(client, address)
    name = topic(transport)
    producer = transport.producer()
    base = 1_780_000_000_000
    producer.produce([OutgoingBatch(name, [str(n).encode() for n in range(5)],
                                    timestamps_ms=[base + 1000 * n for n in range(5)])])
    producer.close()
    reader = transport.reader({(name, 0): None})
    try:
        assert reader.offsets_for_times(base + 1500) == {(name, 0): 2}
        assert reader.offsets_for_times(base) == {(name, 0): 0}
        assert reader.offsets_for_times(base + 60_000) == {(name, 0): 5}  # none that late: the end
    finally:
        reader.close()
