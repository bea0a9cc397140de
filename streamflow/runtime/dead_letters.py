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


def dead_letter_headers(
    pipeline: str, stage: str, failure: Failure, batch: ConsumedBatch
) -> Headers:
    """Headers naming the stage, step, error class and message, and the record's origin."""
    row = failure.row
    message = str(failure.error).encode("utf-8", "replace")[:MAX_MESSAGE_BYTES]
    return [
        (f"{HEADER_PREFIX}pipeline", pipeline.encode()),
        (f"{HEADER_PREFIX}stage", stage.encode()),
        (f"{HEADER_PREFIX}step", failure.step.encode()),
        (f"{HEADER_PREFIX}error.class", type(failure.error).__name__.encode()),
        (f"{HEADER_PREFIX}error.message", message),
        (f"{HEADER_PREFIX}original.topic", batch.topics[row].encode()),
        (f"{HEADER_PREFIX}original.partition", str(batch.partitions[row]).encode()),
        (f"{HEADER_PREFIX}original.offset", str(batch.offsets[row]).encode()),
    ]


def dead_letter_batch(
    topic: str, pipeline: str, stage: str, failures: list[Failure], batch: ConsumedBatch
) -> OutgoingBatch:
    """The original records of ``failures``, addressed to the dead-letter ``topic``."""
    return OutgoingBatch(
        topic=topic,
        values=[batch.values[f.row] or b"" for f in failures],
        keys=[batch.keys[f.row] for f in failures],
        headers=[dead_letter_headers(pipeline, stage, f, batch) for f in failures],
        timestamps_ms=[batch.timestamps_ms[f.row] for f in failures],
    )
