"""The latest dead letters a pipeline produced, kept for the dashboard in a bounded buffer.

Stages and sources hand over each batch of dead letters once Kafka took it. Only the newest
:data:`CAPACITY` records of a batch are looked at, and of each only a preview of the value and
key is kept, so the cost per batch and the memory stay bounded however many records fail.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from streamflow.transport import OutgoingBatch

CAPACITY = 50
PREVIEW_BYTES = 1024


@dataclass(frozen=True)
class DeadLetter:
    """A preview of one dead letter, numbered in the order it was kept."""

    number: int
    time: float  # unix seconds: the record's timestamp, else when it was kept
    topic: str
    key: bytes | None
    value: bytes  # the first PREVIEW_BYTES
    size: int  # of the whole value
    headers: tuple[tuple[str, bytes], ...]


def _text(data: bytes, mask: Callable[[str], str]) -> str:
    return mask(data.decode("utf-8", "replace"))


class LatestDeadLetters:
    """The newest ``capacity`` dead letters of a pipeline, safe to add to from any thread."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._lock = threading.Lock()
        self._letters: deque[DeadLetter] = deque(maxlen=capacity)
        self.count = 0  # dead letters kept so far, the last one's number

    def add(self, batches: Iterable[OutgoingBatch]) -> None:
        """Keep previews of the records of ``batches``, produced to their dead-letter topic."""
        capacity = self._letters.maxlen or 0
        now = time.time()
        previews = []
        for batch in batches:
            for index in range(max(len(batch.values) - capacity, 0), len(batch.values)):
                value, key, headers, timestamp_ms = batch.record(index)
                previews.append((
                    timestamp_ms / 1000 if timestamp_ms else now, batch.topic,
                    None if key is None else key[:PREVIEW_BYTES], value[:PREVIEW_BYTES],
                    len(value), tuple(headers or ()),
                ))
        with self._lock:
            for preview in previews[-capacity:]:
                self.count += 1
                self._letters.append(DeadLetter(self.count, *preview))

    def document(self, after: int = 0, mask: Callable[[str], str] = str) -> dict[str, Any]:
        """JSON-ready: the letters numbered above ``after``, newest first, with their headers,
        key and value as text (undecodable bytes replaced, then ``mask`` applied: it hides
        secrets), and ``count``, the newest number."""
        with self._lock:
            letters = [letter for letter in self._letters if letter.number > after]
            count = self.count
        return {"count": count, "letters": [{
            "number": letter.number,
            "time": round(letter.time, 3),
            "topic": letter.topic,
            "key": None if letter.key is None else _text(letter.key, mask),
            "value": _text(letter.value, mask),
            "size": letter.size,
            "truncated": letter.size > len(letter.value),
            "headers": [[name, _text(value, mask)] for name, value in letter.headers],
        } for letter in reversed(letters)]}
