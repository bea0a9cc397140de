"""The windowed processor stage: a topic stage whose steps' output is aggregated in event-time
windows. The windows are kept per input partition, as a state of the stage core (see
:class:`~streamflow.runtime.stages.TopicStage`): snapshotted to ``<pipeline>.<stage>.changelog``,
restored and replayed like any other."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.config.models import BatchConfig, StateCheckpointConfig, WindowConfig
from streamflow.metrics import StageMetrics, WindowMetrics
from streamflow.plugins import ROW_ID, PartitionedState
from streamflow.processing.routing import TOPIC_COLUMN
from streamflow.processing.windows import (
    LateRecordError,
    PartitionWindows,
    WindowRecordError,
    event_time_ms,
    iso_utc,
    jsonable,
    record_values,
    window_record,
)
from streamflow.runtime.dead_letters import Failure, dead_letter_batch
from streamflow.runtime.stages import (
    TRANSACTION_INTERVAL_S,
    Handled,
    StageIdentity,
    StepRunner,
    TopicStage,
    output_batches,
)
from streamflow.transport import ConsumedBatch, OutgoingBatch, Transport

WINDOW_STEP = "window"


@dataclass
class WindowsHandled(Handled):
    """What handling a batch gave, with the late records and the window results."""

    late: int
    emitted: int


class WindowStates(PartitionedState):
    """The open windows of each partition the stage owns."""

    def __init__(self, config: WindowConfig) -> None:
        self.config = config
        self.partitions: dict[int, PartitionWindows] = {}

    def restore(self, partition: int, snapshot: bytes | None) -> None:
        self.partitions[partition] = (PartitionWindows(self.config, partition) if snapshot is None
                                      else PartitionWindows.from_bytes(self.config, partition, snapshot))

    def snapshot(self, partition: int) -> bytes:
        return self.partitions[partition].to_bytes()

    def revoke(self, partition: int) -> None:
        self.partitions.pop(partition, None)

    def window_count(self) -> int:
        return sum(windows.window_count() for windows in self.partitions.values())


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
        checkpoint: StateCheckpointConfig,
        exactly_once: bool = False,
        transaction_interval_s: float = TRANSACTION_INTERVAL_S,
    ) -> None:
        self.windows = WindowStates(window)
        super().__init__(identity, transport, batch, metrics, output_topic, steps, exactly_once,
                         changelog_topic, checkpoint, {"windows": self.windows},
                         transaction_interval_s)
        self.window = window
        self.window_metrics = window_metrics
        self.late_topic = late_topic
        metrics.error(WINDOW_STEP)  # the counter starts at 0

    # --- records ---------------------------------------------------------------------------

    def process(self, batch: ConsumedBatch) -> WindowsHandled:
        """Run the steps and the windows on ``batch``: the records to deliver, and the failures
        (its dead letters)."""
        table, failures = self.transform(batch)
        table, diverted = self._divert_routed(table, batch)
        aggregated, late = self._aggregate(batch, table, failures)
        window = self.window
        partitions = self.windows.partitions
        emitted = [window_record(window, w) for p in sorted(set(batch.partitions))
                   for w in partitions[p].emit()]
        outgoing = [*diverted, OutgoingBatch(
            self.output_topic,
            [json.dumps(record, separators=(",", ":")).encode() for record in emitted],
            [json.dumps([record[k] for k in window.key]).encode() for record in emitted],
        )]
        if late:
            outgoing.append(dead_letter_batch(self.late_topic, self.identity.pipeline, self.name,
                                              late, batch))
        return WindowsHandled(outgoing, failures,
                              aggregated + sum(len(d.values) for d in diverted),
                              len(late), len(emitted))

    def count(self, handled: Handled) -> None:
        assert isinstance(handled, WindowsHandled)
        self.window_metrics.late.inc(handled.late)
        self.window_metrics.results.inc(handled.emitted)
        self.window_metrics.open_windows.set(self.windows.window_count())

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
            state = self.windows.partitions[batch.partitions[row]]
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
