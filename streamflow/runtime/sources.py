"""Source runners: poll a source, publish its records, then checkpoint its position.

Positions live in a compacted Kafka topic (as in Kafka Connect), keyed by pipeline and source.
Each polled batch and the position after it are written in one Kafka transaction (as Kafka
Connect's exactly-once sources do), so a restart resumes with nothing skipped and nothing
repeated. The transactional id is fixed per source: a restarted runner fences its predecessor
and aborts the transaction it left open before reading the positions.

Tansu 0.6.0, the embedded broker, hides open transactions but shows aborted records to
read_committed consumers; there a batch cut off by a crash becomes visible together with the
position written in the same produce request, which keeps the two consistent in practice.

A record Kafka refuses for its size goes to the pipeline's dead-letter topic in the same
transaction, whole, or else truncated (see dead_letters): the source goes on, and its position
advances once, past it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from streamflow.config import models
from streamflow.metrics import SourceMetrics
from streamflow.plugins import Source, SourceBatch
from streamflow.runtime.dead_letters import (
    PRODUCE_STEP,
    OversizeRecordError,
    source_dead_letter_headers,
    truncated,
)
from streamflow.runtime.stage import Stage
from streamflow.transport import OutgoingBatch, Producer, RecordTooLargeError, TopicSpec, Transport

log = logging.getLogger(__name__)

POSITIONS_TOPIC = "_streamflow.source-positions"
POSITIONS_TOPIC_SPEC = TopicSpec(POSITIONS_TOPIC, partitions=1, config={"cleanup.policy": "compact"})
POLL_TIMEOUT_S = 0.2
READ_POSITIONS_TIMEOUT_S = 30.0
_POSITION = -1  # the place of the position record among a transaction's records


def source_dead_letter_topic(pipeline: str) -> str:
    """Where sources put records Kafka refused: the pipeline's default dead-letter topic, as
    :func:`streamflow.config.models.default_dead_letter_topic` names it for stages too."""
    return models.default_dead_letter_topic(pipeline)


def read_positions(transport: Transport, pipeline: str) -> dict[str, Any]:
    """The last checkpointed position of each source of ``pipeline``, by source name."""
    consumer = transport.consumer(f"{pipeline}.positions-reader.{uuid.uuid4().hex}",
                                  [POSITIONS_TOPIC])
    positions: dict[str, Any] = {}
    prefix = f"{pipeline}/"
    deadline = time.monotonic() + READ_POSITIONS_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume_batch(1000, 0.2)
            for key, value in zip(batch.keys, batch.values, strict=True):
                name = (key or b"").decode()
                if name.startswith(prefix) and value is not None:
                    positions[name[len(prefix):]] = json.loads(value)
            if not len(batch) and consumer.assignment() and sum(consumer.lag().values()) == 0:
                return positions
        raise TimeoutError(f"could not read {POSITIONS_TOPIC} in {READ_POSITIONS_TIMEOUT_S}s")
    finally:
        consumer.close()


class SourceRunner(Stage):
    """Runs one source in its own thread until it is exhausted or stopped."""

    def __init__(
        self,
        pipeline: str,
        source: Source[Any],
        topic: str,
        transport: Transport,
        metrics: SourceMetrics,
        max_records: int,
        dead_letter_topic: str,
    ) -> None:
        super().__init__(source.context.name, f"source-{source.context.name}")
        self.pipeline = pipeline
        self.dead_letter_topic = dead_letter_topic
        self.source = source
        self.topic = topic
        self.transport = transport
        self.metrics = metrics
        self.max_records = max_records
        self.opened = False  # the source's open() returned: its listeners, if any, take input
        self.finished = False
        self.finished_at = 0.0  # monotonic time the source ran out of records

    @property
    def last_activity(self) -> float:
        return self.finished_at

    def is_idle(self, since: float) -> bool:
        """Exhausted: a source that may still emit is never idle."""
        return self.finished

    def not_ready(self) -> str | None:
        return None if self.finished else super().not_ready()

    def starting(self) -> str | None:
        return None if self.opened else "opening (reading its position, starting its listener)"

    def _run(self) -> None:
        producer = None
        try:
            producer = self._producer()
            position = read_positions(self.transport, self.pipeline).get(self.name)
            self.source.open(position)
            self.opened = True
            while not self._stop.is_set():
                batch = self.source.poll(self.max_records, POLL_TIMEOUT_S)
                if batch is None:
                    self.finished_at = time.monotonic()
                    self.finished = True
                    log.info("source %s finished", self.name)
                    return
                if not len(batch):
                    continue
                previous, position = position, self.source.position()
                producer, dead = self._publish(producer, batch, previous, position)
                self.metrics.records_produced.inc(len(batch))
                if dead:
                    self.metrics.records_dead_lettered.inc(len(dead))
                    self.metrics.reasons.add((PRODUCE_STEP, error) for error in dead.values())
                    self.source.dead_lettered(list(dead), self.dead_letter_topic)
                self.source.acknowledged(position)
        except BaseException as exc:
            self.metrics.errors.inc()
            log.debug("source %s failed", self.name, exc_info=True)  # the supervisor says why
            self.error = exc
        finally:
            self.opened = False
            self.source.close()
            if producer is not None:
                producer.close()

    def _producer(self) -> Producer:
        return self.transport.producer(transactional_id=f"{self.pipeline}.source.{self.name}")

    def _publish(self, producer: Producer, batch: SourceBatch, previous: Any, position: Any
                 ) -> tuple[Producer, dict[int, OversizeRecordError]]:
        """Produce ``batch`` and ``position`` (the one after it) in one transaction; returns the
        producer (a new one when the broker refused records) and the rows of ``batch`` that went
        to the dead-letter topic, in order, with their errors.

        A record refused for its size is dead-lettered: whole, and if that is refused too,
        truncated; it keeps its place in the position. Records the client refused never left
        it, so the transaction goes on with their dead letters; after a refusal by the broker the
        transaction is abandoned with its client and done again with them.
        """
        levels: dict[int, int] = {}  # record → 1: dead-lettered whole, 2: truncated
        reasons: dict[int, str] = {}
        resend: list[int] | None = None  # only these records, or None: everything
        producer.begin_transaction()
        while True:
            outgoing, places = self._outgoing(batch, previous, position, levels, reasons, resend)
            try:
                producer.produce(outgoing)
                break
            except RecordTooLargeError as exc:
                refused = [places[number][index] for number, index in exc.rejected]
                if _POSITION in refused or any(levels.get(row) == 2 for row in refused):
                    raise
                for row in refused:
                    levels[row] = levels.get(row, 0) + 1
                    reasons.setdefault(row, str(exc))
                log.warning("source %s: %d records too large for Kafka go to %s", self.name,
                            len(refused), self.dead_letter_topic)
                resend = refused
                if exc.by_broker:
                    producer.close()
                    producer = self._producer()  # fences the old one: its transaction is aborted
                    producer.begin_transaction()
                    resend = None
        producer.commit_transaction()
        if levels:
            self.metrics.latest_dead_letters.add([self._dead_letters(batch, sorted(levels), previous,
                                                                     reasons)])
        return producer, {row: _refusal(batch, row, reasons) for row in sorted(levels)}

    def _outgoing(
        self, batch: SourceBatch, previous: Any, position: Any, levels: dict[int, int],
        reasons: dict[int, str], resend: list[int] | None,
    ) -> tuple[list[OutgoingBatch], list[Sequence[int]]]:
        """The batches of one produce call and, for each, the batch row of each record
        (``_POSITION`` for the position): the records of ``resend`` (None: the whole batch
        and the position), each to the topic or the dead-letter topic as ``levels`` says."""
        outgoing: list[OutgoingBatch] = []
        places: list[Sequence[int]] = []
        if resend is None:
            rows: Sequence[int] = range(len(batch))
            if levels:
                rows = [row for row in rows if row not in levels]
                outgoing.append(OutgoingBatch(self.topic, [batch.values[row] for row in rows],
                                              [_at(batch.keys, row) for row in rows],
                                              timestamps_ms=[_at(batch.timestamps_ms, row) for row in rows]))
            else:
                outgoing.append(OutgoingBatch(self.topic, batch.values, batch.keys,
                                              timestamps_ms=batch.timestamps_ms))
            places.append(rows)
            outgoing.append(OutgoingBatch(POSITIONS_TOPIC, [json.dumps(position).encode()],
                                          [f"{self.pipeline}/{self.name}".encode()]))
            places.append([_POSITION])
            resend = sorted(levels)
        for level in (1, 2):
            rows = [row for row in resend if levels[row] == level]
            if rows:
                letters = self._dead_letters(batch, rows, previous, reasons)
                outgoing.append(letters if level == 1 else truncated(letters, range(len(rows))))
                places.append(rows)
        return outgoing, places

    def _dead_letters(self, batch: SourceBatch, rows: list[int], previous: Any,
                      reasons: dict[int, str]) -> OutgoingBatch:
        """Dead letters of the records of ``batch`` at ``rows``, polled after ``previous``."""
        before = json.dumps(previous).encode()
        return OutgoingBatch(
            self.dead_letter_topic,
            [batch.values[row] for row in rows],
            [_at(batch.keys, row) for row in rows],
            [source_dead_letter_headers(
                self.pipeline, self.name, self.topic, _refusal(batch, row, reasons), before, row,
            ) for row in rows],
            [_at(batch.timestamps_ms, row) for row in rows],
        )


def _refusal(batch: SourceBatch, row: int, reasons: dict[int, str]) -> OversizeRecordError:
    """Why the record of ``batch`` at ``row`` was dead-lettered."""
    return OversizeRecordError(f"record of {len(batch.values[row])} bytes refused: {reasons[row]}")


def _at(column: list[Any], row: int) -> Any:
    """``column[row]``, or None when the column was left empty (no keys or no timestamps)."""
    return column[row] if column else None
