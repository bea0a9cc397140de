"""The ``dedupe`` step: drop repeats of a key seen within a time window, in bounded memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from streamflow.plugins import ComponentContext, Processor, StepResult


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
    max_keys: int = Field(100_000, ge=1, description="keys remembered; the oldest go first")

    @field_validator("key", mode="before")
    @classmethod
    def _one_or_more(cls, key: Any) -> Any:
        return [key] if isinstance(key, str) else key


class MissingTimeError(ValueError):
    """A record has no value in the dedupe step's event-time field."""


class DedupeStep(Processor[DedupeConfig]):
    """Passes the first record of each key and filters its repeats until ``window_s`` after it.

    State is per stage replica and in memory: keys expire after the window (measured on the
    latest time seen) and beyond ``max_keys`` the keys first seen longest ago are forgotten.
    """

    name = "dedupe"
    config_model = DedupeConfig

    def __init__(self, config: DedupeConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.first_seen: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        self.latest = float("-inf")

    def process(self, table: pa.Table) -> StepResult:
        times, failures = self._times(table)
        keys = zip(*(
            table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
            for name in self.config.key
        ), strict=True)
        keep = np.zeros(table.num_rows, dtype=bool)
        window = self.config.window_s
        failed = {row for row, _error in failures}
        for row, key in enumerate(keys):
            if row in failed:
                continue
            now = times[row]
            seen = self.first_seen.get(key)
            if seen is not None and abs(now - seen) < window:
                continue
            keep[row] = True
            self.first_seen[key] = now
            self.first_seen.move_to_end(key)
            self.latest = max(self.latest, now)
        self._forget()
        return StepResult(table.filter(pa.array(keep)), failures)

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

    def _forget(self) -> None:
        """Drop keys past the window and the least recently seen beyond ``max_keys``."""
        horizon = self.latest - self.config.window_s
        while self.first_seen and (
            len(self.first_seen) > self.config.max_keys
            or next(iter(self.first_seen.values())) <= horizon
        ):
            self.first_seen.popitem(last=False)
