"""The clean workload's rules in plain Python (standard library only), shared by the peer apps
and by the output check: parse, required typed fields, humidity and device rules (dead letter),
pressure filter (dropped), two derived fields. Mirrors ``benchmarks.clean``'s native steps."""

from __future__ import annotations

import json
import re
from typing import Any

REQUIRED: dict[str, type] = {"device_id": str, "ts": int, "temperature": float, "humidity": float,
                             "pressure": float}
LATENCY_FIELD = "sent_us"  # the latency workload's send time, microseconds since the epoch
MAX_HUMIDITY = 85.0
DEVICE = re.compile(r"sensor-\d{4}")
MIN_PRESSURE = 1000.0


def fields(latency: bool = False) -> dict[str, type]:
    """The declared fields, with the latency workload's send time when ``latency``."""
    return {**REQUIRED, LATENCY_FIELD: int} if latency else dict(REQUIRED)


def clean(value: bytes, declared: dict[str, type] = REQUIRED) -> tuple[str, dict[str, Any] | None]:
    """``("out", record)``, ``("dlq", None)`` for a record breaking a rule, or ``("filtered", None)``."""
    try:
        event = json.loads(value)
    except ValueError:
        return "dlq", None
    if not isinstance(event, dict):
        return "dlq", None
    record: dict[str, Any] = {}
    for name, kind in declared.items():
        field = event.get(name)
        if kind is float and isinstance(field, int) and not isinstance(field, bool):
            field = float(field)
        if not isinstance(field, kind) or isinstance(field, bool):
            return "dlq", None
        record[name] = field
    if not 0 <= record["humidity"] <= MAX_HUMIDITY or not DEVICE.fullmatch(record["device_id"]):
        return "dlq", None
    if record["pressure"] < MIN_PRESSURE:
        return "filtered", None
    record["temperature_f"] = record["temperature"] * 1.8 + 32
    record["humidity_ratio"] = record["humidity"] / 100
    return "out", record
