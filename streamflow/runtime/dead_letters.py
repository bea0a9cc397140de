"""Dead letters: failed records keep their key, value and headers and gain headers saying why
and where (``streamflow.*``, which replace any of that name the record had).

A record Kafka refuses for its size (over the client's or the broker's limit) is a dead letter
too. When the dead-letter topic refuses it as well, a truncated copy goes there instead: value
and key cut to :data:`TRUNCATED_BYTES`, with ``streamflow.original.size`` (the value's size) and
``streamflow.truncated`` headers besides those saying where the record came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamflow.transport import ConsumedBatch, OutgoingBatch
from streamflow.transport.base import Headers

HEADER_PREFIX = "streamflow."
MAX_MESSAGE_BYTES = 2000
TRUNCATED_BYTES = 65_536
PRODUCE_STEP = "produce"  # the step named by dead letters of records Kafka refused


class OversizeRecordError(Exception):
    """Kafka refused a record for its size."""


@dataclass
class OutputBatch(OutgoingBatch):
    """Output records with ``rows``: the consumed record each came from, dead-lettered in its
    place when Kafka refuses the output record for its size."""

    rows: Sequence[int] = ()


@dataclass(frozen=True)
class Failure:
    """One record that failed: its row in the consumed batch, the step and the error."""

    row: int
    step: str
    error: BaseException


HEADER_NAMES = (  # of the headers dead letters gain, after HEADER_PREFIX
    "pipeline", "stage", "step", "error.class", "error.message",
    "original.topic", "original.partition", "original.offset",
    "source.position", "source.index", "original.size", "truncated",
)
(_PIPELINE, _STAGE, _STEP, _CLASS, _MESSAGE, _TOPIC, _PARTITION, _OFFSET, _SOURCE_POSITION,
 _SOURCE_INDEX, _SIZE, _TRUNCATED) = (f"{HEADER_PREFIX}{name}" for name in HEADER_NAMES)
TRUNCATED_HEADER = _TRUNCATED


def original_headers(headers: Headers | None) -> Headers:
    """The headers of ``headers`` that are not streamflow's own (``streamflow.*``)."""
    return [(name, value) for name, value in headers or () if not name.startswith(HEADER_PREFIX)]


def dead_letter_headers(
    pipeline: str, stage: str, failure: Failure, batch: ConsumedBatch
) -> Headers:
    """The record's own headers, then headers naming the stage, step, error class and message,
    and the record's origin."""
    row, error = failure.row, failure.error
    return [
        *original_headers(batch.headers[row] if batch.headers else None),
        (_PIPELINE, pipeline.encode()),
        (_STAGE, stage.encode()),
        (_STEP, failure.step.encode()),
        (_CLASS, type(error).__name__.encode()),
        (_MESSAGE, str(error).encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]),
        (_TOPIC, batch.topics[row].encode()),
        (_PARTITION, b"%d" % batch.partitions[row]),
        (_OFFSET, b"%d" % batch.offsets[row]),
    ]


def dead_letter_batch(
    topic: str, pipeline: str, stage: str, failures: list[Failure], batch: ConsumedBatch
) -> OutgoingBatch:
    """The original records of ``failures``, addressed to the dead-letter ``topic``."""
    rows = [failure.row for failure in failures]
    return OutgoingBatch(
        topic=topic,
        values=[batch.values[row] or b"" for row in rows],
        keys=list(map(batch.keys.__getitem__, rows)),
        headers=[dead_letter_headers(pipeline, stage, failure, batch) for failure in failures],
        timestamps_ms=list(map(batch.timestamps_ms.__getitem__, rows)),
    )


def source_dead_letter_headers(
    pipeline: str, source: str, topic: str, error: BaseException, position: bytes, index: int
) -> Headers:
    """Headers for a record ``source`` could not publish to ``topic``: it is the ``index``-th
    record polled after ``position`` (the JSON of the source's position before its batch)."""
    return [
        (_PIPELINE, pipeline.encode()),
        (_STAGE, source.encode()),
        (_STEP, PRODUCE_STEP.encode()),
        (_CLASS, type(error).__name__.encode()),
        (_MESSAGE, str(error).encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]),
        (_TOPIC, topic.encode()),
        (_SOURCE_POSITION, position),
        (_SOURCE_INDEX, b"%d" % index),
    ]


def truncated(batch: OutgoingBatch, indices: Sequence[int]) -> OutgoingBatch:
    """The records of ``batch`` at ``indices``, each value and key cut to :data:`TRUNCATED_BYTES`
    and its headers extended with its value's original size and a truncation mark."""
    records = list(batch.records())
    values, keys, headers, timestamps = [], [], [], []
    for index in indices:
        value, key, record_headers, timestamp = records[index]
        values.append(value[:TRUNCATED_BYTES])
        keys.append(None if key is None else key[:TRUNCATED_BYTES])
        headers.append([*(record_headers or []), (_SIZE, b"%d" % len(value)), (_TRUNCATED, b"true")])
        timestamps.append(timestamp)
    return OutgoingBatch(batch.topic, values, keys, headers, timestamps)


def truncated_refused(batches: Sequence[OutgoingBatch], refused: Sequence[tuple[int, int]]
                      ) -> list[OutgoingBatch]:
    """Truncated copies of the ``refused`` (batch, record) records of ``batches``."""
    by_batch: dict[int, list[int]] = {}
    for number, index in refused:
        by_batch.setdefault(number, []).append(index)
    return [truncated(batches[number], indices) for number, indices in by_batch.items()]
