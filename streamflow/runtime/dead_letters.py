"""Dead letters: failed records keep their key and value and gain headers saying why and where."""

from __future__ import annotations

from dataclasses import dataclass

from streamflow.transport import ConsumedBatch, OutgoingBatch
from streamflow.transport.base import Headers

HEADER_PREFIX = "streamflow."
MAX_MESSAGE_BYTES = 2000


@dataclass(frozen=True)
class Failure:
    """One record that failed: its row in the consumed batch, the step and the error."""

    row: int
    step: str
    error: BaseException


_PIPELINE, _STAGE, _STEP, _CLASS, _MESSAGE, _TOPIC, _PARTITION, _OFFSET = (
    f"{HEADER_PREFIX}{name}" for name in (
        "pipeline", "stage", "step", "error.class", "error.message",
        "original.topic", "original.partition", "original.offset",
    )
)


def dead_letter_headers(
    pipeline: str, stage: str, failure: Failure, batch: ConsumedBatch
) -> Headers:
    """Headers naming the stage, step, error class and message, and the record's origin."""
    row, error = failure.row, failure.error
    return [
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
