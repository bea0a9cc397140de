"""The windowed processor stage: a topic stage whose steps' output is aggregated in event-time
windows, with the window state checkpointed to a compacted changelog topic.

State is kept per input partition. Every ``checkpoint.every_records`` records or
``every_seconds``, the stage snapshots the state of every partition that changed, with the next
input offset it covers, to ``<pipeline>.<stage>.changelog`` (keyed by partition).

- Under at_least_once, offsets are committed at snapshots only, after the snapshot was
  acknowledged, so a commit never runs ahead of a snapshot. Aggregate records emitted after the
  restored snapshot are emitted again, with the same values, when the stage replays.
- Under exactly_once, every batch's output, late records, dead letters and input offsets are one
  transaction, and a due snapshot joins the transaction of its batch; a snapshot is then never
  ahead of the committed offsets, and is usually behind them.

When a partition is assigned, the newest state known for it is restored. Input records below
its offset are skipped; records between its offset and the group's committed one are replayed
into it from the input topic with their output discarded, since it was delivered when they were
first handled. No record is counted twice or lost.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.config.models import BatchConfig, WindowConfig
from streamflow.metrics import StageMetrics, WindowMetrics
from streamflow.plugins import ROW_ID
from streamflow.processing.routing import TOPIC_COLUMN
from streamflow.processing.windows import (
    LateRecordError,
    PartitionWindows,
    SnapshotError,
    WindowRecordError,
    event_time_ms,
    iso_utc,
    jsonable,
    record_values,
    window_record,
)
from streamflow.runtime.dead_letters import Failure, dead_letter_batch
from streamflow.runtime.stages import StageIdentity, StepRunner, TopicStage, output_batches
from streamflow.transport import (
    ConsumedBatch,
    OutgoingBatch,
    TopicPartition,
    Transport,
    read_until,
)

log = logging.getLogger(__name__)

WINDOW_STEP = "window"
READ_CHANGELOG_TIMEOUT_S = 30.0


@dataclass
class Handled:
    """What handling a batch gave: the records to deliver, the failures and the counts."""

    outgoing: list[OutgoingBatch]
    failures: list[Failure]
    aggregated: int
    diverted: int
    late: int
    emitted: int


def _key_value(value: Any) -> Any:
    """A hashable key component: JSON scalars as they are, anything else as its JSON text."""
    value = jsonable(value)
    return value if not isinstance(value, list | dict) else json.dumps(value, sort_keys=True)


class WindowStage(TopicStage):
    """Decode, steps, then windows: emits aggregate records and sends late records aside."""

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
        output_topic: str,
        steps: Sequence[StepRunner],
        window: WindowConfig,
        window_metrics: WindowMetrics,
        late_topic: str,
        changelog_topic: str,
        exactly_once: bool = False,
    ) -> None:
        super().__init__(identity, transport, batch, metrics, output_topic, steps, exactly_once)
        self.window = window
        self.window_metrics = window_metrics
        self.late_topic = late_topic
        self.changelog_topic = changelog_topic
        self.states: dict[int, PartitionWindows] = {}
        self._known: dict[int, PartitionWindows] = {}  # states of partitions not assigned now
        self._assigned: list[int] = []
        self._unconfirmed: set[int] = set()  # restored, before their first record
        self._dirty: set[int] = set()
        self._records_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        metrics.error(WINDOW_STEP)  # the counter starts at 0

    # --- partitions ------------------------------------------------------------------------

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        super().on_assign(partitions)
        # Restoring reads the changelog, which clients forbid inside rebalance callbacks.
        self._assigned.extend(partition for _topic, partition in partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        super().on_revoke(partitions)
        revoked = {partition for _topic, partition in partitions}
        self._assigned = [p for p in self._assigned if p not in revoked]
        self._unconfirmed -= revoked
        if self.error is None and not self.transactional:
            # After a failure the state may be ahead of the output: it replays. Under
            # exactly_once every batch committed its offsets already. kafka-python runs this
            # callback on its IO thread, where a commit cannot block.
            self.snapshot(asynchronous=True)
        for partition in revoked & set(self.states):
            self._known[partition] = self.states.pop(partition)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """Drop the lost partitions' states unsnapshotted: they may be ahead of what was
        committed, and their next owner restores from the changelog."""
        super().on_lost(partitions)
        lost = {partition for _topic, partition in partitions}
        self._assigned = [p for p in self._assigned if p not in lost]
        self._unconfirmed -= lost
        self._dirty -= lost
        for partition in lost:
            self.states.pop(partition, None)
            self._known.pop(partition, None)

    def open(self) -> None:
        super().open()
        # Read while the group join goes on (in the client's background thread, for librdkafka).
        self._known = self._read_snapshots()

    def _restore(self, resumed_at: dict[int, int]) -> None:
        """Load the state of partitions the consumer resumes at ``resumed_at``: the group's
        committed offsets, then the offset of each one's first record consumed since (past
        transaction markers).

        A known state (read from the changelog at start, or kept from before a rebalance) is
        used when it covers at least that offset: records from there on up to its offset are
        skipped. Otherwise the changelog is read again. A state still behind the offset (under
        exactly_once, whenever batches were committed after the last snapshot) is brought up
        to it by replaying the input records in between, with their output discarded: it was
        delivered when they were first handled.

        The first record tells where the consumer resumed, which the group's committed offset
        does not always: a fetch of it answers nothing while a transaction that sent offsets is
        being completed, and longer after its producer crashed (until the transaction times out).
        """
        states = {p: self._known.pop(p, None) or PartitionWindows(self.window, p)
                  for p in sorted(resumed_at)}
        if any(state.next_offset < resumed_at[p] for p, state in states.items()):
            self._known.update(self._read_snapshots())
            for partition, state in states.items():
                newer = self._known.pop(partition, state)
                if state.next_offset < resumed_at[partition]:
                    states[partition] = max(state, newer, key=lambda s: s.next_offset)
        behind = {p: state for p, state in states.items() if state.next_offset < resumed_at[p]}
        for state in states.values():
            self._adopt(state)
        if behind:
            self._replay(behind, resumed_at)

    def _replay(self, states: dict[int, PartitionWindows], resumed_at: dict[int, int]) -> None:
        """Aggregate the input records from each state's offset up to where the consumer
        resumed, discarding what they emit."""
        topic = self.identity.input_topic
        replayed = 0
        for batch in read_until(self.transport,
                                {(topic, p): state.next_offset for p, state in states.items()},
                                {(topic, p): resumed_at[p] for p in states}):
            self._process(batch)
            replayed += len(batch)
        log.info("stage %s replayed %d records of partitions %s up to where it resumed them",
                 self.name, replayed, sorted(states))

    def _adopt(self, state: PartitionWindows) -> None:
        self.states[state.partition] = state
        log.info("stage %s took partition %d at offset %d with %d open windows",
                 self.name, state.partition, state.next_offset, state.window_count())

    def _read_snapshots(self) -> dict[int, PartitionWindows]:
        """The latest snapshot of every partition in the changelog."""
        assert self.consumer is not None
        latest: dict[bytes, bytes] = {}  # the last value of each key: the compacted topic's view
        for batch in read_until(self.transport, {(self.changelog_topic, 0): None},
                                timeout_s=READ_CHANGELOG_TIMEOUT_S):
            latest.update((key, value) for key, value in zip(batch.keys, batch.values, strict=True)
                          if key is not None and value is not None)
        states = {}
        for key, snapshot in latest.items():
            try:
                states[int(key)] = PartitionWindows.from_bytes(self.window, snapshot)
            except SnapshotError as exc:
                log.warning("stage %s: snapshot of partition %s not restored (%s): its open "
                            "windows start afresh", self.name, key.decode(), exc)
        return states

    def _restore_assigned(self) -> None:
        """Restore newly assigned partitions at the group's committed offsets, as far as they
        are known now: the first record of each then confirms where the consumer resumed."""
        if not self._assigned:
            return
        partitions, self._assigned = sorted(set(self._assigned)), []
        committed = self.committed_input(partitions)
        self._restore({p: committed.get(p) or 0 for p in partitions})
        self._unconfirmed.update(partitions)

    def _prepare(self, batch: ConsumedBatch) -> ConsumedBatch:
        """Restore what was assigned; bring each restored state up to where its first record
        shows the consumer resumed; return ``batch`` without the records the states already
        hold, nor any of a partition revoked meanwhile (its new owner handles them)."""
        self._restore_assigned()
        if self._unconfirmed:
            first: dict[int, int] = {}
            for partition, offset in zip(batch.partitions, batch.offsets, strict=True):
                first.setdefault(partition, offset)  # offsets grow within a partition
            confirmed = {p: first[p] for p in self._unconfirmed if p in first}
            self._unconfirmed.difference_update(confirmed)
            behind = {p: offset for p, offset in confirmed.items()
                      if p in self.states and self.states[p].next_offset < offset}
            for partition in behind:
                self._known[partition] = self.states.pop(partition)
            if behind:
                self._restore(behind)
        states = self.states
        fresh = [row for row, (partition, offset) in enumerate(zip(batch.partitions, batch.offsets,
                                                                     strict=True))
                 if partition in states and offset >= states[partition].next_offset]
        return batch if len(fresh) == len(batch) else batch.select(fresh)

    # --- records ---------------------------------------------------------------------------

    def handle(self, consumed: ConsumedBatch) -> None:
        batch = self._prepare(consumed)
        if not len(batch):
            return
        handled = self._process(batch)
        outgoing = handled.outgoing
        snapshot_due = self._records_since_snapshot >= self.window.checkpoint.every_records
        if snapshot_due and self.transactional:
            outgoing = [*outgoing, *self._changelog()]
        failures = handled.failures
        offsets = batch.next_offsets() if self.transactional else None
        oversize = self.deliver(outgoing, failures, batch, offsets)
        self.count_dead_letters(failures)
        self.metrics.count(len(batch), handled.aggregated + handled.diverted - oversize,
                           len(failures))
        self.window_metrics.late.inc(handled.late)
        self.window_metrics.results.inc(handled.emitted)
        self.window_metrics.open_windows.set(sum(s.window_count() for s in self.states.values()))
        if snapshot_due and not self.transactional:
            self.snapshot()

    def _process(self, batch: ConsumedBatch) -> Handled:
        """Run the steps and the windows on ``batch``: the records to deliver, and the failures
        (its dead letters). The states then cover ``batch``."""
        table, failures = self.transform(batch)
        table, diverted = self._divert_routed(table, batch)
        aggregated, late = self._aggregate(batch, table, failures)
        window = self.window
        emitted = [window_record(window, w) for p in sorted(set(batch.partitions))
                   for w in self.states[p].emit()]
        outgoing = [*diverted, OutgoingBatch(
            self.output_topic,
            [json.dumps(record, separators=(",", ":")).encode() for record in emitted],
            [json.dumps([record[k] for k in window.key]).encode() for record in emitted],
        )]
        if late:
            outgoing.append(dead_letter_batch(self.late_topic, self.identity.pipeline, self.name,
                                              late, batch))
        for (_topic, partition), next_offset in batch.next_offsets().items():
            self.states[partition].next_offset = next_offset
            self._dirty.add(partition)
        self._records_since_snapshot += len(batch)
        return Handled(outgoing, failures, aggregated, sum(len(d.values) for d in diverted),
                       len(late), len(emitted))

    def _divert_routed(self, table: pa.Table, batch: ConsumedBatch
                       ) -> tuple[pa.Table, list[OutgoingBatch]]:
        """The rows a ``route`` step sent to another topic than the stage's output, as records
        to produce as they are; and the rest, for the windows."""
        if TOPIC_COLUMN not in table.column_names:
            return table, []
        to_windows = pc.fill_null(pc.equal(table.column(TOPIC_COLUMN), self.output_topic), True)
        diverted = table.filter(pc.invert(to_windows))
        routed = (output_batches(diverted, self.output_topic, batch.keys, batch.timestamps_ms)
                  if diverted.num_rows else [])
        return table.filter(to_windows).drop_columns([TOPIC_COLUMN]), routed

    def _aggregate(self, batch: ConsumedBatch, table: pa.Table,
                   failures: list[Failure]) -> tuple[int, list[Failure]]:
        """Add the steps' output rows to their partitions' windows in offset order; bad rows go
        to ``failures``. Returns how many rows were aggregated, and the late ones."""
        rows = table[ROW_ID].to_pylist()
        order = np.argsort(rows, kind="stable")  # steps may reorder rows; windows need offset order
        window = self.window

        def column(name: str | None) -> list[Any]:
            if name is None or name not in table.column_names:
                return [None] * len(rows)
            return table.column(name).to_pylist()

        times = column(window.time_field) if window.time_field else None
        keys = [column(name) for name in window.key]
        specs = list(window.aggregates.values())
        fields = [column(spec.field) for spec in specs]
        late: list[Failure] = []
        aggregated = 0
        for index in order:
            row = rows[index]
            state = self.states[batch.partitions[row]]
            try:
                time_ms = (event_time_ms(times[index], window.time_unit) if times is not None
                           else batch.timestamps_ms[row])
                values = record_values(specs, [column_values[index] for column_values in fields])
            except WindowRecordError as exc:
                failures.append(Failure(row, WINDOW_STEP, exc))
                continue
            added = state.add(tuple(_key_value(k[index]) for k in keys), time_ms, values)
            aggregated += added.aggregated
            if added.missed:
                watermark = state.watermark
                assert watermark is not None  # nothing is late before the first record
                late.append(Failure(row, WINDOW_STEP, LateRecordError(
                    f"event time {iso_utc(time_ms)} is behind the watermark "
                    f"{iso_utc(watermark)}; closed windows missed: "
                    + ", ".join(f"[{iso_utc(start)}, {iso_utc(end)})" for start, end in added.missed)
                )))
        return aggregated, late

    # --- checkpoints -----------------------------------------------------------------------

    def tick(self) -> None:
        self._restore_assigned()
        if time.monotonic() - self._last_snapshot >= self.window.checkpoint.every_seconds:
            self.snapshot()

    def _changelog(self) -> list[OutgoingBatch]:
        """The states of the partitions changed since the last snapshot, as changelog records
        keyed by partition; starts the next snapshot interval."""
        self._last_snapshot = time.monotonic()
        self._records_since_snapshot = 0
        dirty = sorted(self._dirty & set(self.states))
        self._dirty.clear()
        if not dirty:
            return []
        topic = self.identity.input_topic
        return [OutgoingBatch(self.changelog_topic,
                              [self.states[p].to_bytes(topic) for p in dirty],
                              [str(p).encode() for p in dirty])]

    def snapshot(self, asynchronous: bool = False) -> None:
        """Write the changed partitions' states to the changelog, then commit what they cover
        (under exactly_once, every batch committed its offsets: the snapshot is a transaction
        of its own).

        A commit that does not happen leaves the group's offsets behind the snapshots, which is
        safe: the next owner of a partition restores a snapshot and skips the records it covers.
        """
        changelog = self._changelog()
        if not changelog:
            return
        if self.transactional:
            self.deliver(changelog, [], ConsumedBatch(), None)
            return
        assert self.producer is not None
        self.producer.produce(changelog)
        topic = self.identity.input_topic
        self.commit({(topic, int(key)): self.states[int(key)].next_offset
                     for key in changelog[0].keys if key is not None}, asynchronous)

    def drain(self) -> None:
        self.snapshot()
