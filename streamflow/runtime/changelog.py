"""The changelog of a stage's per-partition state: one compacted topic, keyed by input partition.

Each record holds a partition's snapshot: the first input offset its states do not hold yet,
and the bytes each :class:`~streamflow.plugins.PartitionedState` of the stage gave for it, by
the state's name (``windows``, or ``<step index>:<step name>``).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass

from streamflow.transport import Transport, read_until

SNAPSHOT_FORMAT = 2  # 1: window state alone (streamflow before the stage core kept any state)
READ_TIMEOUT_S = 30.0


class ChangelogFormatError(ValueError):
    """A changelog record that is not a snapshot of this format."""


@dataclass
class PartitionSnapshot:
    """A partition's states and the first input offset they do not hold."""

    next_offset: int
    states: dict[str, bytes]

    def to_bytes(self, topic: str, partition: int) -> bytes:
        document = {
            "format": SNAPSHOT_FORMAT, "topic": topic, "partition": partition,
            "next_offset": self.next_offset,
            "states": {name: base64.b64encode(data).decode() for name, data in self.states.items()},
        }
        return zlib.compress(json.dumps(document, separators=(",", ":")).encode(), 1)

    @classmethod
    def from_bytes(cls, data: bytes) -> PartitionSnapshot:
        try:
            document = json.loads(zlib.decompress(data))
            if document.get("format") != SNAPSHOT_FORMAT:
                raise ChangelogFormatError(
                    f"snapshot format {document.get('format')}, expected {SNAPSHOT_FORMAT}")
            return cls(int(document["next_offset"]),
                       {name: base64.b64decode(text) for name, text in document["states"].items()})
        except (zlib.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChangelogFormatError(f"not a state snapshot: {exc}") from exc


def read_latest(transport: Transport, topic: str) -> dict[int, bytes]:
    """The last value of each partition's key in the changelog ``topic``: the compacted view."""
    latest: dict[bytes, bytes] = {}
    for batch in read_until(transport, {(topic, 0): None}, timeout_s=READ_TIMEOUT_S):
        latest.update((key, value) for key, value in zip(batch.keys, batch.values, strict=True)
                      if key is not None and value is not None)
    return {int(key): value for key, value in latest.items() if key.isdigit()}
