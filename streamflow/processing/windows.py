"""Event-time windows without Kafka: assignment, aggregation state, watermarks, sessions, snapshots.

:class:`PartitionWindows` holds the windows of one input partition. Records are added in offset
order; the watermark is the largest event time seen minus the allowed lateness, and a window is
closed once its end is at or below the watermark. Whether a record is late depends only on the
records before it in its partition, never on how they were batched, so replaying a partition
from a snapshot reproduces the same windows and the same aggregates.

Times are integer milliseconds since the epoch; windows are half-open ``[start, end)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streamflow.config.models import AggregateConfig, WindowConfig

SNAPSHOT_FORMAT = 2  # 1 held the input offset, which the stage core keeps now
Key = tuple[Any, ...]
_UNIT_MS = {"ms": 1, "s": 1000}
_JSON_SCALARS = (str, int, float, bool, type(None))
_NUMBERS = (int, float)


class WindowRecordError(ValueError):
    """A record the window cannot use: no usable event time, or a non-numeric aggregate field."""


class LateRecordError(Exception):
    """A record arrived after the watermark had closed one or more of its windows."""


class SnapshotError(ValueError):
    """A snapshot was taken with other window settings or by another streamflow format."""


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def iso_utc(ms: int) -> str:
    """``1700000000000`` → ``'2023-11-14T22:13:20.000Z'``."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_time_ms(value: Any, unit: str = "ms") -> int:
    """Epoch milliseconds of an event time: a number in ``unit``, an ISO-8601 string (UTC when it
    names no zone) or a datetime."""
    if isinstance(value, bool) or value is None:
        raise WindowRecordError(f"event time is {'missing' if value is None else 'a boolean'}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise WindowRecordError(f"event time {value} is not finite")
        return math.floor(value * _UNIT_MS[unit])
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise WindowRecordError(f"event time {value!r} is not ISO-8601") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return math.floor(value.timestamp() * 1000)
    raise WindowRecordError(f"event time {value!r} is neither a number nor a timestamp")


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (timestamps and other types become strings)."""
    if isinstance(value, _JSON_SCALARS):
        return value
    return json.loads(json.dumps(value, default=str))


def numeric(value: Any, name: str) -> float | int:
    """A finite number for a numeric aggregate, or :class:`WindowRecordError`."""
    if type(value) in _NUMBERS and math.isfinite(value):
        return value  # the common case, checked first
    if isinstance(value, bool) or not isinstance(value, int | float):
        shown = "missing" if value is None else f"{type(value).__name__} {value!r}"
        raise WindowRecordError(f"field {name!r} is {shown}, not a number")
    if not math.isfinite(value):
        raise WindowRecordError(f"field {name!r} is {value}, not a finite number")
    return value


# --- the quantile sketch ----------------------------------------------------------------------


class QuantileSketch:
    """A DDSketch: any quantile within ``accuracy`` relative error (values below 1e-9 in
    magnitude count as 0). Merging adds bucket counts, so neither the order of the values nor how
    they were split between sketches changes the answer. Buckets grow with the logarithm of the
    value range: about 1,000 per ten decades at 1 % accuracy."""

    MIN_MAGNITUDE = 1e-9

    def __init__(self, accuracy: float) -> None:
        self.accuracy = accuracy
        self.gamma = (1 + accuracy) / (1 - accuracy)
        self._log_gamma = math.log(self.gamma)
        self.positive: dict[int, int] = {}
        self.negative: dict[int, int] = {}
        self.zeros = 0
        self.count = 0

    def _index(self, magnitude: float) -> int:
        return math.ceil(math.log(magnitude) / self._log_gamma)

    def _value(self, index: int) -> float:
        return 2 * self.gamma**index / (self.gamma + 1)

    def add(self, value: float) -> None:
        self.count += 1
        if abs(value) < self.MIN_MAGNITUDE:
            self.zeros += 1
            return
        buckets = self.positive if value > 0 else self.negative
        index = self._index(abs(value))
        buckets[index] = buckets.get(index, 0) + 1

    def merge(self, other: QuantileSketch) -> None:
        for mine, theirs in ((self.positive, other.positive), (self.negative, other.negative)):
            for index, count in theirs.items():
                mine[index] = mine.get(index, 0) + count
        self.zeros += other.zeros
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """The value of rank ``floor(q * (count - 1))`` within the relative error; None if empty."""
        if not self.count:
            return None
        rank = math.floor(q * (self.count - 1))
        seen = 0
        for index in sorted(self.negative, reverse=True):
            seen += self.negative[index]
            if seen > rank:
                return -self._value(index)
        seen += self.zeros
        if seen > rank:
            return 0.0
        for index in sorted(self.positive):
            seen += self.positive[index]
            if seen > rank:
                return self._value(index)
        raise AssertionError("bucket counts do not add up to the sketch's count")

    def state(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "zeros": self.zeros, "count": self.count,
                "positive": sorted(self.positive.items()), "negative": sorted(self.negative.items())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuantileSketch:
        sketch = cls(state["accuracy"])
        sketch.positive = {int(index): count for index, count in state["positive"]}
        sketch.negative = {int(index): count for index, count in state["negative"]}
        sketch.zeros, sketch.count = state["zeros"], state["count"]
        return sketch


# --- aggregates -------------------------------------------------------------------------------


class Aggregate(ABC):
    """The running state of one aggregate over one window; mergeable and JSON-serialisable."""

    numeric = True  # the input value must be a number

    def __init__(self, spec: AggregateConfig) -> None:
        self.spec = spec

    @abstractmethod
    def add(self, value: Any, time_ms: int) -> None:
        """Take one record's value (already checked) with its event time."""

    @abstractmethod
    def merge(self, other: Any) -> None:
        """Absorb ``other`` (the same aggregate over other records)."""

    @abstractmethod
    def result(self) -> Any:
        """The aggregate's value for output."""

    @abstractmethod
    def state(self) -> Any:
        """A JSON value that :meth:`restore` turns back into this state."""

    @abstractmethod
    def restore(self, state: Any) -> None:
        """Load a state written by :meth:`state`."""


class Count(Aggregate):
    numeric = False

    def __init__(self, spec: AggregateConfig) -> None:
        super().__init__(spec)
        self.count = 0

    def add(self, value: Any, time_ms: int) -> None:
        self.count += 1

    def merge(self, other: Count) -> None:
        self.count += other.count

    def result(self) -> int:
        return self.count

    def state(self) -> int:
        return self.count

    def restore(self, state: int) -> None:
        self.count = state


class Sum(Aggregate):
    def __init__(self, spec: AggregateConfig) -> None:
        super().__init__(spec)
        self.total: float | int = 0

    def add(self, value: float, time_ms: int) -> None:
        self.total += value

    def merge(self, other: Sum) -> None:
        self.total += other.total

    def result(self) -> float | int:
        return self.total

    def state(self) -> float | int:
        return self.total

    def restore(self, state: float | int) -> None:
        self.total = state


class Mean(Aggregate):
    def __init__(self, spec: AggregateConfig) -> None:
        super().__init__(spec)
        self.total: float | int = 0
        self.count = 0

    def add(self, value: float, time_ms: int) -> None:
        self.total += value
        self.count += 1

    def merge(self, other: Mean) -> None:
        self.total += other.total
        self.count += other.count

    def result(self) -> float | None:
        return self.total / self.count if self.count else None

    def state(self) -> list[float | int]:
        return [self.total, self.count]

    def restore(self, state: list[float | int]) -> None:
        self.total, self.count = state[0], int(state[1])


class Extreme(Aggregate):
    """min or max."""

    def __init__(self, spec: AggregateConfig) -> None:
        super().__init__(spec)
        self.pick = min if spec.fn == "min" else max
        self.value: float | int | None = None

    def add(self, value: float, time_ms: int) -> None:
        self.value = value if self.value is None else self.pick(self.value, value)

    def merge(self, other: Extreme) -> None:
        if other.value is not None:
            self.add(other.value, 0)

    def result(self) -> float | int | None:
        return self.value

    def state(self) -> float | int | None:
        return self.value

    def restore(self, state: float | int | None) -> None:
        self.value = state


class Edge(Aggregate):
    """first or last: the value at the earliest or latest event time (ties: arrival order)."""

    numeric = False

    def __init__(self, spec: AggregateConfig) -> None:
        super().__init__(spec)
        self.first = spec.fn == "first"
        self.time_ms: int | None = None
        self.value: Any = None

    def add(self, value: Any, time_ms: int) -> None:
        if self.time_ms is None or (time_ms < self.time_ms if self.first else time_ms >= self.time_ms):
            self.time_ms, self.value = time_ms, value

    def merge(self, other: Edge) -> None:
        if other.time_ms is not None:
            self.add(other.value, other.time_ms)

    def result(self) -> Any:
        return self.value

    def state(self) -> list[Any]:
        return [self.time_ms, self.value]

    def restore(self, state: list[Any]) -> None:
        self.time_ms, self.value = state


class Quantile(Aggregate):
    def __init__(self, spec: AggregateConfig) -> None:
        super().__init__(spec)
        self.sketch = QuantileSketch(spec.accuracy)

    def add(self, value: float, time_ms: int) -> None:
        self.sketch.add(value)

    def merge(self, other: Quantile) -> None:
        self.sketch.merge(other.sketch)

    def result(self) -> float | None:
        assert self.spec.q is not None
        return self.sketch.quantile(self.spec.q)

    def state(self) -> dict[str, Any]:
        return self.sketch.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.sketch = QuantileSketch.from_state(state)


AGGREGATES: dict[str, type[Aggregate]] = {
    "count": Count, "sum": Sum, "mean": Mean, "min": Extreme, "max": Extreme,
    "first": Edge, "last": Edge, "quantile": Quantile,
}


def record_values(specs: Sequence[AggregateConfig], values: Sequence[Any]) -> list[Any]:
    """Each aggregate's input value from a record's field ``values`` (one per spec), checked."""
    return [
        numeric(value, spec.field or "") if AGGREGATES[spec.fn].numeric else jsonable(value)
        for spec, value in zip(specs, values, strict=True)
    ]


# --- windows ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Window:
    """One key's window ``[start, end)`` with its aggregates."""

    key: Key
    start: int
    end: int
    aggregates: list[Aggregate]
    changed: bool = field(default=True)


@dataclass(frozen=True)
class Added:
    """What became of one record: aggregated into some window, and the windows it missed."""

    aggregated: bool
    missed: list[tuple[int, int]]


def spec_fingerprint(config: WindowConfig) -> str:
    """A hash of the settings a snapshot's windows depend on."""
    shape = config.model_dump(mode="json", include={
        "kind", "size_s", "hop_s", "gap_s", "time_field", "time_unit", "key", "aggregates",
    })
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


class PartitionWindows:
    """The open windows of one input partition, and the watermark they reached."""

    def __init__(self, config: WindowConfig, partition: int) -> None:
        self.config = config
        self.partition = partition
        self.specs = list(config.aggregates.values())
        self.lateness_ms = to_ms(config.allowed_lateness_s)
        if config.kind == "session":
            assert config.gap_s is not None
            self.gap_ms = to_ms(config.gap_s)
        else:
            assert config.size_s is not None
            self.size_ms = to_ms(config.size_s)
            self.hop_ms = to_ms(config.hop_s) if config.hop_s is not None else self.size_ms
        self.max_time: int | None = None
        self.open: dict[Key, dict[int, Window]] = {}  # key → start → window

    @property
    def watermark(self) -> int | None:
        return None if self.max_time is None else self.max_time - self.lateness_ms

    def _closed(self, end: int) -> bool:
        watermark = self.watermark
        return watermark is not None and end <= watermark

    def _new_window(self, key: Key, start: int, end: int) -> Window:
        return Window(key, start, end, [AGGREGATES[spec.fn](spec) for spec in self.specs])

    def window_bounds(self, time_ms: int) -> list[tuple[int, int]]:
        """The ``[start, end)`` of every tumbling or hopping window holding ``time_ms``."""
        size, hop = self.size_ms, self.hop_ms
        first = ((time_ms - size) // hop + 1) * hop
        return [(start, start + size) for start in range(first, time_ms // hop * hop + 1, hop)]

    def add(self, key: Key, time_ms: int, values: Sequence[Any]) -> Added:
        """Aggregate one record (values checked by :func:`record_values`) into its open windows."""
        if self.max_time is None or time_ms > self.max_time:
            self.max_time = time_ms
        watermark = self.max_time - self.lateness_ms
        if self.config.kind == "session":
            return self._add_to_session(key, time_ms, values, watermark)
        missed, aggregated = [], False
        windows = self.open.get(key)
        if windows is None:
            windows = self.open[key] = {}
        for start, end in self.window_bounds(time_ms):
            if end <= watermark:  # closed
                missed.append((start, end))
                continue
            window = windows.get(start)
            if window is None:
                window = windows[start] = self._new_window(key, start, end)
            self._aggregate(window, time_ms, values)
            aggregated = True
        if not windows:
            del self.open[key]
        return Added(aggregated, missed)

    def _aggregate(self, window: Window, time_ms: int, values: Sequence[Any]) -> None:
        for aggregate, value in zip(window.aggregates, values, strict=True):
            aggregate.add(value, time_ms)
        window.changed = True

    def _add_to_session(self, key: Key, time_ms: int, values: Sequence[Any],
                        watermark: int) -> Added:
        """Sessions are ``[first event, last event + gap)``; a record joins (and so merges)
        every open session its own ``[time, time + gap)`` overlaps."""
        start, end = time_ms, time_ms + self.gap_ms
        sessions = self.open.setdefault(key, {})
        overlapping = sorted(
            (s for s in sessions.values() if s.end > watermark and s.start < end and s.end > start),
            key=lambda s: s.start,
        )
        if not overlapping and end <= watermark:
            if not sessions:
                del self.open[key]
            return Added(False, [(start, end)])
        merged = self._new_window(key, start, end)
        for session in overlapping:
            del sessions[session.start]
            merged.start, merged.end = min(merged.start, session.start), max(merged.end, session.end)
            for mine, theirs in zip(merged.aggregates, session.aggregates, strict=True):
                mine.merge(theirs)
        self._aggregate(merged, time_ms, values)
        sessions[merged.start] = merged
        return Added(True, [])

    def emit(self) -> list[Window]:
        """Remove the windows the watermark closed and return those to emit now: the closed ones
        (``emit: final``) or every window changed since the last call (``emit: update``)."""
        closed: list[Window] = []
        changed: list[Window] = []
        for key in list(self.open):
            windows = self.open[key]
            for start in list(windows):
                window = windows[start]
                if window.changed:
                    changed.append(window)
                    window.changed = False
                if self._closed(window.end):
                    closed.append(window)
                    del windows[start]
            if not windows:
                del self.open[key]
        emitted = closed if self.config.emit == "final" else changed
        return sorted(emitted, key=lambda w: (w.end, w.start, json.dumps(w.key, default=str)))

    def window_count(self) -> int:
        return sum(len(windows) for windows in self.open.values())

    def to_bytes(self) -> bytes:
        """A compressed JSON snapshot of this partition's windows and watermark."""
        document = {
            "format": SNAPSHOT_FORMAT, "spec": spec_fingerprint(self.config),
            "max_time": self.max_time,
            "windows": [[list(w.key), w.start, w.end, [a.state() for a in w.aggregates]]
                        for windows in self.open.values() for w in windows.values()],
        }
        return zlib.compress(json.dumps(document, separators=(",", ":")).encode(), 1)

    @classmethod
    def from_bytes(cls, config: WindowConfig, partition: int, data: bytes) -> PartitionWindows:
        """Restore a snapshot written by :meth:`to_bytes` with the same window settings."""
        try:
            document = json.loads(zlib.decompress(data))
        except (zlib.error, ValueError) as exc:
            raise SnapshotError(f"not a window snapshot: {exc}") from exc
        if document.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"snapshot format {document.get('format')}, expected {SNAPSHOT_FORMAT}")
        if document["spec"] != spec_fingerprint(config):
            raise SnapshotError("the window settings changed since the snapshot was taken")
        state = cls(config, partition)
        state.max_time = document["max_time"]
        for key, start, end, aggregates in document["windows"]:
            window = state._new_window(tuple(key), start, end)
            window.changed = False
            for aggregate, saved in zip(window.aggregates, aggregates, strict=True):
                aggregate.restore(saved)
            state.open.setdefault(window.key, {})[start] = window
        return state


def window_record(config: WindowConfig, window: Window) -> dict[str, Any]:
    """The output record of a window: key fields, window bounds (ISO-8601 UTC), aggregates."""
    record: dict[str, Any] = dict(zip(config.key, window.key, strict=True))
    record["window_start"] = iso_utc(window.start)
    record["window_end"] = iso_utc(window.end)
    for name, aggregate in zip(config.aggregates, window.aggregates, strict=True):
        value = aggregate.result()
        record[name] = None if isinstance(value, float) and not math.isfinite(value) else value
    return record
