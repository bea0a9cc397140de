"""A producer's send and flush, as every transport has them by default (the in-memory one here;
the Kafka clients' in tests/integration/test_oversize_records.py): records refused for their
size are raised at the next flush, numbered across the sends since the previous one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from streamflow.transport import OutgoingBatch, RecordTooLargeError, TopicSpec, create_transport
from streamflow.transport.memory import MemoryTransport, drop_cluster


@pytest.fixture
def transport() -> Iterator[MemoryTransport]:
    bootstrap = f"memory://send-{uuid.uuid4().hex[:8]}"
    made = create_transport("memory", bootstrap, {"message.max.bytes": "1000"})
    assert isinstance(made, MemoryTransport)
    made.admin().create_topics([TopicSpec("small", config={"max.message.bytes": "100"})])
    yield made
    drop_cluster(bootstrap)


def test_refusals_wait_for_the_flush_numbered_across_sends(transport: MemoryTransport) -> None:
    producer = transport.producer()
    producer.send([OutgoingBatch("small", [b"a", b"x" * 2000])])  # over the client's limit
    producer.send([OutgoingBatch("small", [b"b"]), OutgoingBatch("small", [b"y" * 500, b"c"])])
    with pytest.raises(RecordTooLargeError) as raised:
        producer.flush()
    assert raised.value.rejected == [(0, 1), (2, 0)]
    assert raised.value.by_broker  # the topic's limit refused one
    producer.send([OutgoingBatch("small", [b"d"])])
    producer.flush()  # answers for what was sent since the previous flush only
    values = [record.value for log in transport.cluster.topics["small"].logs for record in log]
    assert sorted(values) == [b"a", b"b", b"c", b"d"]

