"""The transport contract: what streamflow needs from a Kafka client, and nothing more.

Two implementations exist (``confluent`` and ``kafka-python``); both pass the same contract
test suite against a real broker. Records cross this boundary column-wise (:class:`ConsumedBatch`)
so that the runtime can hand them to Arrow without building one object per record.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

Headers = list[tuple[str, bytes]]
Record = tuple[bytes, bytes | None, Headers | None, int | None]  # value, key, headers, timestamp
TopicPartition = tuple[str, int]


class TransportError(Exception):
    """A broker-side failure: delivery, commit, admin or connectivity."""


class AuthenticationError(TransportError):
    """The broker rejected the client's credentials or authorization: not worth retrying."""


class RecordTooLargeError(TransportError):
    """Kafka refused records for their size, and only for that: every other record of the
    :meth:`Producer.produce` call was acknowledged.

    ``rejected`` holds (batch, record) indices into the batches given to that call. ``by_broker``
    is False when the client refused them all before sending (the producer and its open
    transaction are intact); when True the broker refused some, together with whatever was in
    the same request: a transaction can then only be aborted, and the client is best replaced.
    """

    def __init__(self, rejected: list[tuple[int, int]], by_broker: bool, detail: str) -> None:
        self.rejected = rejected
        self.by_broker = by_broker
        self.detail = detail
        super().__init__(f"{len(rejected)} records too large for Kafka: {detail}")

    @classmethod
    def joined(cls, earlier: RecordTooLargeError | None, later: RecordTooLargeError,
               batches_before: int) -> RecordTooLargeError:
        """``earlier`` and ``later`` as one refusal, ``later``'s batches numbered after
        ``batches_before`` of theirs."""
        shifted = [(number + batches_before, index) for number, index in later.rejected]
        if earlier is None:
            return cls(shifted, later.by_broker, later.detail)
        return cls(earlier.rejected + shifted, earlier.by_broker or later.by_broker,
                   earlier.detail)


class RebalanceInProgressError(TransportError):
    """A commit was refused because the group is rebalancing; the records will be redelivered."""


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partition count and topic-level configs (e.g. cleanup.policy)."""

    name: str
    partitions: int = 1
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ConsumedBatch:
    """Records from one ``consume_batch`` call, column-wise; index ``i`` is one record."""

    topics: list[str] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)
    headers: list[Headers | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)

    def select(self, rows: Sequence[int]) -> ConsumedBatch:
        """The records at ``rows``, in that order."""
        return ConsumedBatch(**{name: [column[row] for row in rows] if column else []
                                for name, column in vars(self).items()})

    def next_offsets(self) -> dict[TopicPartition, int]:
        """The offsets to commit once every record of this batch is durable downstream."""
        # Offsets grow within a partition: the last one of each partition wins.
        last = dict(zip(zip(self.topics, self.partitions, strict=True), self.offsets, strict=True))
        return {partition: offset + 1 for partition, offset in last.items()}


@dataclass
class OutgoingBatch:
    """Records to produce to one topic; ``keys`` and ``headers`` may be empty (meaning none)."""

    topic: str
    values: Sequence[bytes]
    keys: Sequence[bytes | None] = ()
    headers: Sequence[Headers | None] = ()
    timestamps_ms: Sequence[int | None] = ()

    def records(self) -> Iterator[Record]:
        """(value, key, headers, timestamp) per record, None where a column was left empty."""
        count = len(self.values)
        return zip(self.values, self.keys or [None] * count, self.headers or [None] * count,
                   self.timestamps_ms or [None] * count, strict=True)

    def record(self, index: int) -> Record:
        """The ``index``-th record, as :meth:`records` gives it."""
        return (self.values[index], self.keys[index] if self.keys else None,
                self.headers[index] if self.headers else None,
                self.timestamps_ms[index] if self.timestamps_ms else None)


class Producer(ABC):
    """Produces batches: :meth:`produce` returns only once the broker has acknowledged every
    record; :meth:`send` queues records without waiting, and :meth:`flush` waits for them."""

    _unflushed = 0  # batches sent since the last flush (the default send and flush)
    _refused: RecordTooLargeError | None = None  # what they raised, kept for flush

    @abstractmethod
    def produce(self, batches: Sequence[OutgoingBatch]) -> None:
        """Send every record and block until all are acknowledged; raise RecordTooLargeError
        when Kafka refused records for their size only, TransportError on any other failure."""

    def send(self, batches: Sequence[OutgoingBatch]) -> None:
        """Queue every record of ``batches`` without waiting for the broker; the next
        :meth:`flush` waits for them (flush before :meth:`produce`, whose refusals then name its
        own batches only). By default they are produced here and now, and a refusal for size is
        kept for that flush (other failures raise here)."""
        try:
            self.produce(batches)
        except RecordTooLargeError as exc:
            self._refused = RecordTooLargeError.joined(self._refused, exc, self._unflushed)
        self._unflushed += len(batches)

    def acknowledged(self) -> bool:
        """Whether :meth:`flush` would return without waiting: every record sent since the last
        flush is acknowledged (or failed). By default :meth:`send` produces at once: always."""
        return True

    def flush(self) -> None:
        """Block until every record sent since the last flush is acknowledged, raising what
        :meth:`produce` would have for them all: a RecordTooLargeError's ``rejected`` numbers
        those batches in the order they were sent."""
        refused, self._refused, self._unflushed = self._refused, None, 0
        if refused is not None:
            raise refused

    @abstractmethod
    def begin_transaction(self) -> None:
        """Start a transaction (only on a producer created with a transactional id)."""

    @abstractmethod
    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], consumer: Consumer
    ) -> None:
        """Commit ``offsets`` for ``consumer``'s group as part of the open transaction."""

    @abstractmethod
    def commit_transaction(self) -> None:
        """Commit the open transaction: its records become visible to read_committed consumers."""

    @abstractmethod
    def abort_transaction(self) -> None:
        """Abort the open transaction: its records are never visible to read_committed consumers."""

    @abstractmethod
    def close(self) -> None:
        """Flush what is queued and release the client."""


class RebalanceListener(ABC):
    """Told when the group coordinator assigns or takes away partitions."""

    @abstractmethod
    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Partitions were assigned; consumption resumes from their committed offsets."""

    @abstractmethod
    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions are being taken away: flush and commit their work now."""

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions were taken away without a chance to commit: this member was evicted from
        the group (e.g. it did not poll within the session timeout) and they may have a new
        owner already. Their work must not be made durable (no commit, no state checkpoint):
        it is replayed by their new owner. By default, :meth:`on_revoke` is called."""
        self.on_revoke(partitions)


class Consumer(ABC):
    """A member of a consumer group; offsets are committed only explicitly (no auto-commit)."""

    @abstractmethod
    def consume_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        """Return up to ``max_records`` records, waiting at most ``timeout_s`` for the first."""

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int], asynchronous: bool = False) -> None:
        """Commit next-offsets to read; synchronous commits raise TransportError on failure."""

    @abstractmethod
    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed next-offset for each partition (None if nothing committed)."""

    @abstractmethod
    def assignment(self) -> list[TopicPartition]:
        """The partitions currently assigned to this member."""

    @abstractmethod
    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset after the last record of each partition (its high watermark)."""

    @abstractmethod
    def lag(self) -> dict[TopicPartition, int]:
        """Records between this member's position and the high watermark, per assigned partition;
        TransportError when the brokers do not answer (the confluent transport also when a
        partition's leader is down or silent by librdkafka's statistics, and, with no partition
        assigned, asks for a topic's metadata to find out)."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group (without committing anything further)."""


class Reader(ABC):
    """Reads chosen partitions from chosen offsets as a member of no group: nothing is committed
    and nobody else's assignment changes. For restoring state, not for processing."""

    @abstractmethod
    def read_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        """Return up to ``max_records`` records, waiting at most ``timeout_s`` for the first."""

    @abstractmethod
    def position(self) -> dict[TopicPartition, int]:
        """The next offset to read in each partition: past the records returned, and past
        transaction markers and aborted records once a read went beyond them."""

    @abstractmethod
    def end_offsets(self) -> dict[TopicPartition, int]:
        """Where each partition ends now for this reader: its last stable offset when it reads
        committed records only, else its high watermark."""

    @abstractmethod
    def offsets_for_times(self, timestamp_ms: int) -> dict[TopicPartition, int]:
        """For each partition of this reader, the offset of its first record whose timestamp is
        at or after ``timestamp_ms``; where there is none, its end (:meth:`end_offsets`)."""

    @abstractmethod
    def close(self) -> None:
        """Release the client."""


class Admin(ABC):
    """Topic administration."""

    @abstractmethod
    def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist yet; existing ones are left untouched. Returns
        once the broker answering metadata requests knows them (see :meth:`wait_for_topics`)."""

    def wait_for_topics(self, names: Sequence[str], timeout_s: float = 30.0) -> None:
        """Wait until every topic of ``names`` shows in metadata with its partitions: on Apache
        Kafka a created topic reaches the brokers' metadata a moment after the controller
        accepted it, and a consumer that subscribes before then gets no partition of it
        (kafka-python looks again only after ``metadata.max.age.ms``, 5 minutes)."""
        deadline = time.monotonic() + timeout_s
        while missing := sorted(set(names) - {name for name, partitions in
                                              self.describe_topics(names).items() if partitions}):
            if time.monotonic() > deadline:
                raise TransportError(f"topics {missing} not in the brokers' metadata after "
                                     f"{timeout_s:.0f} s")
            time.sleep(0.1)

    @abstractmethod
    def cluster_id(self) -> str:
        """The cluster's id: it changes when a cluster is replaced by a new one."""

    @abstractmethod
    def describe_topics(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Partition count of each named topic that exists (all topics when ``names`` is None)."""

    @abstractmethod
    def close(self) -> None:
        """Release the client."""


class Transport(ABC):
    """Factory for clients bound to one cluster and one set of client settings."""

    name: str

    def __init__(self, bootstrap: str, client_config: Mapping[str, str] | None = None) -> None:
        self.bootstrap = bootstrap
        self.client_config = dict(client_config or {})

    @abstractmethod
    def producer(self, transactional_id: str | None = None) -> Producer:
        """A producer; with ``transactional_id`` it is idempotent and transactional."""

    @abstractmethod
    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
        read_committed: bool = True,
    ) -> Consumer:
        """A group member subscribed to ``topics``, starting at the earliest offset when none is committed."""

    @abstractmethod
    def reader(self, start: Mapping[TopicPartition, int | None], read_committed: bool = True
               ) -> Reader:
        """A reader of the partitions of ``start``, each from its offset (None: the earliest)."""

    @abstractmethod
    def admin(self) -> Admin:
        """An admin client."""

    def cluster_id(self) -> str:
        """The id of the cluster this transport talks to."""
        admin = self.admin()
        try:
            return admin.cluster_id()
        finally:
            admin.close()


def read_until(transport: Transport, start: Mapping[TopicPartition, int | None],
               end: Mapping[TopicPartition, int] | None = None, timeout_s: float = 60.0,
               read_committed: bool = True) -> Iterator[ConsumedBatch]:
    """The records of each partition of ``start`` from its offset (None: the earliest) up to
    its offset in ``end``, exclusive, or else to its end now (:meth:`Reader.end_offsets`).

    Raises TransportError when the records cannot all be read within ``timeout_s``.
    """
    if end is not None and all(offset is not None and offset >= end[partition]
                               for partition, offset in start.items()):
        return
    reader = transport.reader(start, read_committed)
    try:
        ends = dict(end) if end is not None else reader.end_offsets()
        deadline = time.monotonic() + timeout_s
        while True:
            position = reader.position()
            if all(position[partition] >= offset for partition, offset in ends.items()):
                return
            if time.monotonic() > deadline:
                raise TransportError(f"could not read {sorted(ends)} up to {ends} in "
                                     f"{timeout_s:g} s (read up to {position})")
            batch = reader.read_batch(1000, 0.2)
            wanted = [row for row, (topic, partition, offset) in enumerate(
                zip(batch.topics, batch.partitions, batch.offsets, strict=True))
                if offset < ends.get((topic, partition), 0)]
            if len(wanted) < len(batch):
                batch = batch.select(wanted)
            if len(batch):
                yield batch
    finally:
        reader.close()


# Client calls a transport gave up on after they ignored their timeout, still blocked: each
# holds its client's native resources (threads, buffers) until it returns, if ever.
STILL_BLOCKED: set[threading.Thread] = set()


def calls_still_blocked() -> int:
    """How many client calls given up in this process are still blocked."""
    return len(STILL_BLOCKED)
