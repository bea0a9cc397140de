"""Stage runners: each is a consumer group member running in its own thread.

A topic stage decodes a micro-batch, runs its steps, produces the output and the dead letters,
and commits the input offsets only after the broker acknowledged both (at-least-once). A sink
stage hands batches to its sink and commits after the sink's flush made them durable.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from streamflow.config.models import BatchConfig
from streamflow.metrics import SinkMetrics, StageMetrics
from streamflow.plugins import ROW_ID, Processor, Sink, SinkRecordError, StepResult
from streamflow.processing.codec import decode_json, encode_json
from streamflow.runtime.dead_letters import Failure, dead_letter_batch
from streamflow.transport import (
    ConsumedBatch,
    Consumer,
    OutgoingBatch,
    Producer,
    RebalanceInProgressError,
    RebalanceListener,
    TopicPartition,
    Transport,
)

log = logging.getLogger(__name__)

LAG_CHECK_INTERVAL_S = 1.0


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


class StageRunner(RebalanceListener, ABC):
    """Consume → handle → commit, until :meth:`stop`; tracks idleness and lag for --until-idle."""

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
    ) -> None:
        self.identity = identity
        self.transport = transport
        self.batch_config = batch
        self.metrics = metrics
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"stage-{identity.name}", daemon=True)
        self.error: BaseException | None = None
        self.idle_since = time.monotonic()
        self.lag: int | None = None
        self._lag_checked = 0.0
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        self.assigned = False  # joined the group at least once (possibly with no partitions)

    @property
    def name(self) -> str:
        return self.identity.name

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def is_idle(self, seconds: float) -> bool:
        """No records for ``seconds`` and nothing left to read on assigned partitions."""
        return (
            self.lag == 0
            and time.monotonic() - self.idle_since >= seconds
            and self.thread.is_alive()
        )

    def _run(self) -> None:
        try:
            self.producer = self.transport.producer()
            self.consumer = self.transport.consumer(
                self.identity.group_id, self.topics(), listener=self
            )
            self.open()
            while not self._stop.is_set():
                batch = self.consumer.consume_batch(
                    self.batch_config.max_records, self.batch_config.max_wait_ms / 1000
                )
                if len(batch):
                    self.idle_since = time.monotonic()
                    self.lag = None
                    started = time.perf_counter()
                    self.handle(batch)
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
                self._check_lag()
                self.tick()
            self.drain()
        except BaseException as exc:
            log.exception("stage %s failed", self.name)
            self.error = exc
        finally:
            self._close()

    def _check_lag(self) -> None:
        now = time.monotonic()
        if self.consumer is None or now - self._lag_checked < LAG_CHECK_INTERVAL_S:
            return
        self._lag_checked = now
        lags = self.consumer.lag()
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

    def commit(self, offsets: dict[TopicPartition, int], asynchronous: bool) -> None:
        assert self.consumer is not None
        try:
            self.consumer.commit(offsets, asynchronous=asynchronous)
        except RebalanceInProgressError:
            log.warning("stage %s: commit refused during a rebalance; records will be replayed",
                        self.name)
            return
        if not asynchronous:
            self.metrics.checkpoint_time.set(time.time())

    def produce_dead_letters(self, failures: list[Failure], batch: ConsumedBatch) -> None:
        """Publish failed records to the dead-letter topic and count them."""
        if not failures:
            return
        assert self.producer is not None
        identity = self.identity
        self.producer.produce([dead_letter_batch(
            identity.dead_letter_topic, identity.pipeline, identity.name, failures, batch
        )])
        for failure in failures:
            self.metrics.error(failure.step).inc()

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

    def drain(self) -> None:
        """Called once on a graceful stop, before the clients close."""

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        log.info("stage %s assigned %s", self.name, partitions)
        self.assigned = True

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        log.info("stage %s revoked %s", self.name, partitions)


class StepFailedError(RuntimeError):
    """A step with ``on_error: fail`` failed: the stage stops without committing the batch."""


@dataclass(frozen=True)
class StepRunner:
    """A processor step with its ``on_error`` policy: ``dlq``, ``drop`` or ``fail``."""

    step: Processor[Any]
    on_error: str = "dlq"


def run_steps(steps: Sequence[StepRunner], table: pa.Table, failures: list[Failure]) -> pa.Table:
    """Run ``steps`` in order; rows to dead-letter (as ``_sf_row`` ids) go to ``failures``.

    Rows failed by a ``drop`` step simply vanish (they count as filtered); a failure in a
    ``fail`` step raises :class:`StepFailedError`.
    """
    for runner in steps:
        step = runner.step
        try:
            result = step.process(table)
            if ROW_ID not in result.table.column_names:
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
                row_ids = table[ROW_ID]
                failures.extend(
                    Failure(row_ids[index].as_py(), step.name, error)
                    for index, error in result.failures
                )
        table = result.table
    return table


class TopicStage(StageRunner):
    """A topic → topic stage: decode, steps, produce output and dead letters, commit."""

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
        output_topic: str,
        steps: Sequence[StepRunner],
    ) -> None:
        super().__init__(identity, transport, batch, metrics)
        self.output_topic = output_topic
        self.steps = list(steps)
        # Parse straight into the first step's schema when it declares one.
        self.schema = self.steps[0].step.input_schema if self.steps else None
        self._last_offsets: dict[TopicPartition, int] = {}

    def drain(self) -> None:
        """Confirm the last asynchronous commits synchronously before leaving the group."""
        self.commit(self._last_offsets, asynchronous=False)

    def handle(self, batch: ConsumedBatch) -> None:
        assert self.producer is not None
        table, decode_failures = decode_json(batch.values, self.schema)
        failures = [Failure(row, "parse", error) for row, error in decode_failures]
        table = run_steps(self.steps, table, failures)
        rows = table[ROW_ID].to_numpy()
        output = OutgoingBatch(
            topic=self.output_topic,
            values=encode_json(table),
            keys=[batch.keys[row] for row in rows],
            timestamps_ms=[batch.timestamps_ms[row] for row in rows],
        )
        self.producer.produce([output])
        self.produce_dead_letters(failures, batch)
        offsets = batch.next_offsets()
        self.commit(offsets, asynchronous=True)
        self._last_offsets.update(offsets)
        self.metrics.count(len(batch), len(rows), len(failures))


class SinkStage(StageRunner):
    """Hands batches to a sink per partition; flushes and commits every ``commit_interval_s``."""

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

    def open(self) -> None:
        self.sink.open()

    def handle(self, batch: ConsumedBatch) -> None:
        table, decode_failures = decode_json(batch.values)
        failures = [Failure(row, "parse", error) for row, error in decode_failures]
        partitions = np.asarray(batch.partitions)
        row_ids = table[ROW_ID].to_numpy()
        written = 0
        for partition in np.unique(partitions):
            first_offset = batch.offsets[int(np.argmax(partitions == partition))]
            mask = partitions[row_ids] == partition
            part = table.filter(pa.array(mask)).drop_columns([ROW_ID])
            if part.num_rows == 0:
                continue
            try:
                self.sink.write(part, (batch.topics[0], int(partition)), first_offset)
                written += part.num_rows
            except SinkRecordError as exc:
                part_rows = row_ids[mask]
                failed = set(exc.rows)
                failures += [Failure(int(part_rows[i]), "sink", exc.error) for i in exc.rows]
                written += part.num_rows - len(failed)
        self.produce_dead_letters(failures, batch)
        self._pending.update(batch.next_offsets())
        self._pending_rows += written
        self._pending_timestamps.append(np.asarray(batch.timestamps_ms, dtype=np.float64))
        self.metrics.count(len(batch), written, len(failures))

    def tick(self) -> None:
        if self._pending and time.monotonic() - self._last_flush >= self.commit_interval_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Flush the sink, then commit what it made durable."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        started = time.perf_counter()
        written_bytes = self.sink.flush()
        self.sink_metrics.flush_seconds.observe(time.perf_counter() - started)
        self.sink_metrics.rows_written.inc(self._pending_rows)
        self.sink_metrics.bytes_written.inc(written_bytes or 0)
        self.commit(self._pending, asynchronous=False)
        committed_at_ms = time.time() * 1000
        for timestamps in self._pending_timestamps:
            for latency_ms in committed_at_ms - timestamps[timestamps > 0]:
                self.sink_metrics.latency.observe(latency_ms / 1000)
        self._pending, self._pending_rows, self._pending_timestamps = {}, 0, []

    def drain(self) -> None:
        self.checkpoint()
        self.sink.close()

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        super().on_revoke(partitions)
        if self.error is None:  # after a failure, nothing more is made durable: it replays
            self.checkpoint()
        self.sink.revoke(partitions)
