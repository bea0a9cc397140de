"""Stage runners: each is a consumer group member running in its own thread.

A topic stage decodes a micro-batch, runs its steps, produces the output and the dead letters,
and commits the input offsets only after the broker acknowledged both (at-least-once). With
``runtime.guarantee: exactly_once`` it produces both and sends the input offsets in a Kafka
transaction instead, fenced through the consumer group's metadata (KIP-447), so that
``read_committed`` readers see each input's result exactly once. As Kafka Streams does, a
transaction spans the batches of ``runtime.transaction_interval_ms`` (100 ms by default), and is
committed early on revoke, at checkpoints and on stop. A sink stage hands batches to its sink
and commits after the sink's flush made them durable.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.config.loader import step_settings
from streamflow.config.models import BatchConfig, ProcessorConfig, StateCheckpointConfig
from streamflow.metrics import SinkMetrics, StageMetrics
from streamflow.plugins import (
    PARTITION_COLUMN,
    ROW_ID,
    TOPIC_COLUMN,
    ComponentContext,
    PartitionedState,
    Processor,
    Sink,
    SinkRecordError,
    StepResult,
)
from streamflow.processing.codec import decode_json, encode_json, user_fields
from streamflow.processing.parse import raw_table
from streamflow.processing.schema_memo import PerSchema
from streamflow.runtime import transactional_ids
from streamflow.runtime.changelog import ChangelogFormatError, PartitionSnapshot, read_latest
from streamflow.runtime.dead_letters import (
    PRODUCE_STEP,
    Failure,
    OutputBatch,
    OversizeRecordError,
    dead_letter_batch,
    truncated_refused,
)
from streamflow.runtime.row_lineage import LineageSink, origin_headers
from streamflow.runtime.stage import Stage
from streamflow.transport import (
    ConsumedBatch,
    Consumer,
    OutgoingBatch,
    Producer,
    RebalanceInProgressError,
    RebalanceListener,
    RecordTooLargeError,
    TopicPartition,
    Transport,
    TransportError,
    read_until,
)

log = logging.getLogger(__name__)

LAG_CHECK_INTERVAL_S = 1.0
TRANSACTION_INTERVAL_S = 0.1  # Kafka Streams' commit.interval.ms under exactly_once
# At least once, acknowledged offsets are committed at most this often, not once a batch: a group
# member committing 500 times a second was evicted within 11 s on the tests' Kafka (its
# heartbeats queued behind the commits), which small batches at a few thousand records a second
# reach. A crash replays what was acknowledged since the last commit.
COMMIT_INTERVAL_S = 0.1
# At least once, batches are sent without waiting for the acknowledgement of those before it
# (taken whenever the producer says all are acknowledged), unless those not yet known
# acknowledged hold this many batches' worth of input records (``max_records`` each: memory),
# or the oldest was sent this long ago (the commits' delay). Waiting for the last batch before
# sending each one stalled a stage a fifth of its time at 5,000 records a second; waiting once
# four small batches were out, as many as 38 times over 10 ms in 30 s.
MAX_UNACKNOWLEDGED_BATCHES = 4
MAX_UNACKNOWLEDGED_S = 0.5


class StepOutputError(RuntimeError):
    """A step broke the processor contract."""


@dataclass(frozen=True)
class StageIdentity:
    pipeline: str
    name: str
    input_topic: str
    dead_letter_topic: str

    @property
    def group_id(self) -> str:
        return f"{self.pipeline}.{self.name}"


class StageRunner(Stage, RebalanceListener):
    """Consume → handle → commit, until :meth:`stop`; tracks idleness and lag for --until-idle.

    The core of every stage kind. It owns, once, the lifecycle of the state a stage keeps per
    input partition (windows, step states, models, a sink's buffer), which each kind implements
    through four hooks:

    - :meth:`restore` takes newly assigned partitions from where their state is kept. It is
      called before the next batch or tick, not in the rebalance callback, where some clients
      forbid broker calls or swallow exceptions.
    - :meth:`checkpoint` persists the state of what was handled and commits the input offsets
      it covers, in that order: when :meth:`checkpoint_due` says so (without waiting), on revoke
      and on stop (waiting for it). Under exactly_once the open transaction is committed then.
    - :meth:`revoke` forgets partitions after their checkpoint, or without one when they were
      lost (the member was evicted, so its work may be ahead of what was committed).

    The kinds differ only in :meth:`handle` and in these hooks.
    """

    origin_headers = False  # row-level lineage: output records get an sf-origin header

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
    ) -> None:
        super().__init__(identity.name, f"stage-{identity.name}")
        self.identity = identity
        self.transport = transport
        self.batch_config = batch
        self.metrics = metrics
        self.idle_since = time.monotonic()
        self.lag: int | None = None
        self.lag_checked_at = 0.0  # monotonic time of the measurement behind ``lag``
        self.lag_error: str | None = None  # why the last lag measurement failed
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.transactional = False  # exactly_once: batches go in transactions (see deliver)
        self.transaction_interval_s = TRANSACTION_INTERVAL_S
        self._transaction_since: float | None = None  # monotonic start of the open transaction
        self._transaction_offsets: dict[TopicPartition, int] = {}  # sent at its commit
        self._transaction_records: list[OutgoingBatch] = []  # sent in it: resent if it aborts
        self._last_offsets: dict[TopicPartition, int] = {}  # acknowledged: see deliver
        self._uncommitted: dict[TopicPartition, int] = {}  # acknowledged, to commit when due
        self._committed_at = 0.0  # monotonic time of the last asynchronous commit
        self._unacknowledged: list[Unacknowledged] = []  # sent by deliver, oldest first
        self._unacknowledged_records = 0  # input records of those
        self._callback_error: BaseException | None = None  # raised by a rebalance callback
        self._to_restore: list[TopicPartition] = []  # assigned, to restore before the next batch
        self._transactional_id = ""
        self._transactional_slot: int | None = None
        self.assigned = False  # joined the group at least once (possibly with no partitions)

    @property
    def last_activity(self) -> float:
        return self.idle_since

    def is_idle(self, since: float) -> bool:
        """Nothing left to read on the assigned partitions, as measured after ``since`` (the
        pipeline's last activity)."""
        return (
            self.lag == 0
            and self.lag_checked_at > since
            and self.thread.is_alive()
        )

    def starting(self) -> str | None:
        if not self.assigned:
            return "joining its consumer group"
        if self.lag_error:
            return f"brokers unreachable for its partitions: {self.lag_error}"
        return None

    def _run(self) -> None:
        try:
            self.producer = self._new_producer()
            self.consumer = self.transport.consumer(
                self.identity.group_id, self.topics(), listener=self
            )
            self.open()
            while not self._stop.is_set():
                batch = self.consumer.consume_batch(
                    self.batch_config.max_records, self.batch_config.max_wait_ms / 1000
                )
                if self._callback_error is not None:
                    raise self._callback_error
                self._restore_assigned()
                if len(batch):
                    self.idle_since = time.monotonic()
                    self.lag = None
                    started = time.perf_counter()
                    self.handle(batch)
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
                    self.idle_since = time.monotonic()  # its output is out: idle from now
                else:
                    self.acknowledge()  # nothing came: no reason to wait for the next batch
                self._check_lag()
                self.commit_acknowledged()
                self.tick()
                if self.checkpoint_due():
                    self.acknowledge()
                    self.checkpoint(wait=False)
                self.commit_transaction(due_only=True)
            self._checkpoint_all()
        except BaseException as exc:
            log.debug("stage %s failed", self.name, exc_info=True)  # the supervisor says why
            self.error = exc
            if self._transaction_since is not None:
                self._abort()  # its batches replay from the committed offsets
        finally:
            self._close()

    def _check_lag(self) -> None:
        now = time.monotonic()
        if self.consumer is None or now - self.lag_checked_at < LAG_CHECK_INTERVAL_S:
            return
        self.lag_checked_at = now
        try:
            lags = self.consumer.lag()
        except TransportError as exc:  # lag is for telemetry and --until-idle: never fatal
            if self.lag_error is None:
                log.warning("stage %s: the brokers do not answer about its partitions: %s",
                            self.name, exc)
            self.lag, self.lag_error = None, str(exc)
            self.metrics.broker_reachable.set(0)
            return
        if self.lag_error is not None:
            log.info("stage %s: the brokers answer again", self.name)
            self.lag_error = None
        self.metrics.broker_reachable.set(1)
        self.lag = sum(lags.values()) if lags else None  # None: no partitions (yet)
        for (topic, partition), lag in lags.items():
            self.metrics.lag(topic, partition).set(lag)

    def _close(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    client.close()
                except Exception:
                    log.exception("stage %s: closing a client failed", self.name)
        self.consumer = self.producer = None  # let the native clients go now, not at exit
        if self._transactional_slot is not None:
            transactional_ids.release(self.identity.group_id, self._transactional_slot)
            self._transactional_slot = None

    def commit(self, offsets: dict[TopicPartition, int], asynchronous: bool) -> None:
        assert self.consumer is not None
        try:
            self.consumer.commit(offsets, asynchronous=asynchronous)
        except RebalanceInProgressError:
            log.warning("stage %s: commit refused during a rebalance or after this member left "
                        "the group; records will be replayed", self.name)
            return
        if not asynchronous:
            self.metrics.checkpoint_time.set(time.time())

    def deliver(self, outgoing: Sequence[OutgoingBatch], failures: list[Failure],
                batch: ConsumedBatch, offsets: dict[TopicPartition, int] | None,
                delivered: Callable[[int], None] = lambda _oversize: None) -> None:
        """Produce ``outgoing`` and the dead letters of ``failures`` (records of ``batch``), then
        the input ``offsets``; ``delivered`` is then told how many output records went to the
        dead letters instead (see :meth:`publish`), which ``failures`` now holds too.

        Under exactly_once the records go in the open transaction (one is begun if none is),
        with the offsets (when given) sent at its commit, once ``transaction_interval_s`` has
        passed since it began (see :meth:`commit_transaction`); anything failing aborts it.
        Otherwise they are sent without waiting for the broker, which acknowledges them while
        the next batches are handled: :meth:`acknowledge` takes them as soon as the producer
        says all are acknowledged, and waits for them only past the bounds of
        :meth:`_acknowledgement_due`. The offsets are then committed asynchronously, at most every
        :data:`COMMIT_INTERVAL_S` (see :meth:`commit_acknowledged`), and confirmed at
        checkpoints (on revoke and stop). Stages that commit at checkpoints of their own state
        pass no offsets under at_least_once.
        """
        if not self.transactional:
            assert self.producer is not None
            if self._acknowledgement_due() or self.producer.acknowledged():
                self.acknowledge()
            letters = self.dead_letters(failures, batch)
            self.producer.send([*outgoing, *letters])
            self._unacknowledged.append(Unacknowledged(outgoing, letters, failures, batch, offsets,
                                                       delivered, time.monotonic()))
            self._unacknowledged_records += len(batch)
            return
        assert self.producer is not None
        if self._transaction_since is None:
            self.producer.begin_transaction()
            self._transaction_since = time.monotonic()
        try:
            oversize = self.publish(outgoing, failures, batch)
        except BaseException:
            self._abort()
            raise
        self._transaction_offsets.update(offsets or {})
        self.commit_transaction(due_only=True)
        delivered(oversize)

    def acknowledge(self) -> None:
        """Wait for the broker to acknowledge the batches :meth:`deliver` sent, if any; then, in
        the order they were sent, leave each one's input offsets to :meth:`commit_acknowledged`
        and tell its ``delivered``. Output records Kafka refused for their size go to the dead
        letters (see :meth:`publish`)."""
        sent, self._unacknowledged, self._unacknowledged_records = self._unacknowledged, [], 0
        if not sent:
            return
        assert self.producer is not None
        try:
            self.producer.flush()
        except RecordTooLargeError as refused:
            self._renew_producer(refused)
            oversizes = self._dead_letter_refused_of_each(refused, sent)
        else:
            oversizes = [0] * len(sent)
            for pending in sent:
                self.metrics.latest_dead_letters.add(pending.letters)
        for pending, oversize in zip(sent, oversizes, strict=True):
            if pending.offsets:
                self._last_offsets.update(pending.offsets)
                self._uncommitted.update(pending.offsets)
            pending.delivered(oversize)

    def _acknowledgement_due(self) -> bool:
        """Whether the batches sent and not known acknowledged must be waited for before the
        next goes: they hold :data:`MAX_UNACKNOWLEDGED_BATCHES` batches' worth of input records,
        or the oldest was sent :data:`MAX_UNACKNOWLEDGED_S` ago."""
        return bool(self._unacknowledged) and (
            self._unacknowledged_records
            >= MAX_UNACKNOWLEDGED_BATCHES * self.batch_config.max_records
            or time.monotonic() - self._unacknowledged[0].sent_at >= MAX_UNACKNOWLEDGED_S)

    def _dead_letter_refused_of_each(self, refused: RecordTooLargeError,
                                     sent: list[Unacknowledged]) -> list[int]:
        """:meth:`_dead_letter_refused` for each of the batches ``sent`` since the last flush
        (``refused`` numbers their outgoing batches and letters as sent, one after another)."""
        oversizes, first = [], 0
        for pending in sent:
            count = len(pending.outgoing) + len(pending.letters)
            own = RecordTooLargeError(
                [(number - first, index) for number, index in refused.rejected
                 if first <= number < first + count], refused.by_broker, refused.detail)
            first += count
            if own.rejected:
                oversizes.append(self._dead_letter_refused(
                    own, pending.outgoing, pending.letters, pending.failures, pending.batch))
            else:
                self.metrics.latest_dead_letters.add(pending.letters)
                oversizes.append(0)
        return oversizes

    def commit_acknowledged(self) -> None:
        """Commit the offsets acknowledged since the last commit, asynchronously, once
        :data:`COMMIT_INTERVAL_S` has passed since it (after every poll)."""
        if not self._uncommitted or time.monotonic() - self._committed_at < COMMIT_INTERVAL_S:
            return
        offsets, self._uncommitted = self._uncommitted, {}
        self._committed_at = time.monotonic()
        self.commit(offsets, asynchronous=True)

    def commit_transaction(self, due_only: bool = False) -> None:
        """Send the open transaction's input offsets and commit it (``due_only``: only once
        ``transaction_interval_s`` has passed since it began); aborted if that fails."""
        since = self._transaction_since
        if since is None or (due_only and time.monotonic() - since < self.transaction_interval_s):
            return
        assert self.producer is not None and self.consumer is not None
        try:
            if self._transaction_offsets:
                self.producer.send_offsets_to_transaction(self._transaction_offsets,
                                                          self.consumer)
            self.producer.commit_transaction()
        except BaseException:
            self._abort()
            raise
        if self._transaction_offsets:
            self.metrics.checkpoint_time.set(time.time())
        self._forget_transaction()

    def _forget_transaction(self) -> None:
        self._transaction_since = None
        self._transaction_offsets = {}
        self._transaction_records = []

    def produce_dead_letters(self, failures: list[Failure], batch: ConsumedBatch) -> None:
        """Publish failed records to the dead-letter topic and count them."""
        if not failures:
            return
        self._produce_letters(self.dead_letters(failures, batch))
        self.count_dead_letters(failures)

    def publish(self, outgoing: Sequence[OutgoingBatch], failures: list[Failure],
                batch: ConsumedBatch) -> int:
        """Produce ``outgoing`` and the dead letters of ``failures`` (records of ``batch``), with
        one wait for the broker's acknowledgements.

        An output record of an :class:`OutputBatch` that Kafka refuses for its size is replaced
        by a dead letter of the record it came from, whose failure joins ``failures``; returns
        how many were. A dead letter refused for its size goes truncated (see dead_letters).
        """
        assert self.producer is not None
        letters = self.dead_letters(failures, batch)
        try:
            self._produce([*outgoing, *letters])
        except RecordTooLargeError as exc:
            refused = exc
        else:
            self.metrics.latest_dead_letters.add(letters)
            return 0
        if self.transactional and refused.by_broker:
            # The refusal aborts the transaction and every record sent in it: send them again.
            sent, offsets = self._transaction_records, self._transaction_offsets
            self._abort()
            self._renew_producer(refused)
            self.producer.begin_transaction()
            self._transaction_since, self._transaction_offsets = time.monotonic(), offsets
            self._produce([*sent, *without([*outgoing, *letters], refused.rejected)])
        else:
            self._renew_producer(refused)
        return self._dead_letter_refused(refused, outgoing, letters, failures, batch)

    def _dead_letter_refused(self, refused: RecordTooLargeError, outgoing: Sequence[OutgoingBatch],
                             letters: list[OutgoingBatch], failures: list[Failure],
                             batch: ConsumedBatch) -> int:
        """Dead-letter the records of ``outgoing`` (and truncate those of ``letters``) that
        Kafka ``refused`` for their size; how many output records were."""
        oversize: list[Failure] = []
        refused_letters: list[tuple[int, int]] = []
        for number, index in refused.rejected:
            if number >= len(outgoing):
                refused_letters.append((number - len(outgoing), index))
                continue
            output = outgoing[number]
            if not isinstance(output, OutputBatch):
                raise refused
            oversize.append(Failure(output.rows[index], PRODUCE_STEP, OversizeRecordError(
                f"output record of {len(output.values[index])} bytes for topic {output.topic!r} "
                f"refused: {refused}"
            )))
        self._produce_letters([*self.dead_letters(oversize, batch),
                               *truncated_refused(letters, refused_letters)])
        self.metrics.latest_dead_letters.add(without(letters, refused_letters))
        failures += oversize
        return len(oversize)

    def _produce_letters(self, letters: list[OutgoingBatch]) -> None:
        """Produce dead letters; those Kafka refuses for their size go again, truncated."""
        try:
            self._produce(letters)
        except RecordTooLargeError as exc:
            self._renew_producer(exc)
            resent = truncated_refused(letters, exc.rejected)
            self._produce(resent)
            letters = [*without(letters, exc.rejected), *resent]
        self.metrics.latest_dead_letters.add(letters)

    def _produce(self, batches: list[OutgoingBatch]) -> None:
        """Produce ``batches`` (after the last batch sent, acknowledged); in a transaction,
        remember them to send again should it abort."""
        self.acknowledge()
        assert self.producer is not None
        self.producer.produce(batches)
        if self._transaction_since is not None:
            self._transaction_records += batches

    def _abort(self) -> None:
        """Abort the open transaction, if the producer still can: the stage then fails, and its
        restart reads its batches again from the committed offsets."""
        assert self.producer is not None
        self._forget_transaction()
        try:
            self.producer.abort_transaction()
        except TransportError:
            log.warning("stage %s: aborting the transaction failed; the broker aborts it when "
                        "it times out or the next producer of this group fences it", self.name)

    def decode(self, batch: ConsumedBatch) -> tuple[pa.Table, list[Failure]]:
        """The table the first step gets, and the records that failed to decode."""
        return decode_input(batch.values, self.steps)

    def _new_producer(self) -> Producer:
        """A producer; a transactional one for an exactly-once stage, with an id that its
        successor after a restart in this process reuses (see transactional_ids)."""
        if not self.transactional:
            return self.transport.producer()
        if self._transactional_slot is None:
            self._transactional_id, self._transactional_slot = transactional_ids.take(
                self.identity.group_id)
        return self.transport.producer(transactional_id=self._transactional_id)

    def _renew_producer(self, refused: RecordTooLargeError) -> None:
        """Replace the producer after the broker refused records (some clients are left unable
        to produce); records the client refused before sending leave it intact."""
        if refused.by_broker:
            assert self.producer is not None
            try:
                self.producer.close()
            except Exception:
                log.exception("stage %s: closing the producer failed", self.name)
            self.producer = self._new_producer()

    def dead_letters(self, failures: list[Failure], batch: ConsumedBatch) -> list[OutgoingBatch]:
        """The records of ``failures`` addressed to the dead-letter topic (no batch if none)."""
        if not failures:
            return []
        identity = self.identity
        return [dead_letter_batch(
            identity.dead_letter_topic, identity.pipeline, identity.name, failures, batch
        )]

    def count_dead_letters(self, failures: list[Failure]) -> None:
        """Count published dead letters by the step that failed them."""
        for step, count in Counter(failure.step for failure in failures).items():
            self.metrics.error(step).inc(count)
        self.metrics.reasons.add((failure.step, failure.error) for failure in failures)

    def topics(self) -> list[str]:
        """The topics this stage consumes."""
        return [self.identity.input_topic]

    def open(self) -> None:
        """Called once the clients exist, before the first batch."""

    @abstractmethod
    def handle(self, batch: ConsumedBatch) -> None:
        """Process one consumed micro-batch."""

    def tick(self) -> None:
        """Called after every poll, with or without records."""

    # --- the state kept per partition -------------------------------------------------------

    def restore(self, partitions: list[TopicPartition]) -> None:
        """Take the state of newly assigned ``partitions`` from where it is kept."""

    def checkpoint_due(self) -> bool:
        """Whether to checkpoint now, at the end of this poll."""
        return False

    def checkpoint(self, wait: bool) -> None:
        """Persist the state of what was handled, then commit the input offsets it covers;
        with ``wait``, before returning. Stateless: confirm the asynchronous commits of
        :meth:`deliver` (under exactly_once the open transaction carries the offsets)."""
        if wait and self._last_offsets:
            self._uncommitted = {}
            self.commit(self._last_offsets, asynchronous=False)

    def revoke(self, partitions: list[TopicPartition], lost: bool) -> None:
        """Forget the state of ``partitions``: checkpointed already, unless ``lost``."""

    def _restore_assigned(self) -> None:
        if self._to_restore:
            partitions, self._to_restore = sorted(set(self._to_restore)), []
            self.restore(partitions)

    def _checkpoint_all(self) -> None:
        """Checkpoint and commit everything handled, waiting for it (on revoke and stop)."""
        self.acknowledge()
        self.checkpoint(wait=True)
        self.commit_transaction()

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        log.info("stage %s assigned %s", self.name, partitions)
        self.assigned = True
        self._to_restore.extend(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Checkpoint before the partitions go: their next owner starts from that commit, and a
        later commit of this member must not cover them (it would rewind the next owner's).
        After a failure nothing is checkpointed: the state may be ahead of the output, and
        whatever was not committed replays."""
        log.info("stage %s revoked %s", self.name, partitions)
        self._to_restore = [p for p in self._to_restore if p not in partitions]
        if self.error is None:
            try:
                self._checkpoint_all()
            except BaseException as exc:
                if self.transactional or not isinstance(exc, TransportError):
                    self._callback_error = exc  # raised at the next poll (some clients swallow
                    # what a callback raises): the stage restarts and replays what was aborted
                else:  # e.g. the group coordinator is down: the partitions go anyway
                    log.warning("stage %s: checkpoint on revoke failed (%s); their next owner "
                                "replays from the last commit", self.name, exc)
        self._forget_offsets(partitions)
        self.revoke(partitions, lost=False)

    def _forget_offsets(self, partitions: list[TopicPartition]) -> None:
        """Commit no more offsets of ``partitions``: they have gone to another member."""
        for partition in partitions:
            self._last_offsets.pop(partition, None)
            self._uncommitted.pop(partition, None)
            for sent in self._unacknowledged:
                if sent.offsets:
                    sent.offsets.pop(partition, None)

    def committed_input(self, partitions: list[int]) -> dict[int, int]:
        """The group's committed offsets of ``partitions`` of the input topic, as far as they
        are known now: none while a transaction that sent them is being completed (or, after
        its producer crashed, until it times out), when the first record of each must tell."""
        assert self.consumer is not None
        topic = self.identity.input_topic
        try:
            committed = self.consumer.committed([(topic, p) for p in partitions])
        except TransportError as exc:
            log.info("stage %s: committed offsets not known yet (%s); partitions %s are brought "
                     "up to date as of their first record", self.name, exc, partitions)
            return {}
        return {p: offset for (_topic, p), offset in committed.items() if offset is not None}

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """This member was evicted: drop the lost partitions' uncommitted work (offsets, the
        open transaction, state), making nothing durable; their next owner replays from the
        last commit."""
        log.warning("stage %s lost %s (evicted from its group): their uncommitted work is "
                    "dropped, to be replayed by their next owner", self.name, partitions)
        self._to_restore = [p for p in self._to_restore if p not in partitions]
        self._forget_offsets(partitions)
        if self._transaction_since is not None:
            self._abort()  # fenced by the group's new generation anyway
        self.revoke(partitions, lost=True)


class UnflushedRowsLostError(RuntimeError):
    """A sink stage lost some partitions while its sink held unflushed rows of others."""


class StepFailedError(RuntimeError):
    """A step with ``on_error: fail`` failed: the stage stops without committing the batch."""


@dataclass(frozen=True)
class StepRunner:
    """A processor step with its ``on_error`` policy: ``dlq``, ``drop`` or ``fail``."""

    step: Processor[Any]
    on_error: str = "dlq"
    # Of the step's output: whether it holds the partition column and the row ids.
    carries: PerSchema[tuple[bool, bool]] = field(
        default_factory=lambda: PerSchema(lambda schema: (PARTITION_COLUMN in schema.names,
                                                          ROW_ID in schema.names)),
        compare=False, repr=False)


def run_steps(steps: Sequence[StepRunner], table: pa.Table, failures: list[Failure],
              partitions: np.ndarray | None = None) -> pa.Table:
    """Run ``steps`` in order; rows to dead-letter (as ``_sf_row`` ids) go to ``failures``.

    A step that keeps state per partition gets each row's input partition (``partitions``,
    indexed by ``_sf_row``) in the column ``_sf_partition``. Rows failed by a ``drop`` step
    simply vanish (they count as filtered); a failure in a ``fail`` step raises
    :class:`StepFailedError`.
    """
    for runner in steps:
        step = runner.step
        given = table
        if partitions is not None and isinstance(step, PartitionedState):
            given = table.append_column(PARTITION_COLUMN,
                                        pa.array(partitions[table[ROW_ID].to_numpy()]))
        try:
            result = step.process(given)
            with_partition, with_row_ids = runner.carries(result.table.schema)
            if with_partition:
                result.table = result.table.drop_columns([PARTITION_COLUMN])
            if not with_row_ids:
                raise StepOutputError(
                    f"step {step.name!r} dropped the {ROW_ID} column; keep it (SELECT * does)"
                )
        except Exception as exc:  # the whole batch failed in this step
            result = StepResult(table.slice(0, 0), [(i, exc) for i in range(table.num_rows)])
        if result.failures:
            if runner.on_error == "fail":
                _row, error = result.failures[0]
                raise StepFailedError(
                    f"step {step.name!r} failed ({type(error).__name__}: {error}) and has "
                    "on_error: fail"
                ) from error
            if runner.on_error == "dlq":
                row_ids = table[ROW_ID].to_numpy()  # one conversion, not a scalar per failure
                failures.extend(
                    Failure(int(row_ids[index]), step.name, error)
                    for index, error in result.failures
                )
        table = result.table
    return table


@dataclass
class Unacknowledged:
    """A batch :meth:`StageRunner.deliver` sent, awaiting the broker's acknowledgement."""

    outgoing: Sequence[OutgoingBatch]
    letters: list[OutgoingBatch]
    failures: list[Failure]
    batch: ConsumedBatch
    offsets: dict[TopicPartition, int] | None
    delivered: Callable[[int], None]
    sent_at: float  # monotonic


@dataclass
class Handled:
    """What handling a batch gave: the records to deliver, the records to dead-letter, and how
    many of the records to deliver are the stage's output."""

    outgoing: list[OutgoingBatch]
    failures: list[Failure]
    produced: int


class TopicStage(StageRunner):
    """A topic → topic stage: decode, steps, produce output and dead letters, commit.

    A stage whose steps (or windows) keep state per input partition (each a
    :class:`~streamflow.plugins.PartitionedState`) checkpoints it to its compacted changelog
    topic (see changelog.py). Every ``checkpoint.every_records`` records or ``every_seconds``, it
    snapshots every partition handled since the last snapshot, with the next input offset the
    snapshot covers.

    - Under at_least_once, offsets are committed at snapshots only, after the snapshot was
      acknowledged, so a commit never runs ahead of a snapshot. Output records produced after
      the restored snapshot are produced again, with the same values, when the stage replays.
    - Under exactly_once, every batch's output, dead letters and input offsets go in the open
      transaction, and a due snapshot joins it; a snapshot is then never ahead of the committed
      offsets, and is usually behind them.

    When a partition is assigned, the newest snapshot known for it is restored. Input records
    below its offset are skipped; records between its offset and the group's committed one are
    replayed into the states from the input topic with their output discarded, since it was
    delivered when they were first handled. No record is counted twice or lost.
    """

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
        output_topic: str,
        steps: Sequence[StepRunner],
        exactly_once: bool = False,
        changelog_topic: str | None = None,
        checkpoint: StateCheckpointConfig | None = None,
        states: Mapping[str, PartitionedState] | None = None,
        transaction_interval_s: float = TRANSACTION_INTERVAL_S,
    ) -> None:
        super().__init__(identity, transport, batch, metrics)
        self.output_topic = output_topic
        self.steps = list(steps)
        self.transactional = exactly_once
        self.transaction_interval_s = transaction_interval_s
        self.states: dict[str, PartitionedState] = {**(states or {}), **{
            f"{index}:{runner.step.name}": runner.step for index, runner in enumerate(self.steps)
            if isinstance(runner.step, PartitionedState)}}
        if self.states and changelog_topic is None:
            raise ValueError(f"stage {identity.name!r} keeps state and needs a changelog topic")
        self.changelog_topic = changelog_topic or ""
        self.checkpoint_config = checkpoint or StateCheckpointConfig()
        self.next_offsets: dict[int, int] = {}  # owned partition → first offset its states lack
        self._known: dict[int, PartitionSnapshot] = {}  # snapshots of partitions not owned now
        self._unconfirmed: set[int] = set()  # restored, before their first record
        self._dirty: set[int] = set()
        self._records_since_snapshot = 0
        self._last_snapshot = time.monotonic()

    def transform(self, batch: ConsumedBatch) -> tuple[pa.Table, list[Failure]]:
        """Decode ``batch`` and run the steps: the surviving rows (with ``_sf_row``) and the
        records to dead-letter."""
        table, failures = self.decode(batch)
        partitions = np.asarray(batch.partitions) if self.states else None
        return run_steps(self.steps, table, failures, partitions), failures

    def process(self, batch: ConsumedBatch) -> Handled:
        """Run ``batch`` through the stage: what to deliver. The states then cover it."""
        table, failures = self.transform(batch)
        outgoing = output_batches(table, self.output_topic, batch.keys, batch.timestamps_ms,
                                  batch if self.origin_headers else None)
        return Handled(list(outgoing), failures, table.num_rows)

    def count(self, handled: Handled) -> None:
        """Count what a delivered batch gave, beyond records in, out and dead-lettered."""

    def handle(self, consumed: ConsumedBatch) -> None:
        batch = self._prepare(consumed) if self.states else consumed
        if not len(batch):
            return
        handled = self._process(batch)
        outgoing = handled.outgoing
        snapshot_due = (bool(self.states) and self._records_since_snapshot
                        >= self.checkpoint_config.every_records)
        if snapshot_due and self.transactional:
            outgoing = [*outgoing, *self._changelog()]
        # Stateful under at_least_once: offsets are committed with the snapshots.
        offsets = batch.next_offsets() if self.transactional or not self.states else None

        def delivered(oversize: int) -> None:
            self.count_dead_letters(handled.failures)
            self.metrics.count(len(batch), handled.produced - oversize, len(handled.failures))
            self.count(handled)

        self.deliver(outgoing, handled.failures, batch, offsets, delivered)
        if snapshot_due and not self.transactional:
            self.snapshot()

    def _process(self, batch: ConsumedBatch) -> Handled:
        handled = self.process(batch)
        if self.states:
            for (_topic, partition), next_offset in batch.next_offsets().items():
                self.next_offsets[partition] = next_offset
                self._dirty.add(partition)
            self._records_since_snapshot += len(batch)
        return handled

    # --- per-partition state ------------------------------------------------------------------

    def open(self) -> None:
        super().open()
        if self.states:  # read while the group join goes on (in librdkafka's background thread)
            self._known = self._read_snapshots()

    def revoke(self, partitions: list[TopicPartition], lost: bool) -> None:
        """Keep the revoked partitions' states in memory, should they come back; drop lost ones
        unsnapshotted: they may be ahead of what was committed, and their next owner restores
        from the changelog."""
        gone = {partition for _topic, partition in partitions}
        self._unconfirmed -= gone
        if not lost:
            for partition in gone & set(self.next_offsets):
                self._known[partition] = self._take(partition)
            return
        self._dirty -= gone
        for partition in gone & set(self.next_offsets):
            del self.next_offsets[partition]
            for state in self.states.values():
                state.revoke(partition)
        for partition in gone:
            self._known.pop(partition, None)

    def _take(self, partition: int) -> PartitionSnapshot:
        """Snapshot ``partition`` in memory and revoke it from every state."""
        snapshot = PartitionSnapshot(self.next_offsets.pop(partition),
                                     {name: state.snapshot(partition)
                                      for name, state in self.states.items()})
        for state in self.states.values():
            state.revoke(partition)
        return snapshot

    def _adopt(self, partition: int, snapshot: PartitionSnapshot) -> None:
        for name, state in self.states.items():
            try:
                state.restore(partition, snapshot.states.get(name))
            except ValueError as exc:
                log.warning("stage %s: state %s of partition %d not restored (%s): it starts "
                            "afresh", self.name, name, partition, exc)
                state.restore(partition, None)
        self.next_offsets[partition] = snapshot.next_offset
        log.info("stage %s took partition %d at offset %d", self.name, partition,
                 snapshot.next_offset)

    def _restore(self, resumed_at: dict[int, int]) -> None:
        """Load the state of partitions the consumer resumes at ``resumed_at``: the group's
        committed offsets, then the offset of each one's first record consumed since (past
        transaction markers).

        A known snapshot (read from the changelog at start, or kept from before a rebalance) is
        used when it covers at least that offset: records from there on up to its offset are
        skipped. Otherwise the changelog is read again. A state still behind the offset (under
        exactly_once, whenever batches were committed after the last snapshot) is brought up
        to it by replaying the input records in between, with their output discarded: it was
        delivered when they were first handled.

        The first record tells where the consumer resumed, which the group's committed offset
        does not always: a fetch of it answers nothing while a transaction that sent offsets is
        being completed, and longer after its producer crashed (until the transaction times out).
        """
        snapshots = {p: self._known.pop(p, None) or PartitionSnapshot(0, {})
                     for p in sorted(resumed_at)}
        if any(snapshot.next_offset < resumed_at[p] for p, snapshot in snapshots.items()):
            self._known.update(self._read_snapshots())
            for partition, snapshot in snapshots.items():
                newer = self._known.pop(partition, snapshot)
                if snapshot.next_offset < resumed_at[partition]:
                    snapshots[partition] = max(snapshot, newer, key=lambda s: s.next_offset)
        for partition, snapshot in snapshots.items():
            self._adopt(partition, snapshot)
        behind = {p: s.next_offset for p, s in snapshots.items() if s.next_offset < resumed_at[p]}
        if behind:
            self._replay(behind, resumed_at)

    def _replay(self, start: dict[int, int], resumed_at: dict[int, int]) -> None:
        """Run the input records from each partition's ``start`` up to where the consumer
        resumed through the stage, discarding their output."""
        topic = self.identity.input_topic
        replayed = 0
        for batch in read_until(self.transport, {(topic, p): offset for p, offset in start.items()},
                                {(topic, p): resumed_at[p] for p in start}):
            self._process(batch)
            replayed += len(batch)
        log.info("stage %s replayed %d records of partitions %s up to where it resumed them",
                 self.name, replayed, sorted(start))

    def _read_snapshots(self) -> dict[int, PartitionSnapshot]:
        """The latest snapshot of every partition in the changelog."""
        snapshots = {}
        for partition, data in read_latest(self.transport, self.changelog_topic).items():
            try:
                snapshots[partition] = PartitionSnapshot.from_bytes(data)
            except ChangelogFormatError as exc:
                log.warning("stage %s: snapshot of partition %d not restored (%s): its state "
                            "starts afresh", self.name, partition, exc)
        return snapshots

    def restore(self, partitions: list[TopicPartition]) -> None:
        """Restore newly assigned partitions at the group's committed offsets, as far as they
        are known now: the first record of each then confirms where the consumer resumed."""
        if not self.states:
            return
        numbers = [partition for _topic, partition in partitions]
        committed = self.committed_input(numbers)
        self._restore({p: committed.get(p) or 0 for p in numbers})
        self._unconfirmed.update(numbers)

    def _prepare(self, batch: ConsumedBatch) -> ConsumedBatch:
        """Bring each restored state up to where its first record shows the consumer resumed;
        return ``batch`` without the records the states already hold, nor any of a partition
        revoked meanwhile (its new owner handles them)."""
        if self._unconfirmed:
            first: dict[int, int] = {}
            for partition, offset in zip(batch.partitions, batch.offsets, strict=True):
                first.setdefault(partition, offset)  # offsets grow within a partition
            confirmed = {p: first[p] for p in self._unconfirmed if p in first}
            self._unconfirmed.difference_update(confirmed)
            behind = {p: offset for p, offset in confirmed.items()
                      if p in self.next_offsets and self.next_offsets[p] < offset}
            for partition in behind:
                self._known[partition] = self._take(partition)
            if behind:
                self._restore(behind)
        owned = self.next_offsets
        fresh = [row for row, (partition, offset) in enumerate(zip(batch.partitions, batch.offsets,
                                                                     strict=True))
                 if partition in owned and offset >= owned[partition]]
        return batch if len(fresh) == len(batch) else batch.select(fresh)

    def checkpoint_due(self) -> bool:
        return bool(self.states) and (time.monotonic() - self._last_snapshot
                                      >= self.checkpoint_config.every_seconds)

    def checkpoint(self, wait: bool) -> None:
        if self.states:
            self.snapshot(asynchronous=not wait)
        else:
            super().checkpoint(wait)

    def _changelog(self) -> list[OutgoingBatch]:
        """The snapshots of the partitions handled since the last snapshot, as changelog
        records keyed by partition; starts the next snapshot interval."""
        self._last_snapshot = time.monotonic()
        self._records_since_snapshot = 0
        dirty = sorted(self._dirty & set(self.next_offsets))
        self._dirty.clear()
        if not dirty:
            return []
        topic = self.identity.input_topic
        return [OutgoingBatch(self.changelog_topic, [
            PartitionSnapshot(self.next_offsets[p], {name: state.snapshot(p)
                                                     for name, state in self.states.items()}
                              ).to_bytes(topic, p)
            for p in dirty], [str(p).encode() for p in dirty])]

    def snapshot(self, asynchronous: bool = False) -> None:
        """Write the changed partitions' snapshots to the changelog, then commit what they
        cover (under exactly_once, it joins the open transaction, which carries the offsets).

        A commit that does not happen leaves the group's offsets behind the snapshots, which is
        safe: the next owner of a partition restores a snapshot and skips the records it covers.
        """
        changelog = self._changelog()
        if not changelog:
            return
        if self.transactional:
            self.deliver(changelog, [], ConsumedBatch(), None)
            return
        self._produce(changelog)
        topic = self.identity.input_topic
        self.commit({(topic, int(key)): self.next_offsets[int(key)]
                     for key in changelog[0].keys if key is not None}, asynchronous)



def without(batches: Sequence[OutgoingBatch], rejected: Sequence[tuple[int, int]]
            ) -> list[OutgoingBatch]:
    """``batches`` less their ``rejected`` (batch, record) records."""
    drop = set(rejected)
    kept = []
    for number, batch in enumerate(batches):
        records = [record for index, record in enumerate(batch.records())
                   if (number, index) not in drop]
        if records:
            values, keys, headers, timestamps = zip(*records, strict=True)
            kept.append(OutgoingBatch(batch.topic, values, keys, headers, timestamps))
    return kept


def build_steps(stage: ProcessorConfig, pipeline: str) -> list[StepRunner]:
    """The steps of a processor stage, with their settings validated and their policies."""
    context = ComponentContext(pipeline, stage.name)
    steps = []
    for step in stage.steps:
        plugin, settings = step_settings(step)
        steps.append(StepRunner(plugin(settings, context), step.on_error))
    return steps


def decode_input(
    values: Sequence[bytes | None], steps: Sequence[StepRunner]
) -> tuple[pa.Table, list[Failure]]:
    """Record values as the first step's input: raw for a step that ``reads_raw_records`` (such
    as ``parse``), which decodes them itself; otherwise JSON, read into the first step's
    ``input_schema`` when it fits."""
    first = steps[0].step if steps else None
    if first is not None and first.reads_raw_records:
        return raw_table(values), []
    schema = first.input_schema if first is not None else None
    table, errors = decode_json(values, schema, lenient=schema is not None)
    return table, [Failure(row, "parse", error) for row, error in errors]


def output_batches(
    table: pa.Table, default_topic: str, keys: Sequence[bytes | None],
    timestamps_ms: Sequence[int | None], origins: ConsumedBatch | None = None,
) -> list[OutgoingBatch]:
    """The rows of ``table`` as JSON records per topic (``_sf_topic``, else ``default_topic``),
    with the key and timestamp of the consumed record each came from (and with ``origins``, the
    consumed batch, its coordinates in an ``sf-origin`` header: row-level lineage)."""
    if TOPIC_COLUMN not in table.schema.names:
        groups = [(default_topic, table)]
    else:
        topics = pc.fill_null(table.column(TOPIC_COLUMN), default_topic)
        table = table.drop_columns([TOPIC_COLUMN])
        groups = [(topic, table.filter(pc.equal(topics, topic)))
                  for topic in pc.unique(topics).to_pylist()]
    batches = []
    for topic, rows in groups:
        origin = rows[ROW_ID].to_numpy().tolist()
        batches.append(OutputBatch(
            topic=topic,
            values=encode_json(user_fields(rows)),
            keys=list(map(keys.__getitem__, origin)),
            timestamps_ms=list(map(timestamps_ms.__getitem__, origin)),
            headers=origin_headers(origins, origin) if origins is not None else (),
            rows=origin,
        ))
    return batches


class SinkStage(StageRunner):
    """Hands batches to a sink per partition; flushes and commits every ``commit_interval_s``.

    For sinks that store offsets with their data, records below the offset the sink reports for
    a newly assigned partition were already written: they are skipped and counted as filtered.
    """

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
        sink: Sink,
        sink_metrics: SinkMetrics,
        commit_interval_s: float,
    ) -> None:
        super().__init__(identity, transport, batch, metrics)
        self.sink = sink
        self.sink_metrics = sink_metrics
        self.commit_interval_s = commit_interval_s
        self._pending: dict[TopicPartition, int] = {}
        self._pending_rows = 0
        self._pending_timestamps: list[np.ndarray] = []
        self._last_flush = time.monotonic()
        self._cluster_id = ""
        self._already_written: dict[TopicPartition, int] = {}  # next offset the sink stored

    def open(self) -> None:
        self._cluster_id = self.transport.cluster_id()
        self.sink.open()

    def restore(self, partitions: list[TopicPartition]) -> None:
        """Ask the sink where the newly assigned partitions' rows it stored end."""
        self._already_written.update(self.sink.resume_offsets(partitions, self._cluster_id))

    def _skip_already_written(self, batch: ConsumedBatch) -> ConsumedBatch:
        """``batch`` without the records the sink reported as already written."""
        if not self._already_written:
            return batch
        topic = batch.topics[0]
        partitions, offsets = np.asarray(batch.partitions), np.asarray(batch.offsets)
        fresh = np.ones(len(batch), dtype=bool)
        for partition in np.unique(partitions):
            written_before = self._already_written.get((topic, int(partition)))
            if written_before is not None:
                fresh &= (partitions != partition) | (offsets >= written_before)
        for partition, next_offset in batch.next_offsets().items():
            if next_offset >= self._already_written.get(partition, next_offset + 1):
                del self._already_written[partition]  # caught up: nothing more to skip
        return batch if fresh.all() else batch.select(np.flatnonzero(fresh).tolist())

    def handle(self, consumed: ConsumedBatch) -> None:
        batch = self._skip_already_written(consumed)
        self._pending.update(consumed.next_offsets())
        if not len(batch):
            self.metrics.count(len(consumed), 0, 0)
            return
        table, decode_failures = decode_json(batch.values)
        failures = [Failure(row, "parse", error) for row, error in decode_failures]
        partitions = np.asarray(batch.partitions)
        row_ids = table[ROW_ID].to_numpy()
        written = 0
        for partition in np.unique(partitions):
            first_offset = batch.offsets[int(np.argmax(partitions == partition))]
            mask = partitions[row_ids] == partition
            part = user_fields(table.filter(pa.array(mask)))
            if part.num_rows == 0:
                continue
            if isinstance(self.sink, LineageSink):
                part = self.sink.annotate(part, batch, row_ids[mask])
            try:
                self.sink.write(part, (batch.topics[0], int(partition)), first_offset)
                written += part.num_rows
            except SinkRecordError as exc:
                part_rows = row_ids[mask]
                failed = set(exc.rows)
                failures += [Failure(int(part_rows[row]), "sink", error)
                             for row, error in zip(exc.rows, exc.errors, strict=True)]
                written += part.num_rows - len(failed)
        self.produce_dead_letters(failures, batch)
        self._pending_rows += written
        self._pending_timestamps.append(np.asarray(batch.timestamps_ms, dtype=np.float64))
        self.metrics.count(len(consumed), written, len(failures))

    def checkpoint_due(self) -> bool:
        return bool(self._pending) and (time.monotonic() - self._last_flush
                                        >= self.commit_interval_s or self.sink.should_flush())

    def checkpoint(self, wait: bool) -> None:
        """Flush the sink, then commit what it made durable (always waiting for both)."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        started = time.perf_counter()
        written_bytes = self.sink.flush(self._pending, self._cluster_id)
        self.sink_metrics.flush_seconds.observe(time.perf_counter() - started)
        self.sink_metrics.rows_written.inc(self._pending_rows)
        self.sink_metrics.bytes_written.inc(written_bytes or 0)
        self.commit(self._pending, asynchronous=False)
        committed_at_ms = time.time() * 1000
        for timestamps in self._pending_timestamps:
            for latency_ms in committed_at_ms - timestamps[timestamps > 0]:
                self.sink_metrics.latency.observe(latency_ms / 1000)
        self._pending, self._pending_rows, self._pending_timestamps = {}, 0, []

    def _close(self) -> None:
        super()._close()
        try:
            self.sink.close()
        except Exception:
            log.exception("stage %s: closing the sink failed", self.name)

    def revoke(self, partitions: list[TopicPartition], lost: bool) -> None:
        """Revoked partitions were flushed. Lost ones: discard everything written and not
        flushed, their rows replay at their next owner.

        A sink may hold the rows of several partitions in one open transaction (the table
        sinks), which cannot drop some of them: the sink is closed, which discards whatever
        was not flushed, and opened again. Unflushed rows of partitions this member keeps would
        go with them: the stage then fails at its next poll instead, and its restart replays
        them (an evicted member loses every partition, so Kafka's group protocol never does
        this)."""
        kept: list[TopicPartition] = []
        unflushed = False
        if lost:
            kept = sorted(set(self._pending) - set(partitions))
            unflushed = self._pending_rows > 0
            for partition in set(partitions) & set(self._pending):
                del self._pending[partition]
            self._pending_rows, self._pending_timestamps = 0, []
        self.sink.revoke(partitions)
        for partition in partitions:
            self._already_written.pop(partition, None)
        if kept:
            self._callback_error = UnflushedRowsLostError(
                f"stage {self.name} lost partitions while it had unflushed rows of {kept}, "
                "which it keeps: restarting to replay them")
        elif unflushed:
            self.sink.close()
            self.sink.open()
