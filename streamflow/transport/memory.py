"""An in-memory transport: Kafka's semantics inside one process, for tests without a broker.

``create_transport("memory", "memory://NAME")`` gives clients of the in-process cluster named by
the bootstrap string; every transport with the same bootstrap shares it, from any thread (one
lock and one condition guard the whole cluster). What it models, as Apache Kafka does:

- topics of N partitions; records with offsets, keys, values, timestamps and headers; high
  watermarks; keyed records go to ``crc32(key) % partitions``, keyless ones round-robin;
  producing to an unknown topic creates it with one partition (``auto.create.topics.enable``);
- consumer groups with the eager protocol: a member joins when created, and a join, a leave
  (:meth:`Consumer.close`) or an eviction prepares a rebalance. Every member finds out at its
  next :meth:`MemoryConsumer.consume_batch`, which calls the listener's ``on_revoke`` on the
  calling thread, as librdkafka does; commits made there still count. Once every member has
  revoked, the new generation is assigned (``partition.assignment.strategy``: ``range``, the
  default, or ``roundrobin``) and each member's next poll calls ``on_assign``. Polling is the
  heartbeat: a member that does not poll for ``session.timeout.ms`` (6000) is evicted, and its
  next poll reports what it lost to ``on_lost`` (not ``on_revoke``: its commits would be
  refused) and joins again as a new member;
- a group-less :class:`MemoryReader` (``Transport.reader``) whose ``end_offsets`` are the last
  stable offsets for ``read_committed``, else the high watermarks;
- committed offsets per group; a commit from a member of an older generation, or from an
  evicted one, raises :class:`RebalanceInProgressError` (asynchronous commits fail silently);
- transactions: records of an open transaction stop ``read_committed`` consumers at the first
  of them (the last stable offset) until it ends; aborted records are skipped by them, and
  ``read_committed=False`` consumers see everything. Each commit or abort writes a control
  record to each partition it touched, so offsets have gaps, as on Kafka.
  :meth:`MemoryProducer.send_offsets_to_transaction` is fenced by the consumer's group
  generation (KIP-447): a member that was evicted, or whose generation is over, gets a
  :class:`TransportError` and the transaction can then only be aborted. Offsets sent are pending
  until the transaction ends: :meth:`MemoryConsumer.committed` waits for them (Kafka answers
  UNSTABLE_OFFSET_COMMIT) and a new owner of the partition starts fetching only then. A new
  producer with the same transactional id fences the older one and aborts its open
  transaction; a transaction open longer than ``transaction.timeout.ms`` (60000) is aborted and
  its producer fenced; closing a producer aborts its open transaction;
- sizes: a record (key, value and headers) over the client's ``message.max.bytes`` (1,000,000)
  is refused before sending (``RecordTooLargeError``, ``by_broker`` False); one over the topic's
  ``max.message.bytes`` (1,048,588) is refused by the "broker" (``by_broker`` True), which
  leaves an open transaction only abortable.

Not modelled: replication, broker failures, quotas, compaction and retention, cooperative
rebalancing, static membership. A closing consumer leaves its group without calling
``on_revoke`` (kafka-python does not call it either; the runtime drains before closing).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from streamflow.transport.base import (
    Admin,
    ConsumedBatch,
    Consumer,
    Headers,
    OutgoingBatch,
    Producer,
    Reader,
    RebalanceInProgressError,
    RebalanceListener,
    RecordTooLargeError,
    TopicPartition,
    TopicSpec,
    Transport,
    TransportError,
)

DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes
BROKER_MAX_MESSAGE_BYTES = 1_048_588  # Kafka's message.max.bytes, a topic's max.message.bytes
DEFAULT_SESSION_TIMEOUT_MS = 6000  # as the real transports configure their consumers
DEFAULT_TRANSACTION_TIMEOUT_MS = 60_000
COMMITTED_TIMEOUT_S = 10.0  # as the real transports wait for committed offsets
_WAIT_SLICE_S = 0.05  # waits wake this often to evict silent members and expire transactions
_STRATEGIES = ("range", "roundrobin")

_OPEN, _COMMITTED, _ABORTED = "open", "committed", "aborted"


@dataclass(slots=True)
class _Transaction:
    """One transaction of a transactional id: its partitions and the offsets sent with it."""

    transactional_id: str
    epoch: int
    deadline: float  # monotonic time after which the cluster aborts it
    state: str = _OPEN
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)  # its partitions
    offsets: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)  # by group
    abortable: str | None = None  # why it can only be aborted now


@dataclass(slots=True)
class _Record:
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: Headers | None
    transaction: _Transaction | None = None
    control: bool = False  # a transaction marker: takes an offset, never delivered


@dataclass
class _Topic:
    name: str
    logs: list[list[_Record]]
    max_message_bytes: int


@dataclass
class _Member:
    id: str
    topics: tuple[str, ...]
    strategies: tuple[str, ...]
    session_timeout_s: float
    last_seen: float
    generation: int = -1  # the generation whose assignment this member holds; -1: none yet
    assignment: list[TopicPartition] = field(default_factory=list)
    positions: dict[TopicPartition, int | None] = field(default_factory=dict)
    joined: bool = True  # waiting for the next generation (nothing left to revoke)


@dataclass
class _Group:
    id: str
    members: dict[str, _Member] = field(default_factory=dict)  # in join order
    generation: int = 0
    rebalancing: bool = False
    assignments: dict[str, list[TopicPartition]] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    pending: dict[TopicPartition, _Transaction] = field(default_factory=dict)

    def commit_error(self, member_id: str, generation: int) -> str | None:
        """Why the coordinator refuses a commit from this member and generation, or None."""
        if member_id not in self.members:
            return f"UNKNOWN_MEMBER_ID: {member_id} is no longer a member of group {self.id}"
        if generation != self.generation:
            return (f"ILLEGAL_GENERATION: generation {generation} of {member_id} is not the "
                    f"group {self.id}'s current {self.generation}")
        return None


class MemoryCluster:
    """The brokers of one bootstrap string: topics, groups and transactions behind one lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.id = f"memory-{uuid.uuid4().hex[:16]}"
        self.condition = threading.Condition(threading.Lock())
        self.topics: dict[str, _Topic] = {}
        self.groups: dict[str, _Group] = {}
        self.epochs: dict[str, int] = {}  # transactional id → current producer epoch
        self.open_transactions: list[_Transaction] = []
        self._member_ids = itertools.count(1)

    # For tests and tools: snapshots taken under the lock.

    def committed_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """The offsets ``group_id`` has committed."""
        with self.condition:
            group = self.groups.get(group_id)
            return dict(group.committed) if group is not None else {}

    def members(self, group_id: str) -> list[str]:
        """The ids of ``group_id``'s members (evicting silent ones first)."""
        with self.condition:
            self.expire()
            group = self.groups.get(group_id)
            return list(group.members) if group is not None else []

    def open_transaction_count(self) -> int:
        """Transactions still open (after aborting those past their timeout)."""
        with self.condition:
            self.expire()
            return len(self.open_transactions)

    def high_watermarks(self, topic: str) -> dict[TopicPartition, int]:
        """The end of each partition of ``topic``."""
        with self.condition:
            return {(topic, number): len(log)
                    for number, log in enumerate(self.topics[topic].logs)}

    # Everything below runs with ``condition`` held.

    def create_topic(self, name: str, partitions: int, config: Mapping[str, str]) -> _Topic:
        if partitions < 1:
            raise TransportError(f"INVALID_PARTITIONS: topic {name!r} needs at least one")
        limit = int(config.get("max.message.bytes", BROKER_MAX_MESSAGE_BYTES))
        topic = self.topics[name] = _Topic(name, [[] for _ in range(partitions)], limit)
        for group in self.groups.values():  # subscribers learn of it through their metadata
            if any(name in member.topics for member in group.members.values()):
                self.prepare_rebalance(group)
        self.condition.notify_all()
        return topic

    def log(self, partition: TopicPartition) -> list[_Record]:
        topic, number = partition
        if topic not in self.topics or not 0 <= number < len(self.topics[topic].logs):
            raise TransportError(f"UNKNOWN_TOPIC_OR_PARTITION: {topic}[{number}]")
        return self.topics[topic].logs[number]

    def last_stable_offset(self, partition: TopicPartition) -> int:
        """The first offset of an open transaction's records in ``partition``, else its end."""
        return min((t.first_offsets[partition] for t in self.open_transactions
                    if partition in t.first_offsets), default=len(self.log(partition)))

    def expire(self) -> None:
        """Evict members silent for longer than their session timeout; abort transactions open
        for longer than their timeout (and fence their producers)."""
        now = time.monotonic()
        for group in self.groups.values():
            silent = [member_id for member_id, member in group.members.items()
                      if now - member.last_seen > member.session_timeout_s]
            for member_id in silent:
                del group.members[member_id]
            if silent:
                self.prepare_rebalance(group)
        for transaction in [t for t in self.open_transactions if now > t.deadline]:
            self.end_transaction(transaction, _ABORTED)
            if self.epochs.get(transaction.transactional_id) == transaction.epoch:
                self.epochs[transaction.transactional_id] += 1  # fences its producer

    def join(self, group: _Group, member: _Member) -> None:
        group.members[member.id] = member
        self.prepare_rebalance(group)

    def prepare_rebalance(self, group: _Group) -> None:
        """Start a rebalance: members holding the current generation's partitions must revoke
        them (at their next poll) before the next generation is assigned."""
        group.rebalancing = True
        for member in group.members.values():
            if member.generation == group.generation and not member.joined:
                member.joined = False  # still holds partitions: revokes at its next poll
            else:
                member.joined = True
        self.maybe_complete_rebalance(group)

    def maybe_complete_rebalance(self, group: _Group) -> None:
        if not group.rebalancing or not all(m.joined for m in group.members.values()):
            return
        group.generation += 1
        group.rebalancing = False
        group.assignments = self.assign(group)
        for member in group.members.values():
            member.joined = False
        self.condition.notify_all()

    def assign(self, group: _Group) -> dict[str, list[TopicPartition]]:
        """Each member's partitions under the group's strategy (range or round-robin)."""
        members = sorted(group.members.values(), key=lambda member: member.id)
        assignments: dict[str, list[TopicPartition]] = {member.id: [] for member in members}
        if not members:
            return assignments
        common = [s for s in members[0].strategies if all(s in m.strategies for m in members)]
        if not common:
            raise TransportError(f"INCONSISTENT_GROUP_PROTOCOL in group {group.id}")
        topics = sorted({t for member in members for t in member.topics if t in self.topics})
        if common[0] == "range":
            for topic in topics:
                subscribers = [member for member in members if topic in member.topics]
                count = len(self.topics[topic].logs)
                share, extra = divmod(count, len(subscribers))
                start = 0
                for index, member in enumerate(subscribers):
                    end = start + share + (index < extra)
                    assignments[member.id] += [(topic, p) for p in range(start, end)]
                    start = end
        else:
            turn = itertools.cycle(members)
            for topic in topics:
                for partition in range(len(self.topics[topic].logs)):
                    member = next(turn)
                    while topic not in member.topics:
                        member = next(turn)
                    assignments[member.id].append((topic, partition))
        return assignments

    def new_member_id(self, client_id: str) -> str:
        return f"{client_id}-{next(self._member_ids):06d}"

    def end_transaction(self, transaction: _Transaction, outcome: str) -> None:
        """Commit or abort ``transaction``: a control record per partition; its offsets are
        committed (or dropped) and no longer pending."""
        if transaction.state != _OPEN:
            return
        transaction.state = outcome
        now_ms = int(time.time() * 1000)
        for partition in sorted(transaction.first_offsets):
            self.log(partition).append(_Record(None, None, now_ms, None, transaction, True))
        for group_id, offsets in transaction.offsets.items():
            group = self.groups[group_id]
            for partition, offset in offsets.items():
                if group.pending.get(partition) is transaction:
                    del group.pending[partition]
                if outcome == _COMMITTED:
                    group.committed[partition] = offset
        self.open_transactions.remove(transaction)
        self.condition.notify_all()


_clusters: dict[str, MemoryCluster] = {}
_clusters_lock = threading.Lock()


def cluster(bootstrap: str) -> MemoryCluster:
    """The in-memory cluster named by ``bootstrap``, created on first use."""
    with _clusters_lock:
        if bootstrap not in _clusters:
            _clusters[bootstrap] = MemoryCluster(bootstrap)
        return _clusters[bootstrap]


def drop_cluster(bootstrap: str) -> None:
    """Forget the cluster named by ``bootstrap`` (clients still holding it keep working)."""
    with _clusters_lock:
        _clusters.pop(bootstrap, None)


def _record_size(value: bytes | None, key: bytes | None, headers: Headers | None) -> int:
    return (len(value or b"") + len(key or b"")
            + sum(len(name) + len(data or b"") for name, data in headers or ()))


def _read(log: list[_Record], partition: TopicPartition, position: int, max_records: int,
          read_committed: bool, batch: ConsumedBatch) -> int:
    """Append the records of ``log`` from ``position`` to ``batch``, up to ``max_records`` in
    it: control records are skipped, and for ``read_committed`` aborted records too, and it
    stops at the first record of an open transaction. Returns the next position."""
    topic, number = partition
    while position < len(log) and len(batch) < max_records:
        record = log[position]
        transaction = record.transaction
        if transaction is not None and read_committed:
            if transaction.state == _OPEN:
                break  # the last stable offset
            if transaction.state == _ABORTED:
                position += 1
                continue
        if not record.control:
            batch.topics.append(topic)
            batch.partitions.append(number)
            batch.offsets.append(position)
            batch.keys.append(record.key)
            batch.values.append(record.value)
            batch.timestamps_ms.append(record.timestamp_ms)
            batch.headers.append(list(record.headers) if record.headers else None)
        position += 1
    return position


class MemoryProducer(Producer):
    """A producer whose records are acknowledged as soon as :meth:`produce` stores them."""

    def __init__(self, cluster: MemoryCluster, transactional_id: str | None, max_bytes: int,
                 transaction_timeout_s: float) -> None:
        self._cluster = cluster
        self._transactional_id = transactional_id
        self._max_bytes = max_bytes
        self._transaction_timeout_s = transaction_timeout_s
        self._transaction: _Transaction | None = None
        self._next_partition: dict[str, int] = {}
        self._closed = False
        self._epoch = 0
        if transactional_id is not None:
            with cluster.condition:  # init_transactions: fence the previous producer of the id
                cluster.expire()
                self._epoch = cluster.epochs.get(transactional_id, -1) + 1
                cluster.epochs[transactional_id] = self._epoch
                for transaction in list(cluster.open_transactions):
                    if transaction.transactional_id == transactional_id:
                        cluster.end_transaction(transaction, _ABORTED)

    def _check(self) -> None:
        """Raise if this producer is closed or fenced; called with the lock held."""
        if self._closed:
            raise TransportError("the producer is closed")
        self._cluster.expire()
        tid = self._transactional_id
        if tid is not None and self._cluster.epochs.get(tid) != self._epoch:
            raise TransportError(f"PRODUCER_FENCED: a newer producer with transactional id "
                                 f"{tid!r} exists, or this one's transaction timed out")

    def _open(self) -> _Transaction:
        """The open transaction, which must still accept records and offsets."""
        transaction = self._transaction
        if transaction is None or transaction.state != _OPEN:
            raise TransportError("no transaction in progress")
        if transaction.abortable:
            raise TransportError(f"the transaction can only be aborted: {transaction.abortable}")
        return transaction

    def produce(self, batches: Sequence[OutgoingBatch]) -> None:
        refused: list[tuple[int, int]] = []  # by the client
        refused_by_broker: list[tuple[int, int]] = []
        cluster = self._cluster
        with cluster.condition:
            self._check()
            transaction = self._open() if self._transactional_id is not None else None
            now_ms = int(time.time() * 1000)
            for number, batch in enumerate(batches):
                topic = cluster.topics.get(batch.topic) or cluster.create_topic(batch.topic, 1, {})
                for index, (value, key, headers, timestamp) in enumerate(batch.records()):
                    size = _record_size(value, key, headers)
                    if size > self._max_bytes:
                        refused.append((number, index))
                        continue
                    if size > topic.max_message_bytes:
                        refused_by_broker.append((number, index))
                        continue
                    partition = self._partition(topic, key)
                    log = topic.logs[partition]
                    if transaction is not None:
                        transaction.first_offsets.setdefault((topic.name, partition), len(log))
                    log.append(_Record(
                        None if key is None else bytes(key),
                        None if value is None else bytes(value),
                        timestamp or now_ms,
                        [(name, bytes(data)) for name, data in headers] if headers else None,
                        transaction,
                    ))
            cluster.condition.notify_all()
            if refused_by_broker and transaction is not None:
                transaction.abortable = "the broker refused records for their size"
        if refused_by_broker:
            raise RecordTooLargeError(sorted(refused + refused_by_broker), True,
                                      "MESSAGE_TOO_LARGE: over the topic's max.message.bytes")
        if refused:
            raise RecordTooLargeError(refused, False, "over the client's message.max.bytes")

    def _partition(self, topic: _Topic, key: bytes | None) -> int:
        count = len(topic.logs)
        if key is not None:
            return zlib.crc32(key) % count
        partition = self._next_partition.get(topic.name, 0)
        self._next_partition[topic.name] = (partition + 1) % count
        return partition % count

    def begin_transaction(self) -> None:
        with self._cluster.condition:
            self._check()
            if self._transactional_id is None:
                raise TransportError("begin_transaction needs a transactional id")
            if self._transaction is not None and self._transaction.state == _OPEN:
                raise TransportError("a transaction is already in progress")
            self._transaction = _Transaction(
                self._transactional_id, self._epoch,
                time.monotonic() + self._transaction_timeout_s)
            self._cluster.open_transactions.append(self._transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], consumer: Consumer
    ) -> None:
        if not isinstance(consumer, MemoryConsumer) or consumer.cluster is not self._cluster:
            raise TransportError("the consumer must belong to the same in-memory cluster")
        with self._cluster.condition:
            self._check()
            transaction = self._open()
            group = consumer.group
            error = group.commit_error(consumer.member_id, consumer.member.generation)
            if error is not None:  # KIP-447: a zombie's offsets are refused, and its records
                transaction.abortable = error
                raise TransportError(f"fenced by the group generation: {error}")
            transaction.offsets.setdefault(group.id, {}).update(offsets)
            for partition in offsets:
                group.pending[partition] = transaction

    def commit_transaction(self) -> None:
        with self._cluster.condition:
            self._check()
            transaction = self._open()
            self._cluster.end_transaction(transaction, _COMMITTED)
            self._transaction = None

    def abort_transaction(self) -> None:
        with self._cluster.condition:
            self._check()
            transaction = self._transaction
            if transaction is None or transaction.state != _OPEN:
                raise TransportError("no transaction in progress")
            self._cluster.end_transaction(transaction, _ABORTED)
            self._transaction = None

    def close(self) -> None:
        """Close; an open transaction is aborted, as the Java client does."""
        with self._cluster.condition:
            if self._transaction is not None:
                self._cluster.end_transaction(self._transaction, _ABORTED)
                self._transaction = None
            self._closed = True


class MemoryConsumer(Consumer):
    """A group member; its listener is called from :meth:`consume_batch` on the calling thread."""

    def __init__(self, cluster: MemoryCluster, group_id: str, topics: Sequence[str],
                 listener: RebalanceListener | None, read_committed: bool,
                 settings: Mapping[str, str]) -> None:
        self.cluster = cluster
        self._listener = listener
        self._read_committed = read_committed
        self._closed = False
        self._turn = 0  # the partition fetched first, rotated for fairness
        self._latest = settings.get("auto.offset.reset", "earliest") in ("latest", "largest")
        self._client_id = settings.get("client.id", "memory")
        self._session_timeout_s = int(settings.get(
            "session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS)) / 1000
        strategies = tuple(s.strip() for s in settings.get(
            "partition.assignment.strategy", "range").split(",") if s.strip())
        unknown = [s for s in strategies if s not in _STRATEGIES]
        if unknown or not strategies:
            raise ValueError(f"partition.assignment.strategy {unknown or strategies}: the memory "
                             f"transport knows {', '.join(_STRATEGIES)}")
        self._strategies = strategies
        self._topics = tuple(topics)
        with cluster.condition:
            cluster.expire()
            self.group = cluster.groups.setdefault(group_id, _Group(group_id))
            self.member = self._new_member()
            cluster.join(self.group, self.member)

    @property
    def member_id(self) -> str:
        return self.member.id

    def _new_member(self) -> _Member:
        return _Member(self.cluster.new_member_id(self._client_id), self._topics,
                       self._strategies, self._session_timeout_s, time.monotonic())

    def _check(self) -> None:
        if self._closed:
            raise TransportError("the consumer is closed")

    def consume_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        deadline = time.monotonic() + timeout_s
        condition = self.cluster.condition
        while True:
            with condition:
                self._check()
                self.cluster.expire()
                member, group = self.member, self.group
                member.last_seen = time.monotonic()
                if member.id not in group.members:  # evicted: its partitions are lost
                    callback, partitions = "lost", list(member.assignment)
                elif group.rebalancing and not member.joined:
                    callback, partitions = "revoke", list(member.assignment)
                elif not group.rebalancing and member.generation != group.generation:
                    member.generation = group.generation
                    member.assignment = list(group.assignments.get(member.id, []))
                    member.positions = dict.fromkeys(member.assignment)
                    callback, partitions = "assign", list(member.assignment)
                else:
                    batch = self._fetch(max_records) if not group.rebalancing else ConsumedBatch()
                    remaining = deadline - time.monotonic()
                    if len(batch) or remaining <= 0:
                        return batch
                    condition.wait(min(remaining, _WAIT_SLICE_S))
                    continue
            self._rebalance(callback, partitions)

    def _rebalance(self, callback: str, partitions: list[TopicPartition]) -> None:
        """Call the listener outside the lock (it may commit), then go on with the protocol."""
        try:
            if self._listener is not None:
                if callback == "assign":
                    self._listener.on_assign(partitions)
                elif callback == "revoke":
                    self._listener.on_revoke(partitions)
                elif partitions:
                    self._listener.on_lost(partitions)
        finally:
            if callback != "assign":
                with self.cluster.condition:
                    if callback == "lost":  # join again as a new member
                        self.member = self._new_member()
                        self.cluster.join(self.group, self.member)
                    else:
                        self.member.assignment, self.member.positions = [], {}
                        self.member.joined = True
                        self.cluster.maybe_complete_rebalance(self.group)

    def _start(self, partition: TopicPartition) -> int | None:
        """Where a newly assigned partition starts: its committed offset, else the reset
        policy's end; None while a transaction's offsets for it are pending."""
        if partition in self.group.pending:
            return None
        log = self.cluster.log(partition)
        committed = self.group.committed.get(partition)
        if committed is not None and committed <= len(log):
            return committed
        return len(log) if self._latest else 0

    def _fetch(self, max_records: int) -> ConsumedBatch:
        batch = ConsumedBatch()
        positions = self.member.positions
        assigned = self.member.assignment
        if not assigned:
            return batch
        self._turn = (self._turn + 1) % len(assigned)
        for partition in assigned[self._turn:] + assigned[:self._turn]:
            position = positions.get(partition)
            if position is None:
                position = self._start(partition)
                if position is None:
                    continue
            positions[partition] = _read(self.cluster.log(partition), partition, position,
                                         max_records, self._read_committed, batch)
            if len(batch) >= max_records:
                break
        return batch

    def commit(self, offsets: Mapping[TopicPartition, int], asynchronous: bool = False) -> None:
        if not offsets:
            return
        with self.cluster.condition:
            self._check()
            self.cluster.expire()
            error = self.group.commit_error(self.member.id, self.member.generation)
            if error is not None:
                if asynchronous:
                    return  # as the real clients: reported to a callback, not raised
                raise RebalanceInProgressError(error)
            self.group.committed.update(offsets)

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        deadline = time.monotonic() + COMMITTED_TIMEOUT_S
        with self.cluster.condition:
            while True:
                self._check()
                self.cluster.expire()
                if not any(partition in self.group.pending for partition in partitions):
                    return {partition: self.group.committed.get(partition)
                            for partition in partitions}
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError("Timed out waiting for the offsets of an open "
                                         "transaction (UNSTABLE_OFFSET_COMMIT)")
                self.cluster.condition.wait(min(remaining, _WAIT_SLICE_S))

    def assignment(self) -> list[TopicPartition]:
        with self.cluster.condition:
            return list(self.member.assignment)

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        with self.cluster.condition:
            return {partition: len(self.cluster.log(partition)) for partition in partitions}

    def lag(self) -> dict[TopicPartition, int]:
        with self.cluster.condition:
            self._check()
            lags = {}
            for partition in self.member.assignment:
                end = len(self.cluster.log(partition))
                position = self.member.positions.get(partition)
                if position is None:
                    position = self.group.committed.get(partition, 0)
                lags[partition] = max(end - position, 0)
            return lags

    def close(self) -> None:
        with self.cluster.condition:
            if self._closed:
                return
            self._closed = True
            if self.group.members.pop(self.member.id, None) is not None:
                self.cluster.prepare_rebalance(self.group)
            self.cluster.condition.notify_all()


class MemoryReader(Reader):
    """Reads chosen partitions from chosen offsets, as a member of no group."""

    def __init__(self, cluster: MemoryCluster, start: Mapping[TopicPartition, int | None],
                 read_committed: bool) -> None:
        self._cluster = cluster
        self._read_committed = read_committed
        with cluster.condition:
            for partition in start:
                cluster.log(partition)  # raises for an unknown partition
        self._positions = {partition: offset or 0 for partition, offset in start.items()}

    def read_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        deadline = time.monotonic() + timeout_s
        condition = self._cluster.condition
        with condition:
            while True:
                self._cluster.expire()
                batch = ConsumedBatch()
                for partition, position in self._positions.items():
                    self._positions[partition] = _read(
                        self._cluster.log(partition), partition, position, max_records,
                        self._read_committed, batch)
                remaining = deadline - time.monotonic()
                if len(batch) or remaining <= 0:
                    return batch
                condition.wait(min(remaining, _WAIT_SLICE_S))

    def position(self) -> dict[TopicPartition, int]:
        return dict(self._positions)

    def end_offsets(self) -> dict[TopicPartition, int]:
        with self._cluster.condition:
            if self._read_committed:
                return {p: self._cluster.last_stable_offset(p) for p in self._positions}
            return {p: len(self._cluster.log(p)) for p in self._positions}

    def offsets_for_times(self, timestamp_ms: int) -> dict[TopicPartition, int]:
        ends = self.end_offsets()
        with self._cluster.condition:
            return {p: next((offset for offset, record in enumerate(self._cluster.log(p)[:ends[p]])
                             if not record.control and record.timestamp_ms >= timestamp_ms), ends[p])
                    for p in self._positions}

    def close(self) -> None:
        """Nothing to release."""


class MemoryAdmin(Admin):
    def __init__(self, cluster: MemoryCluster) -> None:
        self._cluster = cluster

    def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        with self._cluster.condition:
            for spec in topics:
                if spec.name not in self._cluster.topics:
                    self._cluster.create_topic(spec.name, spec.partitions, spec.config)

    def cluster_id(self) -> str:
        return self._cluster.id

    def describe_topics(self, names: Sequence[str] | None = None) -> dict[str, int]:
        with self._cluster.condition:
            return {name: len(topic.logs) for name, topic in self._cluster.topics.items()
                    if names is None or name in names}

    def close(self) -> None:
        """Nothing to release."""


class MemoryTransport(Transport):
    """Clients of the in-memory cluster named by the bootstrap string (``memory://NAME``).

    Client settings read, in librdkafka's names: ``message.max.bytes``, ``session.timeout.ms``,
    ``transaction.timeout.ms``, ``auto.offset.reset``, ``partition.assignment.strategy`` and
    ``client.id``; others are accepted and ignored.
    """

    name = "memory"

    def __init__(self, bootstrap: str, client_config: Mapping[str, str] | None = None) -> None:
        super().__init__(bootstrap, client_config)
        self.cluster = cluster(bootstrap)

    def _setting(self, name: str, default: int) -> int:
        return int(self.client_config.get(name, default))

    def producer(self, transactional_id: str | None = None) -> Producer:
        return MemoryProducer(
            self.cluster, transactional_id or None,
            self._setting("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES),
            self._setting("transaction.timeout.ms", DEFAULT_TRANSACTION_TIMEOUT_MS) / 1000,
        )

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
        read_committed: bool = True,
    ) -> Consumer:
        settings = {name: str(value) for name, value in self.client_config.items()}
        return MemoryConsumer(self.cluster, group_id, topics, listener, read_committed, settings)

    def reader(self, start: Mapping[TopicPartition, int | None], read_committed: bool = True
               ) -> Reader:
        return MemoryReader(self.cluster, start, read_committed)

    def admin(self) -> Admin:
        return MemoryAdmin(self.cluster)

    def cluster_id(self) -> str:
        return self.cluster.id
