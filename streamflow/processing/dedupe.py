"""The ``dedupe`` step: drop repeats of a key seen within a time window, in bounded memory."""

from __future__ import annotations

import json
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from streamflow.plugins import (
    PARTITION_COLUMN,
    ComponentContext,
    PartitionedState,
    Processor,
    StepResult,
)


class DedupeConfig(BaseModel):
    """Settings of a ``dedupe`` step."""

    model_config = ConfigDict(extra="forbid")

    key: list[str] = Field(min_length=1, description="the field or fields identifying a record")
    window_s: float = Field(gt=0, description="a key seen again within this many seconds repeats")
    time_field: str | None = Field(
        None, description="event-time field (timestamp, or epoch number in time_unit); "
        "default: processing time"
    )
    time_unit: Literal["s", "ms"] = Field("ms", description="unit of numeric time_field values")
    max_keys: int = Field(100_000, ge=1, description="keys remembered per partition; the oldest go first")

    @field_validator("key", mode="before")
    @classmethod
    def _one_or_more(cls, key: Any) -> Any:
        return [key] if isinstance(key, str) else key


class MissingTimeError(ValueError):
    """A record has no value in the dedupe step's event-time field."""


@dataclass
class _SeenKeys:
    """The keys one partition saw within the window: key → first time seen (s), oldest first."""

    first_seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    latest: float = float("-inf")


def _key(values: tuple[Any, ...]) -> str:
    """A record's key as JSON text: equal for equal values, and what snapshots hold."""
    return json.dumps(values, separators=(",", ":"), sort_keys=True, default=str)


class DedupeStep(Processor[DedupeConfig], PartitionedState):
    """Passes the first record of each key and filters its repeats until ``window_s`` after it.

    State is per input partition (records with one key share a partition when their producer
    keyed them by it), checkpointed and restored by the stage like any
    :class:`~streamflow.plugins.PartitionedState`: a restart or a rebalance neither forgets a
    key nor lets a repeat through. Keys expire after the window (measured on the latest time the
    partition saw), and beyond ``max_keys`` per partition the keys first seen longest ago are
    forgotten. Rows without a partition (a step run outside a stage) count as partition 0.
    """

    name = "dedupe"
    config_model = DedupeConfig

    def __init__(self, config: DedupeConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.partitions: dict[int, _SeenKeys] = {}

    def process(self, table: pa.Table) -> StepResult:
        times, failures = self._times(table)
        keys = zip(*(
            table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
            for name in self.config.key
        ), strict=True)
        partitions = (table.column(PARTITION_COLUMN).to_pylist()
                      if PARTITION_COLUMN in table.column_names else [0] * table.num_rows)
        keep = np.zeros(table.num_rows, dtype=bool)
        window = self.config.window_s
        failed = {row for row, _error in failures}
        touched = set()
        for row, (key, partition) in enumerate(zip(keys, partitions, strict=True)):
            if row in failed:
                continue
            seen = self.partitions.get(partition)
            if seen is None:
                seen = self.partitions[partition] = _SeenKeys()
            touched.add(partition)
            now, text = times[row], _key(key)
            first = seen.first_seen.get(text)
            if first is not None and abs(now - first) < window:
                continue
            keep[row] = True
            seen.first_seen[text] = now
            seen.first_seen.move_to_end(text)
            seen.latest = max(seen.latest, now)
        for partition in touched:
            self._forget(self.partitions[partition])
        return StepResult(table.filter(pa.array(keep)), failures)

    def restore(self, partition: int, snapshot: bytes | None) -> None:
        if snapshot is None:
            self.partitions[partition] = _SeenKeys()
            return
        try:
            document = json.loads(zlib.decompress(snapshot))
            latest = document["latest"]
            seen = _SeenKeys(OrderedDict((str(key), float(time_s))
                                         for key, time_s in document["keys"]),
                             float("-inf") if latest is None else float(latest))
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a dedupe snapshot: {exc}") from exc
        self.partitions[partition] = seen

    def snapshot(self, partition: int) -> bytes:
        seen = self.partitions.get(partition) or _SeenKeys()
        latest = seen.latest if seen.first_seen else None  # JSON has no -Infinity
        return zlib.compress(json.dumps({"keys": list(seen.first_seen.items()),
                                         "latest": latest}).encode())

    def revoke(self, partition: int) -> None:
        self.partitions.pop(partition, None)

    def _times(self, table: pa.Table) -> tuple[np.ndarray, list[tuple[int, BaseException]]]:
        """Each record's time in seconds, and failures for records without one."""
        field = self.config.time_field
        if field is None:
            return np.full(table.num_rows, time.time()), []
        if field not in table.column_names:
            raise MissingTimeError(f"dedupe: the batch has no time field {field!r}")
        column = table.column(field)
        if pa.types.is_timestamp(column.type):
            seconds = pc.divide(pc.cast(pc.cast(column, pa.timestamp("us")), pa.int64()), 1e6)
        elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            per_second = 1000.0 if self.config.time_unit == "ms" else 1.0
            seconds = pc.divide(pc.cast(column, pa.float64()), per_second)
        elif pa.types.is_null(column.type):
            seconds = pa.nulls(table.num_rows, pa.float64())
        else:
            raise TypeError(f"dedupe: time field {field!r} is {column.type}; use a timestamp "
                            "(schema type: timestamp) or an epoch number")
        missing = pc.indices_nonzero(pc.is_null(seconds)).to_pylist()
        failures: list[tuple[int, BaseException]] = [
            (row, MissingTimeError(f"dedupe: time field {field!r} is missing or null"))
            for row in missing
        ]
        return pc.fill_null(seconds, 0.0).to_numpy(zero_copy_only=False), failures

    def _forget(self, seen: _SeenKeys) -> None:
        """Drop keys past the window and the least recently seen beyond ``max_keys``."""
        horizon = seen.latest - self.config.window_s
        first_seen = seen.first_seen
        while first_seen and (
            len(first_seen) > self.config.max_keys
            or next(iter(first_seen.values())) <= horizon
        ):
            first_seen.popitem(last=False)
