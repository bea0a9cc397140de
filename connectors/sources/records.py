"""Helpers shared by sources: JSON records, record keys, and acknowledgement tracking."""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any, Generic, TypeVar

ItemT = TypeVar("ItemT")


def encode_record(document: Any) -> bytes:
    """Compact JSON bytes of one record."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def record_key(document: Any, key_field: str | None) -> bytes | None:
    """The value of ``key_field`` in a JSON object as the Kafka key; None when absent."""
    if key_field is None or not isinstance(document, dict):
        return None
    key = document.get(key_field)
    return None if key is None else str(key).encode()


class AckTracker(Generic[ItemT]):
    """Items handed to the runtime in order, released once Kafka acknowledged them.

    Sources without a replayable position (webhooks, MQTT) use the count of items polled so far
    as their position: :meth:`release` returns every item polled before such a count.
    """

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()
        self._unacknowledged: deque[tuple[int, ItemT]] = deque()
        self.polled_count = start

    def polled(self, item: ItemT) -> None:
        """Record that ``item`` was just returned by ``poll``."""
        with self._lock:
            self._unacknowledged.append((self.polled_count, item))
            self.polled_count += 1

    def release(self, position: int) -> list[ItemT]:
        """Items polled before ``position``, oldest first, now acknowledged."""
        released: list[ItemT] = []
        with self._lock:
            while self._unacknowledged and self._unacknowledged[0][0] < position:
                released.append(self._unacknowledged.popleft()[1])
        return released

    def drain(self) -> list[ItemT]:
        """Every item still unacknowledged (on close)."""
        with self._lock:
            items = [item for _, item in self._unacknowledged]
            self._unacknowledged.clear()
        return items
