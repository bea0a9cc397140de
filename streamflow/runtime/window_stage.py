"""The windowed processor stage: a topic stage whose steps' output is aggregated in event-time
windows, with the window state checkpointed to a compacted changelog topic.

State is kept per input partition. After a batch's output, late records and dead letters were
acknowledged, the stage may snapshot the state of every partition that changed, including the
next input offset each covers, to ``<pipeline>.<stage>.changelog`` (keyed by partition); only
then does it commit those offsets. Offsets are committed at snapshots only, so a commit never
runs ahead of a snapshot. When a partition is assigned, a snapshot covering at least the
group's committed offset is restored and input records below the snapshot's offset are skipped:
no record is counted twice or lost. Aggregate records emitted after the restored snapshot are
emitted again, with the same values, when the stage replays (at-least-once output).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
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
from streamflow.runtime.stages import StageIdentity, StepRunner, TopicStage
from streamflow.transport import ConsumedBatch, OutgoingBatch, TopicPartition, Transport, read_until

log = logging.getLogger(__name__)

WINDOW_STEP = "window"
READ_CHANGELOG_TIMEOUT_S = 30.0


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
    ) -> None:
        super().__init__(identity, transport, batch, metrics, output_topic, steps)
        self.window = window
        self.window_metrics = window_metrics
        self.late_topic = late_topic
        self.changelog_topic = changelog_topic
        self.states: dict[int, PartitionWindows] = {}
        self._known: dict[int, PartitionWindows] = {}  # states of partitions not assigned now
        self._assigned: list[int] = []
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
        if self.error is None:  # after a failure the state may be ahead of the output: replay
            # kafka-python runs this callback on its IO thread, where a commit cannot block.
            self.snapshot(asynchronous=True)
        for partition in revoked & set(self.states):
            self._known[partition] = self.states.pop(partition)

    def open(self) -> None:
        super().open()
        # Read while the group join goes on (in the client's background thread, for librdkafka).
        self._known = self._read_snapshots()

    def _restore(self, partitions: set[int]) -> None:
        """Load the state of newly assigned partitions.

        A known state (read from the changelog at start, or kept from before a rebalance) is
        used when it covers at least the group's committed offset: records from there on up to
        its offset are skipped, so it is consistent even if a newer snapshot exists. Otherwise
        the changelog is read again.
        """
        assert self.consumer is not None
        topic = self.identity.input_topic
        committed = self.consumer.committed([(topic, p) for p in sorted(partitions)])
        behind = []
        for partition in sorted(partitions):
            state = self._known.pop(partition, None) or PartitionWindows(self.window, partition)
            if state.next_offset >= (committed.get((topic, partition)) or 0):
                self._adopt(state)
            else:
                behind.append(partition)
        if behind:
            self._known.update(self._read_snapshots())
            for partition in behind:
                state = self._known.pop(partition, None) or PartitionWindows(self.window, partition)
                if state.next_offset < (committed.get((topic, partition)) or 0):
                    log.warning("stage %s: no snapshot of partition %d covers its committed "
                                "offset; its windows start afresh there", self.name, partition)
                self._adopt(state)

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
        pending, self._assigned = set(self._assigned), []
        if pending:
            self._restore(pending)

    def _prepare(self, batch: ConsumedBatch) -> ConsumedBatch:
        """Restore what was assigned; return ``batch`` without the records the states already
        hold, nor any of a partition revoked meanwhile (its new owner handles them)."""
        self._restore_assigned()
        states = self.states
        fresh = [row for row, (partition, offset) in enumerate(zip(batch.partitions, batch.offsets,
                                                                     strict=True))
                 if partition in states and offset >= states[partition].next_offset]
        return batch if len(fresh) == len(batch) else batch.select(fresh)

    # --- records ---------------------------------------------------------------------------

    def handle(self, consumed: ConsumedBatch) -> None:
        assert self.producer is not None
        batch = self._prepare(consumed)
        if not len(batch):
            return
        table, failures = self.transform(batch)
        table, diverted = self._divert_routed(table, batch)
        aggregated, late = self._aggregate(batch, table, failures)
        window = self.window
        emitted = [window_record(window, w) for p in sorted(set(batch.partitions))
                   for w in self.states[p].emit()]
        outgoing = [OutgoingBatch(
            self.output_topic,
            [json.dumps(record, separators=(",", ":")).encode() for record in emitted],
            [json.dumps([record[k] for k in window.key]).encode() for record in emitted],
        )]
        if late:
            outgoing.append(dead_letter_batch(self.late_topic, self.identity.pipeline, self.name,
                                              late, batch))
        self.producer.produce([*outgoing, *self.dead_letters(failures, batch)])  # one wait for acks
        self.count_dead_letters(failures)
        for (_topic, partition), next_offset in batch.next_offsets().items():
            self.states[partition].next_offset = next_offset
            self._dirty.add(partition)
        self.metrics.count(len(batch), aggregated + diverted, len(failures))
        self.window_metrics.late.inc(len(late))
        self.window_metrics.results.inc(len(emitted))
        self.window_metrics.open_windows.set(sum(s.window_count() for s in self.states.values()))
        self._records_since_snapshot += len(batch)
        if self._records_since_snapshot >= window.checkpoint.every_records:
            self.snapshot()

    def _divert_routed(self, table: pa.Table, batch: ConsumedBatch) -> tuple[pa.Table, int]:
        """Produce the rows a ``route`` step sent to another topic than the stage's output, as
        they are; return the rest (for the windows) and how many were diverted."""
        if TOPIC_COLUMN not in table.column_names:
            return table, 0
        to_windows = pc.fill_null(pc.equal(table.column(TOPIC_COLUMN), self.output_topic), True)
        diverted = table.filter(pc.invert(to_windows))
        if diverted.num_rows:
            self.produce_output(diverted, batch)
        return table.filter(to_windows).drop_columns([TOPIC_COLUMN]), diverted.num_rows

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

    def snapshot(self, asynchronous: bool = False) -> None:
        """Write the changed partitions' states to the changelog, then commit what they cover.

        A commit that does not happen leaves the group's offsets behind the snapshots, which is
        safe: the next owner of a partition restores a snapshot and skips the records it covers.
        """
        self._last_snapshot = time.monotonic()
        self._records_since_snapshot = 0
        dirty = sorted(self._dirty & set(self.states))
        self._dirty.clear()
        if not dirty:
            return
        assert self.producer is not None
        topic = self.identity.input_topic
        self.producer.produce([OutgoingBatch(
            self.changelog_topic,
            [self.states[p].to_bytes(topic) for p in dirty],
            [str(p).encode() for p in dirty],
        )])
        self.commit({(topic, p): self.states[p].next_offset for p in dirty}, asynchronous)

    def drain(self) -> None:
        self.snapshot()
