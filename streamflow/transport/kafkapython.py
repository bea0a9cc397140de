"""The second transport, on kafka-python: pure Python, no native library to install.

About ten times slower than confluent-kafka here (55k/s consume with crc32c), so it suits
platforms without librdkafka wheels and small pipelines.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, errors
from kafka import TopicPartition as _TP
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.future import Future as KafkaFuture
from kafka.structs import OffsetAndMetadata

from streamflow.transport.base import (
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

_TIMEOUT_S = 60.0
# As librdkafka's committed() here: a bounded wait, also while offsets are pending in a transaction.
COMMITTED_TIMEOUT_MS = 10_000
# librdkafka-style names that do not map to kafka-python's by replacing dots with underscores.
_RENAMED = {
    "bootstrap.servers": "bootstrap_servers",
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
}
_INTEGER_SUFFIXES = ("_ms", "_bytes", "_records", "_count", "_size", "_retries", "retries")


def _error(exc: Exception) -> TransportError:
    if isinstance(exc, errors.AuthorizationError | errors.SaslAuthenticationFailedError):
        return AuthenticationError(str(exc))
    return TransportError(f"{type(exc).__name__}: {exc}")


def translate(settings: Mapping[str, str], client: type[Any]) -> dict[str, Any]:
    """librdkafka-style settings as keyword arguments that ``client`` accepts."""
    accepted = set(client.DEFAULT_CONFIG)
    translated: dict[str, Any] = {}
    for key, value in settings.items():
        name = _RENAMED.get(key, key.replace(".", "_"))
        if name not in accepted:
            continue
        if name.endswith(_INTEGER_SUFFIXES) and str(value).lstrip("-").isdigit():
            translated[name] = int(value)
        elif str(value).lower() in ("true", "false"):
            translated[name] = str(value).lower() == "true"
        else:
            translated[name] = value
    return translated


class KafkaPythonProducer(Producer):
    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._transactional = bool(config.get("transactional_id"))
        try:
            self._producer = KafkaProducer(**config)
            if self._transactional:
                self._producer.init_transactions()
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def produce(self, batches: Sequence[OutgoingBatch]) -> None:
        refused: list[tuple[int, int]] = []  # by the client, before sending
        rejected: list[tuple[int, int]] = []  # by the broker
        records: Iterable[tuple[int, int, Record]] = (
            (number, index, record) for number, batch in enumerate(batches)
            for index, record in enumerate(batch.records()))
        detail = ""
        while True:
            failed, unsent = self._deliver(batches, records, refused)
            if not failed:
                if unsent:  # a refusal by the broker stopped the sends, yet no record failed
                    raise TransportError("records too large for Kafka in an earlier call "
                                         "stopped this one")
                break
            by_broker = [(number, index) for number, index, future in failed
                         if not _aborted(future)]
            if not by_broker:  # only records aborted for a refusal in an earlier call
                raise TransportError(f"{len(failed)} records aborted, first: {failed[0][2].exception}")
            rejected += by_broker
            detail = detail or str(failed[0][2].exception)
            again = sorted([(number, index) for number, index, future in failed
                            if _aborted(future)] + unsent)
            if self._transactional or not again:
                break
            self._renew()
            records = ((number, index, batches[number].record(index)) for number, index in again)
        if rejected:
            raise RecordTooLargeError(sorted(refused + rejected), True, detail)
        if refused:
            raise RecordTooLargeError(refused, False, "over the client's max_request_size")

    def _deliver(self, batches: Sequence[OutgoingBatch], records: Iterable[tuple[int, int, Record]],
                 refused: list[tuple[int, int]]
                 ) -> tuple[list[tuple[int, int, Any]], list[tuple[int, int]]]:
        """Send the (batch, index, record) ``records`` of ``batches`` and wait for the broker;
        returns the records that failed for their size, with their futures, and those not sent.
        The indices of records the client refused for their size go to ``refused``; any other
        failure raises.

        The producer refuses every send once the broker refused a record for its size (the
        topic's ``max.message.bytes``): in a transaction, which can then only be aborted, and,
        being idempotent, without one too. It fails the records it still held (aborted, see
        :func:`_aborted`), and the sends stop there.
        """
        futures: list[tuple[int, int, Any]] = []
        unsent: list[tuple[int, int]] = []
        try:
            for number, index, (value, key, header, timestamp) in records:
                try:
                    futures.append((number, index, self._producer.send(
                        batches[number].topic, value=value, key=key, headers=header or None,
                        timestamp_ms=timestamp or None,
                    )))
                except errors.MessageSizeTooLargeError:
                    refused.append((number, index))
                except errors.KafkaError as exc:
                    if not any(isinstance(arg, errors.MessageSizeTooLargeError) for arg in exc.args):
                        raise
                    unsent = [(number, index), *((n, i) for n, i, _data in records)]
                    break
            self._producer.flush(timeout=_TIMEOUT_S)
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        pending = sum(not future.is_done for _number, _index, future in futures)
        if pending:
            raise TransportError(f"{pending} records not acknowledged within {_TIMEOUT_S}s")
        failed = [(number, index, future) for number, index, future in futures if future.failed()]
        if any(not isinstance(future.exception, errors.MessageSizeTooLargeError)
               for _n, _i, future in failed):
            raise TransportError(f"{len(failed)} records failed delivery, first: {failed[0][2].exception}")
        return failed, unsent

    def _renew(self) -> None:
        """Replace the client, which a refusal by the broker left unable to produce (only
        without a transaction: a transactional id's next producer fences this one)."""
        try:
            self._producer.close(timeout=_TIMEOUT_S)
            self._producer = KafkaProducer(**self._config)
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def _call(self, method: Any, *args: Any) -> None:
        try:
            method(*args)
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def begin_transaction(self) -> None:
        self._call(self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], consumer: Consumer
    ) -> None:
        assert isinstance(consumer, KafkaPythonConsumer)
        committed = {
            _TP(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()
        }
        self._call(self._producer.send_offsets_to_transaction, committed,
                   consumer.raw.group_metadata())

    def commit_transaction(self) -> None:
        self._call(self._producer.commit_transaction)

    def abort_transaction(self) -> None:
        self._call(self._producer.abort_transaction)

    def close(self) -> None:
        self._producer.close(timeout=_TIMEOUT_S)


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the rebalance callbacks on a worker thread while the consumer's IO loop awaits them:
    they may call the consumer's blocking methods (a synchronous commit before partitions move),
    which kafka-python forbids on its IO thread."""

    def __init__(self, listener: RebalanceListener | None) -> None:
        self.listener = listener
        self.consumer: KafkaConsumer | None = None

    async def _off_the_io_thread(self, callback: Callable[[list[TopicPartition]], None],
                                 partitions: Any) -> None:
        assert self.consumer is not None
        loop = self.consumer._client._net  # kafka-python's own event loop (not asyncio)
        done: KafkaFuture = KafkaFuture()

        def work() -> None:
            try:
                callback([(tp.topic, tp.partition) for tp in partitions])
                outcome: BaseException | None = None
            except BaseException as exc:
                outcome = exc

            async def settle() -> None:
                if outcome is None:
                    done.success(None)
                else:
                    done.failure(outcome)

            loop.call_soon_threadsafe(settle)

        threading.Thread(target=work, name="rebalance-listener", daemon=True).start()
        await done

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.listener:
            await self._off_the_io_thread(self.listener.on_revoke, revoked)

    async def on_partitions_lost(self, lost: Any) -> None:
        if self.listener:
            await self._off_the_io_thread(self.listener.on_lost, lost)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if self.listener:
            await self._off_the_io_thread(self.listener.on_assign, assigned)


def _columns(polled: Mapping[Any, list[Any]]) -> ConsumedBatch:
    """The records of a ``poll`` result, column-wise."""
    batch = ConsumedBatch()
    for records in polled.values():
        for record in records:
            batch.topics.append(record.topic)
            batch.partitions.append(record.partition)
            batch.offsets.append(record.offset)
            batch.keys.append(record.key)
            batch.values.append(record.value)
            batch.timestamps_ms.append(record.timestamp)
            batch.headers.append(list(record.headers) or None)
    return batch


class KafkaPythonReader(Reader):
    def __init__(self, config: dict[str, Any], start: Mapping[TopicPartition, int | None]) -> None:
        try:
            self.raw = KafkaConsumer(**config)
            self._partitions = [_TP(topic, partition) for topic, partition in start]
            self.raw.assign(self._partitions)
            for (topic, partition), offset in start.items():
                if offset is None:
                    self.raw.seek_to_beginning(_TP(topic, partition))
                else:
                    self.raw.seek(_TP(topic, partition), offset)
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def read_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        try:
            return _columns(self.raw.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records))
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def position(self) -> dict[TopicPartition, int]:
        try:
            return {(tp.topic, tp.partition): self.raw.position(tp) for tp in self._partitions}
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def end_offsets(self) -> dict[TopicPartition, int]:
        try:  # with the consumer's isolation level: the LSO when reading committed records
            ends = self.raw.end_offsets(self._partitions)
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        return {(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def offsets_for_times(self, timestamp_ms: int) -> dict[TopicPartition, int]:
        try:
            found = self.raw.offsets_for_times(dict.fromkeys(self._partitions, timestamp_ms))
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        ends = self.end_offsets() if any(value is None for value in found.values()) else {}
        return {(tp.topic, tp.partition): ends[(tp.topic, tp.partition)] if value is None
                else int(value.offset) for tp, value in found.items()}

    def close(self) -> None:
        self.raw.close(autocommit=False)





def _aborted(future: Any) -> bool:
    """Whether the record of ``future`` failed without the broker seeing it: kafka-python aborts
    the batches still in its accumulator with the error that made the transaction abortable, so a
    record merely queued behind one the broker refused for its size fails with the same
    MessageSizeTooLargeError. Its batch was completed with base offset -1 (aborted), where a
    batch the broker answered has None (failed) or its offset (acknowledged)."""
    produced = getattr(future, "_produce_future", None)
    value = getattr(produced, "value", None)
    return isinstance(value, tuple) and bool(value) and value[0] == -1


class _FinishedJoin:
    """A join task that finished between two polls, shown to kafka-python's join loop as still in
    flight, so that the loop takes its outcome (the assignment, or the error) instead of dropping
    it and sending a new JoinGroup. Its callbacks run at once: the task is done."""

    is_done = False

    def __init__(self, task: Any) -> None:
        self._task = task

    def add_callback(self, callback: Any) -> Any:
        return self._task.add_callback(callback)

    def add_errback(self, errback: Any) -> Any:
        return self._task.add_errback(errback)

    def __await__(self) -> Any:
        return self._task.__await__()


def _keep_interrupted_joins(consumer: KafkaConsumer) -> None:
    """Make kafka-python 3.0 finish a group join that a poll's timeout interrupted, as the Java
    consumer does with its pending join future.

    kafka-python keeps such a join running as a task, but two of its paths lose the outcome:
    - A rejoin that its coordinator starts because the subscribed topics' metadata changed (a
      topic created after the subscription, partitions added) is not marked as needed: the
      coordinator only sees the metadata differ from the last assignment. Once the leader has
      assigned, the two match, so no later poll looks at the task again. The member then keeps an
      empty assignment, with its heartbeat off, for good (seen under load on Apache Kafka 4.1.1,
      3 of 15 contract runs).
    - A task that finished while no poll awaited it is replaced by a new JoinGroup and its
      assignment dropped. On a broker whose joins take seconds (Tansu holds each for half the
      session timeout) a member polling in short slices then rejoins again and again (1 member in
      3 polling every 5 ms had no partition after 15 s).
    The coordinator here counts a pending task as a rejoin still needed, and hands a finished one
    to its join loop as still in flight, so that the loop takes its outcome."""
    coordinator = consumer._coordinator
    library_need_rejoin = coordinator.need_rejoin
    library_join_group = coordinator.join_group_async

    def need_rejoin() -> bool:
        return coordinator._join_task is not None or library_need_rejoin()

    async def join_group_async(timeout_ms: int | None = None) -> bool:
        task = coordinator._join_task
        if task is not None and task.is_done:
            coordinator._join_task = _FinishedJoin(task)
        return await library_join_group(timeout_ms=timeout_ms)

    coordinator.need_rejoin = need_rejoin
    coordinator.join_group_async = join_group_async


class KafkaPythonConsumer(Consumer):
    def __init__(
        self, config: dict[str, Any], topics: Sequence[str], listener: RebalanceListener | None
    ) -> None:
        try:
            self.raw = KafkaConsumer(**config)
            rebalance_listener = _Listener(listener)
            rebalance_listener.consumer = self.raw
            self.raw.subscribe(list(topics), listener=rebalance_listener)
            _keep_interrupted_joins(self.raw)
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def consume_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        try:
            polled = self.raw.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        return _columns(polled)

    def commit(self, offsets: Mapping[TopicPartition, int], asynchronous: bool = False) -> None:
        if not offsets:
            return
        committed = {
            _TP(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()
        }
        try:
            if asynchronous:
                self.raw.commit_async(committed)
            else:
                self.raw.commit(committed)
        except (errors.CommitFailedError, errors.RebalanceInProgressError,
                errors.IllegalGenerationError) as exc:
            raise RebalanceInProgressError(str(exc)) from exc
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        try:
            return {(t, p): self.raw.committed(_TP(t, p), timeout_ms=COMMITTED_TIMEOUT_MS)
                    for t, p in partitions}
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def assignment(self) -> list[TopicPartition]:
        return [(tp.topic, tp.partition) for tp in self.raw.assignment()]

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        try:
            ends = self.raw.end_offsets([_TP(t, p) for t, p in partitions])
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        return {(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def lag(self) -> dict[TopicPartition, int]:
        assigned = list(self.raw.assignment())
        if not assigned:
            return {}
        ends = self.end_offsets([(tp.topic, tp.partition) for tp in assigned])
        try:
            return {
                (tp.topic, tp.partition): max(ends[(tp.topic, tp.partition)] - self.raw.position(tp), 0)
                for tp in assigned
            }
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def close(self) -> None:
        self.raw.close(autocommit=False)


class KafkaPythonAdmin(Admin):
    def __init__(self, config: dict[str, Any]) -> None:
        try:
            self._admin = KafkaAdminClient(**config)
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def create_topics(self, topics: Sequence[TopicSpec]) -> None:
        existing = self.describe_topics()
        new = {
            spec.name: {"num_partitions": spec.partitions,
                        "replication_factor": spec.replication_factor,
                        "configs": dict(spec.config)}
            for spec in topics if spec.name not in existing
        }
        if not new:
            return
        try:
            self._admin.create_topics(new, timeout_ms=30_000)
        except errors.TopicAlreadyExistsError:
            pass
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        self.wait_for_topics(list(new))

    def cluster_id(self) -> str:
        try:
            return str(self._admin.describe_cluster()["cluster_id"])
        except errors.KafkaError as exc:
            raise _error(exc) from exc

    def describe_topics(self, names: Sequence[str] | None = None) -> dict[str, int]:
        try:
            described = self._admin.describe_topics(list(names) if names is not None else None)
        except errors.KafkaError as exc:
            raise _error(exc) from exc
        return {
            topic["name"]: len(topic["partitions"])
            for topic in described
            if not topic.get("error_code") and (names is None or topic["name"] in names)
        }

    def close(self) -> None:
        self._admin.close()


class KafkaPythonTransport(Transport):
    """kafka-python: no native dependency."""

    name = "kafka-python"

    def _settings(self, client: type[Any], **defaults: Any) -> dict[str, Any]:
        return {
            **defaults,
            **translate(self.client_config, client),
            "bootstrap_servers": self.bootstrap.split(","),
        }

    def producer(self, transactional_id: str | None = None) -> Producer:
        config = self._settings(KafkaProducer, linger_ms=5, enable_idempotence=True, acks="all")
        if transactional_id:
            config["transactional_id"] = transactional_id
        return KafkaPythonProducer(config)

    def consumer(
        self,
        group_id: str,
        topics: Sequence[str],
        listener: RebalanceListener | None = None,
        read_committed: bool = True,
    ) -> Consumer:
        config = self._settings(
            KafkaConsumer, auto_offset_reset="earliest", session_timeout_ms=6000,
            heartbeat_interval_ms=1500,
        )
        config.update(
            group_id=group_id,
            enable_auto_commit=False,
            isolation_level="read_committed" if read_committed else "read_uncommitted",
        )
        return KafkaPythonConsumer(config, topics, listener)

    def reader(self, start: Mapping[TopicPartition, int | None], read_committed: bool = True
               ) -> Reader:
        config = self._settings(KafkaConsumer)
        config.update(group_id=None, enable_auto_commit=False,
                      isolation_level="read_committed" if read_committed else "read_uncommitted")
        return KafkaPythonReader(config, start)

    def admin(self) -> Admin:
        return KafkaPythonAdmin(self._settings(KafkaAdminClient))

