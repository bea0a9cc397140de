"""Synthetic IoT sensor events: seeded, rate-limited, optionally with malformed records.

Record ``i`` depends only on the seed and ``i``, so a resumed run emits exactly the records an
uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
import time

from pydantic import BaseModel, ConfigDict, Field

from streamflow.plugins import ComponentContext, Source, SourceBatch


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(None, ge=0, description="records to emit; unbounded when absent")
    rate: float = Field(1000.0, ge=0, description="records per second; 0 means as fast as possible")
    seed: int = 42
    devices: int = Field(20, ge=1, le=100_000)
    malformed_fraction: float = Field(0.0, ge=0, le=1)
    start_ms: int = Field(1_735_689_600_000, description="event time of record 0 (epoch ms)")
    interval_ms: int = Field(100, ge=0, description="event-time step between records")


MALFORMED_KINDS = ("truncated", "not_json", "missing_device", "bad_type", "not_object")


def sensor_event(config: GeneratorConfig, index: int) -> tuple[bytes, bytes]:
    """Key and value of record ``index``."""
    rng = random.Random(config.seed * 1_000_003 + index)
    device = f"sensor-{index % config.devices:04d}"
    humidity = rng.uniform(20, 90)
    pressure = rng.gauss(1013, 8)
    event = {
        "device_id": device,
        "ts": config.start_ms + index * config.interval_ms,
        "humidity": round(humidity, 3),
        "pressure": round(pressure, 3),
        "battery": round(rng.uniform(3.0, 4.2), 3),
        "temperature": round(5 + 0.25 * humidity - 0.05 * (pressure - 1013) + rng.gauss(0, 0.5), 3),
    }
    if rng.random() < config.malformed_fraction:
        kind = rng.choice(MALFORMED_KINDS)
        if kind == "truncated":
            return device.encode(), json.dumps(event).encode()[:25]
        if kind == "not_json":
            return device.encode(), b"\x00\xffgarbage"
        if kind == "missing_device":
            del event["device_id"]
        elif kind == "bad_type":
            event["temperature"] = "n/a"
        else:
            return device.encode(), json.dumps([event]).encode()
    return device.encode(), json.dumps(event, separators=(",", ":")).encode()


class GeneratorSource(Source[GeneratorConfig]):
    """Emits :func:`sensor_event` records ``0, 1, 2, ...`` at ``rate`` per second."""

    config_model = GeneratorConfig

    def __init__(self, config: GeneratorConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._next = 0
        self._started = time.monotonic()
        self._emitted_since_start = 0

    def open(self, position: int | None) -> None:
        self._next = int(position or 0)
        self._started = time.monotonic()
        self._emitted_since_start = 0

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch | None:
        remaining = max_records
        if self.config.count is not None:
            remaining = min(remaining, self.config.count - self._next)
            if remaining <= 0:
                return None
        if self.config.rate > 0:
            due = int((time.monotonic() - self._started) * self.config.rate)
            allowed = due - self._emitted_since_start
            if allowed <= 0:
                time.sleep(min(timeout_s, 1 / self.config.rate))
                return SourceBatch([])
            remaining = min(remaining, allowed)
        keys, values = [], []
        for index in range(self._next, self._next + remaining):
            key, value = sensor_event(self.config, index)
            keys.append(key)
            values.append(value)
        self._next += remaining
        self._emitted_since_start += remaining
        # The event time is the record's "ts" field; the Kafka timestamp is when it was emitted.
        return SourceBatch(values, keys)

    def position(self) -> int:
        return self._next
