"""Transactional ids of this process's exactly-once stages: ``<group>.<process>-<slot>``.

A stage restarted by the supervisor takes the slot its predecessor released, so its producer's
``init_transactions`` aborts the predecessor's open transaction at once. With a new id, that
transaction would stay open until the broker timed it out (``transaction.timeout.ms``, 60 s by
default), holding back every ``read_committed`` reader of the partitions it wrote to, and the
group's next fetch of the offsets it sent. Replicas in other processes have ids of their own:
zombies among them are fenced by the consumer-group generation sent with the offsets (KIP-447).
"""

from __future__ import annotations

import threading
import uuid

_PROCESS = uuid.uuid4().hex[:12]
_lock = threading.Lock()
_taken: set[tuple[str, int]] = set()


def take(group_id: str) -> tuple[str, int]:
    """A transactional id for a stage of ``group_id``, and its slot (to :func:`release`)."""
    with _lock:
        slot = 0
        while (group_id, slot) in _taken:
            slot += 1
        _taken.add((group_id, slot))
    return f"{group_id}.{_PROCESS}-{slot}", slot


def release(group_id: str, slot: int) -> None:
    """Give the slot back once the stage's producer is closed."""
    with _lock:
        _taken.discard((group_id, slot))
