"""The default transport, on confluent-kafka (librdkafka)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any

from confluent_kafka import (
    Consumer as _Consumer,
)
from confluent_kafka import (
    KafkaError,
    KafkaException,
    Message,
)
from confluent_kafka import (
    Producer as _Producer,
)
from confluent_kafka import (
    TopicPartition as _TP,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streamflow.transport.base import (
    STILL_BLOCKED,
    Admin,
    AuthenticationError,
    ConsumedBatch,
    Consumer,
    OutgoingBatch,
    Producer,
    Reader,
    RebalanceInProgressError,
    RebalanceListener,
    Record,
    RecordTooLargeError,
    TopicPartition,
    TopicSpec,
    Transport,
    TransportError,
)

log = logging.getLogger(__name__)

_FLUSH_TIMEOUT_S = 60.0
# librdkafka can miss the timeout of send_offsets_to_transaction: it waits for the group
# coordinator without checking the deadline, and forever once that broker has left the
# cluster's metadata (librdkafka issues 5456 and 5511, open in 2.16). The call runs in a thread
# of its own, given up this long after its timeout: the producer is then wedged, and replaced.
# In the three-broker test, a broker's SIGKILL wedged two or three stages this way in three runs
# of nine; the timeout is short so that they restart soon (and within the default shutdown
# timeout, 30 s).
_OFFSETS_TIMEOUT_S = 15.0
_WEDGE_GRACE_S = 5.0
# How often a transaction's flush looks for a refusal for size, after which it purges the rest.
_REFUSAL_CHECK_S = 0.1
# Delivery errors of records librdkafka purged unsent, in a transaction failed by a refusal.
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}

_AUTH_ERRORS = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}

_timestamp_ms = itemgetter(1)  # of a message's (timestamp type, timestamp) pair

_librdkafka = logging.getLogger("streamflow.transport.librdkafka")


class _ClientLog:
    """One client's librdkafka log, through Python logging (its ``logger`` setting) rather than
    straight to stderr. librdkafka queues the lines for the client's polls, so a client no
    longer polled says nothing (say, after its broker stopped at the end of a run). They come at
    WARNING at most, since streamflow reports the failures that matter itself, and at DEBUG once
    the client is closing, when a broker already gone is no news."""

    def __init__(self) -> None:
        self.closing = False

    def log(self, level: int, message: str, *args: object) -> None:
        _librdkafka.log(logging.DEBUG if self.closing else min(level, logging.WARNING), message,
                        *args)


class _TransactionFailed(TransportError):
    """The client refused to queue a record: its transaction had failed."""


def _error(exc: KafkaException | KafkaError) -> TransportError:
    """The transport error for a client failure; authentication failures are fatal."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    if isinstance(error, KafkaError) and error.code() in _AUTH_ERRORS:
        return AuthenticationError(str(error))
    return TransportError(str(error))


class ConfluentProducer(Producer):
    def __init__(self, config: dict[str, Any], admin_config: dict[str, Any]) -> None:
        self._failures: list[tuple[KafkaError, Message]] = []
        # Since the last flush: the batches sent, the (batch, index) of their records refused
        # by the client, and the failure of the transaction that stopped the sending.
        self._sent: list[OutgoingBatch] = []
        self._refused_by_client: list[tuple[int, int]] = []
        self._stopped: _TransactionFailed | None = None
        self._wedged: str | None = None  # why the producer can no longer be called, if so
        self._log: _ClientLog = config["logger"]
        # One delivery callback for the producer, not a keyword argument per record.
        self._producer = _Producer({**config, "on_delivery": self._on_delivery})
        self._admin_config = admin_config
        self._transactional = "transactional.id" in config
        if self._transactional:
            self._call(self._producer.init_transactions, 30)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append((error, message))

    def produce(self, batches: Sequence[OutgoingBatch]) -> None:
        self.send(batches)
        self.flush()

    def send(self, batches: Sequence[OutgoingBatch]) -> None:
        first = len(self._sent)
        self._sent += batches
        if self._stopped is not None:
            return
        try:
            for number, batch in enumerate(batches, first):
                self._enqueue(number, batch.topic, enumerate(batch.records()), self._refused_by_client)
        except _TransactionFailed as exc:  # the records not queued yet are unsent
            self._stopped = exc

    def acknowledged(self) -> bool:
        self._producer.poll(0)  # serves the delivery reports that came
        return len(self._producer) == 0  # records queued, in flight, or not reported

    def flush(self) -> None:
        batches, refused, stopped = self._sent, self._refused_by_client, self._stopped
        self._sent, self._refused_by_client, self._stopped = [], [], None
        failures = self._flush()
        if stopped and not failures:
            raise stopped
        if failures:
            raise self._refusal(failures, batches, refused)
        if refused:
            raise RecordTooLargeError(refused, False, "over the client's message.max.bytes")

    def _enqueue(self, number: int, topic: str, records: Iterable[tuple[int, Record]],
                 refused: list[tuple[int, int]]) -> None:
        """Queue the (index, record) ``records`` of the ``number``-th batch, waiting for room when
        the local queue is full; the indices of records refused for their size go to ``refused``."""
        produce = self._producer.produce
        # Arguments by position, as keywords cost about a third of the call: topic, value, key,
        # partition -1 (the partitioner's choice), callback and on_delivery None (the producer's
        # callback), timestamp (0 means now), headers.
        for index, (value, key, headers, timestamp) in records:
            try:
                produce(topic, value, key, -1, None, None, timestamp or 0, headers or None)
            except (BufferError, KafkaException) as exc:
                if not self._enqueue_after(
                        exc, (topic, value, key, -1, None, None, timestamp or 0, headers or None)):
                    refused.append((number, index))

    def _enqueue_after(self, exc: BufferError | KafkaException, record: tuple[Any, ...]) -> bool:
        """Queue ``record`` after producing it raised ``exc``: once there is room, if the local
        queue was full. False when the client refused it for its size; other failures raise."""
        while isinstance(exc, BufferError):
            self._producer.poll(0.05)
            try:
                self._producer.produce(*record)
                return True
            except (BufferError, KafkaException) as again:
                exc = again
        code = exc.args[0].code()
        if code == KafkaError._STATE and self._transactional:
            raise _TransactionFailed(str(exc.args[0])) from exc
        if code != KafkaError.MSG_SIZE_TOO_LARGE:
            raise _error(exc) from exc
        return False

    def _flush(self) -> list[tuple[KafkaError, Message]]:
        """Wait for every queued record; returns the failures: refusals for size by the broker
        and, in a transaction they failed, the records purged unsent (any other failure raises).

        A refusal fails a transaction: librdkafka purges the records queued behind the refused
        one and holds those in flight until the transaction is aborted, so the rest is purged
        here, in flight too (the transaction can only be aborted, and its producer replaced).
        """
        deadline = time.monotonic() + _FLUSH_TIMEOUT_S
        step = _REFUSAL_CHECK_S if self._transactional else _FLUSH_TIMEOUT_S
        # The length counts delivery reports not served yet too: at 0 there is nothing to wait
        # for, and librdkafka's flush would still wake every broker thread (about 20 µs).
        remaining = self._producer.flush(step) if len(self._producer) else 0
        while remaining and time.monotonic() < deadline:
            if self._transactional and _size_refusals(self._failures):
                self._producer.purge()
            remaining = self._producer.flush(max(0.0, min(step, deadline - time.monotonic())))
        failures, self._failures = self._failures, []
        if remaining:
            raise TransportError(f"{remaining} records not acknowledged within {_FLUSH_TIMEOUT_S}s")
        purged = _PURGED if _size_refusals(failures) and self._transactional else set()
        if any(error.code() not in purged and error.code() != KafkaError.MSG_SIZE_TOO_LARGE
               for error, _message in failures):
            raise TransportError(f"{len(failures)} records failed delivery, first: {failures[0][0]}")
        return failures

    def _refusal(self, failures: list[tuple[KafkaError, Message]], batches: Sequence[OutgoingBatch],
                 refused: list[tuple[int, int]]) -> RecordTooLargeError:
        """The error for records of ``batches`` the broker refused for their size (``failures``)
        besides those the client ``refused``.

        librdkafka fails every record of a message set the broker refused, so only those over
        their topic's ``max.message.bytes`` on their own are named. The others were not written:
        a transaction is aborted by the caller and they go again in the next one (as do those
        purged unsent, see :meth:`_flush`); a producer without one sends them again here, and
        names those refused again. When no refused record is too large on its own (small records
        together over a small topic limit), all refused are named, so that the caller never sends
        the same records again and again.
        """
        places = [(number, index) for number, batch in enumerate(batches)
                  for index in range(len(batch.values))]
        failed = _locate([message for _error, message in failures], batches, places)
        sized = [place for place, (error, _message) in zip(failed, failures, strict=True)
                 if error.code() == KafkaError.MSG_SIZE_TOO_LARGE]
        limits = self._topic_limits({batches[number].topic for number, _index in sized})
        rejected = [(number, index) for number, index in sized
                    if _alone_size(batches[number].record(index)) > limits.get(
                        batches[number].topic, 0)] or sized
        unsent = sorted(set(failed) - set(rejected))
        if unsent and not self._transactional:
            rejected += self._send_again(unsent, batches)
        detail = _size_refusals(failures)[0]
        return RecordTooLargeError(sorted(refused + rejected), True, str(detail))

    def _send_again(self, places: list[tuple[int, int]], batches: Sequence[OutgoingBatch]
                    ) -> list[tuple[int, int]]:
        """Send the records of ``batches`` at ``places`` (sorted) again; those refused again."""
        refused: list[tuple[int, int]] = []
        for number, group in groupby(places, itemgetter(0)):
            batch = batches[number]
            self._enqueue(number, batch.topic,
                          ((index, batch.record(index)) for _number, index in group), refused)
        failures = self._flush()
        return refused + _locate([message for _error, message in failures], batches, places)

    def _topic_limits(self, topics: set[str]) -> dict[str, int]:
        """The ``max.message.bytes`` of each of ``topics`` the brokers tell (none they do not)."""
        admin = AdminClient(self._admin_config)
        limits = {}
        futures = admin.describe_configs(
            [ConfigResource(ConfigResource.Type.TOPIC, topic) for topic in topics],
            request_timeout=10)
        for resource, future in futures.items():
            try:
                limits[resource.name] = int(future.result()["max.message.bytes"].value)
            except (KafkaException, KeyError, ValueError):
                continue
        return limits

    def _call(self, method: Any, *args: Any) -> Any:
        if self._wedged is not None:
            raise TransportError(self._wedged)
        try:
            return method(*args)
        except KafkaException as exc:
            raise TransportError(str(exc)) from exc

    def _call_bounded(self, method: Any, *args: Any, timeout_s: float) -> None:
        """``method(*args, timeout_s)`` in a daemon thread, waited for until
        :data:`_WEDGE_GRACE_S` past ``timeout_s``; if it has not returned by then, the producer
        is wedged: every later call fails, and closing it leaves the native client to that
        thread (destroying it under a call in progress would be unsafe)."""
        outcome: list[BaseException | None] = []
        given_up_at: list[float] = []
        decided = threading.Lock()  # the call's end and its giving up, one at a time

        def run() -> None:
            try:
                self._call(method, *args, timeout_s)
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)
            with decided:
                if given_up_at:
                    STILL_BLOCKED.discard(thread)
                    log.info("%s, given up %.0f s ago, returned: its producer is released "
                             "(%d calls given up are still blocked)", method.__name__,
                             time.monotonic() - given_up_at[0], len(STILL_BLOCKED))

        # A given-up call joins STILL_BLOCKED: librdkafka 5511 says it returns once some other
        # broker changes state, maybe never.
        thread = threading.Thread(target=run, name=f"streamflow-{method.__name__}", daemon=True)
        thread.start()
        thread.join(timeout_s + _WEDGE_GRACE_S)
        with decided:
            if not outcome:
                given_up_at.append(time.monotonic())
                STILL_BLOCKED.add(thread)
                self._wedged = (
                    f"{method.__name__} did not return within {timeout_s:g} s plus "
                    f"{_WEDGE_GRACE_S:g} s (librdkafka issues 5456 and 5511): this producer is "
                    f"given up, its native client left to the blocked call ({len(STILL_BLOCKED)} "
                    "calls given up in this process are still blocked)")
                raise TransportError(self._wedged)
        if outcome[0] is not None:
            raise outcome[0]

    def begin_transaction(self) -> None:
        self._call(self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], consumer: Consumer
    ) -> None:
        assert isinstance(consumer, ConfluentConsumer)
        tps = [_TP(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        metadata = consumer.raw.consumer_group_metadata()
        self._call_bounded(self._producer.send_offsets_to_transaction, tps, metadata,
                           timeout_s=_OFFSETS_TIMEOUT_S)

    def commit_transaction(self) -> None:
        self._call(self._producer.commit_transaction, 60)

    def abort_transaction(self) -> None:
        self._call(self._producer.abort_transaction, 60)
        self._failures = []  # reports of the records the abort purged

    def close(self) -> None:
        self._log.closing = True
        if self._wedged is None:  # a wedged producer's records belong to a doomed transaction
            self._producer.flush(_FLUSH_TIMEOUT_S)


# A record batch's header (v2): base offset, length, leader epoch, magic, CRC, attributes, last
# offset delta, first and max timestamps, producer id and epoch, base sequence, record count.
_BATCH_HEADER_BYTES = 61


def _size_refusals(failures: list[tuple[KafkaError, Message]]) -> list[KafkaError]:
    """The errors of ``failures`` that are refusals for size by the broker."""
    return [error for error, _message in failures
            if error.code() == KafkaError.MSG_SIZE_TOO_LARGE]



def _varint_bytes(number: int) -> int:
    """The length of ``number`` as a zigzag varint, the encoding of a record's fields."""
    zigzag = (number << 1) ^ (number >> 63)
    length = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        length += 1
    return length


def _field_bytes(data: bytes | None) -> int:
    """The length of a key, value or header value with its length before it (-1: null)."""
    return _varint_bytes(-1) if data is None else _varint_bytes(len(data)) + len(data)


def _alone_size(record: Record) -> int:
    """The bytes of an uncompressed record batch of ``record`` alone: what the broker compares
    with the topic's ``max.message.bytes``."""
    value, key, headers, _timestamp = record
    body = 3 + _field_bytes(key) + _field_bytes(value)  # attributes, timestamp and offset deltas
    body += _varint_bytes(len(headers or ())) + sum(
        _field_bytes(name.encode()) + _field_bytes(data) for name, data in headers or ())
    return _BATCH_HEADER_BYTES + _varint_bytes(body) + body


def _locate(messages: list[Message], batches: Sequence[OutgoingBatch],
            places: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (batch, record) indices among ``places`` of ``messages`` (delivery reports carry
    copies of the values, so they are matched by topic, key and value: identical records are
    told apart by order)."""
    found: dict[tuple[str, bytes | None, bytes], list[tuple[int, int]]] = {}
    topics = {message.topic() for message in messages}
    for number, index in places:
        batch = batches[number]
        if batch.topic in topics:
            value, key, _headers, _timestamp = batch.record(index)
            found.setdefault((batch.topic, key, bytes(value or b"")), []).append((number, index))
    return [found[(message.topic(), message.key(), message.value() or b"")].pop(0)
            for message in messages]


def _columns(messages: list[Message]) -> ConsumedBatch:
    """Records as columns, through C-level map calls: no Python frame per record and column."""
    return ConsumedBatch(
        topics=list(map(Message.topic, messages)),
        partitions=list(map(Message.partition, messages)),
        offsets=list(map(Message.offset, messages)),
        keys=list(map(Message.key, messages)),
        values=list(map(Message.value, messages)),
        timestamps_ms=list(map(_timestamp_ms, map(Message.timestamp, messages))),
        headers=list(map(Message.headers, messages)),
    )


class ConfluentReader(Reader):
    """An assigned consumer; its position is advanced to a partition's end when librdkafka reports
    reaching it, since that position stays at the last record when markers follow it."""

    def __init__(self, config: dict[str, Any], start: Mapping[TopicPartition, int | None]) -> None:
        self._log: _ClientLog = config["logger"]
        self.raw = _Consumer(config)
        self._next: dict[TopicPartition, int] = {}
        try:
            for (topic, partition), offset in start.items():
                if offset is None:
                    offset, _high = self.raw.get_watermark_offsets(_TP(topic, partition), timeout=10)
                self._next[(topic, partition)] = offset
            self.raw.assign([_TP(topic, partition, offset)
                             for (topic, partition), offset in self._next.items()])
        except KafkaException as exc:
            self.raw.close()
            raise _error(exc) from exc

    def read_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        try:
            messages = self.raw.consume(max_records, timeout_s)
        except KafkaException as exc:
            raise _error(exc) from exc
        records = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(message)
                self._next[(message.topic(), message.partition())] = message.offset() + 1
            elif error.code() == KafkaError._PARTITION_EOF:
                place = (message.topic(), message.partition())
                self._next[place] = max(self._next[place], message.offset())
            elif error.code() in _AUTH_ERRORS or error.fatal():
                raise _error(error)
        return _columns(records)

    def position(self) -> dict[TopicPartition, int]:
        return dict(self._next)

    def end_offsets(self) -> dict[TopicPartition, int]:
        ends = {}
        for topic, partition in self._next:
            try:  # a ListOffsets request with the reader's isolation level: the LSO if committed
                _low, high = self.raw.get_watermark_offsets(_TP(topic, partition), timeout=10,
                                                            cached=False)
            except KafkaException as exc:
                raise _error(exc) from exc
            ends[(topic, partition)] = high
        return ends

    def offsets_for_times(self, timestamp_ms: int) -> dict[TopicPartition, int]:
        try:
            found = self.raw.offsets_for_times(
                [_TP(topic, partition, timestamp_ms) for topic, partition in self._next], timeout=10)
        except KafkaException as exc:
            raise _error(exc) from exc
        offsets = {(tp.topic, tp.partition): tp.offset for tp in found}
        if any(offset < 0 for offset in offsets.values()):  # -1: no record that late
            ends = self.end_offsets()
            offsets = {place: ends[place] if offset < 0 else offset
                       for place, offset in offsets.items()}
        return offsets

    def close(self) -> None:
        self._log.closing = True
        self.raw.close()


# How often librdkafka tells a consumer how its brokers are doing (see _Leaders), and how many of
# those reports in a row must find a broker down or silent before its partitions count as
# unreachable (a connection being set up, or one slow answer, is no outage), besides the reports
# a fetch may wait for data on the broker (``fetch.wait.max.ms``).
_STATISTICS_INTERVAL_MS = 1000
_BAD_REPORTS = 2
_DEFAULT_FETCH_WAIT_MS = 500  # librdkafka's fetch.wait.max.ms


class _Leaders:
    """Whether the leaders of a consumer's partitions answer, from librdkafka's statistics.

    A broker counts as unreachable once enough reports in a row found its connection not up, or
    found requests waiting for it and none answered since the last report (a broker that is
    paused or cut off keeps its connections; a fetch is answered within ``fetch_wait_ms``).
    Cached watermarks, which the lag is measured with, never show either: they just stop moving.
    """

    def __init__(self, interval_ms: int, fetch_wait_ms: int = _DEFAULT_FETCH_WAIT_MS) -> None:
        self.interval_ms = interval_ms
        self.needed = _BAD_REPORTS + (fetch_wait_ms // interval_ms if interval_ms > 0 else 0)
        self._leaders: dict[TopicPartition, int] = {}
        self._bad: dict[int, tuple[int, str]] = {}  # broker id: reports in a row, and why

    def update(self, report: str) -> None:
        """Take one statistics report (librdkafka's ``stats_cb``)."""
        statistics = json.loads(report)
        bad = {}
        for broker in statistics.get("brokers", {}).values():
            node = broker.get("nodeid", -1)
            if node < 0 or broker.get("source") != "learned":
                continue  # a bootstrap address, or a coordinator's alias of a learned broker
            if broker.get("state") != "UP":
                why = f"its connection is {broker.get('state')}"
            elif broker.get("waitresp_cnt", 0) and not broker.get("rtt", {}).get("cnt", 0):
                why = "it answers no request"
            else:
                continue
            bad[node] = (self._bad.get(node, (0, ""))[0] + 1, why)
        self._bad = bad
        self._leaders = {(topic, int(partition)): state.get("leader", -1)
                         for topic, details in statistics.get("topics", {}).items()
                         for partition, state in details.get("partitions", {}).items()
                         if partition != "-1"}  # -1: the topic's queue of unassigned records

    def unreachable(self, partitions: Iterable[TopicPartition]) -> str | None:
        """Why the leaders of ``partitions`` are unreachable, if any is; None if all answer."""
        troubles: dict[int, list[TopicPartition]] = {}
        for place in partitions:
            leader = self._leaders.get(place)
            if leader is not None and (leader < 0 or self._bad.get(leader, (0,))[0] >= self.needed):
                troubles.setdefault(leader, []).append(place)
        reasons = []
        for leader, places in sorted(troubles.items()):
            named = ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(places))
            if leader < 0:
                reasons.append(f"no leader for {named}")
            else:
                reports, why = self._bad[leader]
                reasons.append(f"broker {leader}, leader of {named}: {why} "
                               f"({reports} reports in a row, {self.interval_ms} ms apart)")
        return "; ".join(reasons) or None


class ConfluentConsumer(Consumer):
    def __init__(
        self, config: dict[str, Any], topics: Sequence[str], listener: RebalanceListener | None
    ) -> None:
        self._log: _ClientLog = config["logger"]
        config = {"statistics.interval.ms": _STATISTICS_INTERVAL_MS, **config}
        self._leaders = _Leaders(int(config["statistics.interval.ms"]),
                                 int(config.get("fetch.wait.max.ms", _DEFAULT_FETCH_WAIT_MS)))
        self.raw = _Consumer({**config, "stats_cb": self._leaders.update})
        self._topics = list(topics)
        self._listener = listener
        self._listener_error: BaseException | None = None
        self.raw.subscribe(list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)

    def _notify(self, callback: Any, partitions: list[_TP]) -> None:
        # librdkafka cannot carry a Python exception out of a rebalance callback: keep it and
        # raise it from consume_batch instead.
        try:
            callback([(tp.topic, tp.partition) for tp in partitions])
        except BaseException as exc:
            self._listener_error = exc

    def _on_assign(self, _consumer: Any, partitions: list[_TP]) -> None:
        if self._listener:
            self._notify(self._listener.on_assign, partitions)

    def _on_revoke(self, _consumer: Any, partitions: list[_TP]) -> None:
        if self._listener:
            # librdkafka does not always route a loss to on_lost (a revoke that was pending
            # when max.poll.interval.ms ran out stays a revoke), but once it left the group
            # it has no member id: the partitions are lost, commits would be refused.
            lost = not self.raw.memberid()
            self._notify(self._listener.on_lost if lost else self._listener.on_revoke, partitions)

    def _on_lost(self, _consumer: Any, partitions: list[_TP]) -> None:
        if self._listener:
            self._notify(self._listener.on_lost, partitions)

    def consume_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        """What is fetched already, up to ``max_records``; if nothing is, the first record to
        come within ``timeout_s`` and what came with it. A batch is then as small as the
        traffic is light, and fills up as a backlog builds (``consume(n, timeout)`` alone would
        wait for ``n`` records or the whole timeout, however light the traffic)."""
        try:
            messages = self.raw.consume(max_records, 0)
            if not messages:
                first = self.raw.poll(timeout_s)
                if first is not None:
                    messages = [first, *(self.raw.consume(max_records - 1, 0)
                                         if max_records > 1 else [])]
        except KafkaException as exc:
            raise _error(exc) from exc
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error
        if any(map(Message.error, messages)):  # errors are KafkaError objects, never falsy
            messages = self._without_errors(messages)
        return _columns(messages)

    @staticmethod
    def _without_errors(messages: list[Message]) -> list[Message]:
        """The records among ``messages``; fatal and authentication errors are raised."""
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.code() in _AUTH_ERRORS or (
                error.code() != KafkaError._PARTITION_EOF and error.fatal()
            ):
                raise _error(error)
        return good

    def commit(self, offsets: Mapping[TopicPartition, int], asynchronous: bool = False) -> None:
        if not offsets:
            return
        tps = [_TP(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        try:
            self.raw.commit(offsets=tps, asynchronous=asynchronous)
        except KafkaException as exc:
            code = exc.args[0].code() if exc.args else None
            if code in (KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
                        KafkaError.UNKNOWN_MEMBER_ID):
                raise RebalanceInProgressError(str(exc)) from exc
            raise TransportError(str(exc)) from exc

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        tps = [_TP(topic, partition) for topic, partition in partitions]
        try:
            result = self.raw.committed(tps, timeout=10)
        except KafkaException as exc:
            raise TransportError(str(exc)) from exc
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result}

    def assignment(self) -> list[TopicPartition]:
        return [(tp.topic, tp.partition) for tp in self.raw.assignment()]

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        ends = {}
        for topic, partition in partitions:
            try:
                _low, high = self.raw.get_watermark_offsets(
                    _TP(topic, partition), timeout=10, cached=False
                )
            except KafkaException as exc:
                raise TransportError(str(exc)) from exc
            ends[(topic, partition)] = high
        return ends

    def lag(self) -> dict[TopicPartition, int]:
        try:
            lags = self._lag()
        except KafkaException as exc:  # e.g. a partition whose leader is moving
            raise TransportError(str(exc)) from exc
        if unreachable := self._leaders.unreachable(lags):
            raise TransportError(unreachable)
        return lags

    def _lag(self) -> dict[TopicPartition, int]:
        assigned = self.raw.assignment()
        if not assigned:
            # No partition to measure: ask for one topic's metadata, so that brokers that do not
            # answer (while the group cannot form, say) still show as a failure.
            self.raw.list_topics(self._topics[0], timeout=2)
            return {}
        positions = self.raw.position(assigned)
        committed: dict[TopicPartition, int | None] | None = None
        lags: dict[TopicPartition, int] = {}
        for tp in positions:
            position = tp.offset
            if position < 0:  # nothing consumed yet: fall back to the committed offset
                if committed is None:
                    committed = self.committed(self.assignment())
                position = committed.get((tp.topic, tp.partition)) or -1
            # Fetch responses keep the cached watermarks current, also of partitions whose
            # records are fetched but not consumed yet. Asking the broker instead waits behind
            # the consumer's long-polling fetch (fetch.wait.max.ms, 0.5 s a partition), in the
            # stage's thread: once a second, that stalled a stage by more than it worked.
            low, high = self.raw.get_watermark_offsets(tp, timeout=5, cached=True)
            if high < 0 or (position < 0 and low < 0):  # nothing fetched yet
                low, high = self.raw.get_watermark_offsets(tp, timeout=5, cached=False)
            lags[(tp.topic, tp.partition)] = max(high - (low if position < 0 else position), 0)
        return lags

    def close(self) -> None:
        self._log.closing = True
        self.raw.close()


class ConfluentAdmin(Admin):
    def __init__(self, config: dict[str, Any]) -> None:
        self._admin = AdminClient(config)

    def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        existing = self.describe_topics()
        new = [
            NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=spec.replication_factor,
                config=dict(spec.config),
            )
            for spec in topics
            if spec.name not in existing
        ]
        if not new:
            return
        for name, future in self._admin.create_topics(new, operation_timeout=30).items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TransportError(f"creating topic {name!r}: {exc}") from exc
        self.wait_for_topics([topic.topic for topic in new])

    def cluster_id(self) -> str:
        try:
            return str(self._admin.list_topics(timeout=10).cluster_id)
        except KafkaException as exc:
            raise _error(exc) from exc

    def describe_topics(self, names: Sequence[str] | None = None) -> dict[str, int]:
        try:
            metadata = self._admin.list_topics(timeout=10)
        except KafkaException as exc:
            raise _error(exc) from exc
        return {
            name: len(topic.partitions)
            for name, topic in metadata.topics.items()
            if topic.error is None and (names is None or name in names)
        }

    def close(self) -> None:
        """AdminClient holds no resources that need an explicit close."""


_PREFETCH = {
    # librdkafka fetches ahead until its local queue holds 64 MB, or 100,000 records in a
    # partition. Under a backlog that is memory a stage never needed: a clean stage reading
    # 200,000 records on Kafka peaked at 237 MB RSS with those defaults and 180 MB with these
    # bounds, at the same throughput (two rounds, 1 December), which still fetch a batch ahead.
    "queued.max.messages.kbytes": 1024,
    "queued.min.messages": 2500,
    # Once the local queue is full, fetching pauses this long (1 s by default, longer than a
    # stage takes to drain the queue: it then waited for data).
    "fetch.queue.backoff.ms": 20,
}


class ConfluentTransport(Transport):
    """confluent-kafka: the fast default."""

    name = "confluent"

    def _base(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "log.connection.close": False,
                **self.client_config, "logger": _ClientLog()}

    def producer(self, transactional_id: str | None = None) -> Producer:
        config = {
            # Stages send a batch and acknowledge it while handling the next: its records go
            # out within a millisecond, not after librdkafka's default 5.
            "linger.ms": 1,
            "enable.idempotence": True,
            "delivery.report.only.error": True,  # no Python callback per acknowledged record
            **self._base(),
        }
        config.pop("session.timeout.ms", None)
        if transactional_id:
            config["transactional.id"] = transactional_id
        return ConfluentProducer(config, self._admin_config())

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
        read_committed: bool = True,
    ) -> Consumer:
        config = {
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1500,
            **_PREFETCH,
            **self._base(),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
        return ConfluentConsumer(config, topics, listener)

    def reader(self, start: Mapping[TopicPartition, int | None], read_committed: bool = True
               ) -> Reader:
        config = {
            **self._base(),
            "group.id": "streamflow-reader",  # required by the client; never joined nor committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            **_PREFETCH,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
        config.pop("session.timeout.ms", None)
        return ConfluentReader(config, start)

    def admin(self) -> Admin:
        return ConfluentAdmin(self._admin_config())

    def _admin_config(self) -> dict[str, Any]:
        config = self._base()
        config.pop("session.timeout.ms", None)
        config.pop("heartbeat.interval.ms", None)
        return config
