"""Clean-and-transform workload: parse → schema → validate → filter → SQL → produce, per event.

``streamflow`` runs it as a native processor stage on Arrow micro-batches (the stage's JSON parse,
then the ``schema``, ``validate``, ``filter`` and ``sql`` steps); ``faust`` runs the same work as a
Faust agent in a ``type: faust`` stage, one event at a time. Both read the core workload's
pre-loaded input; about 7% of its records break the humidity rule (dead-lettered) and about 5%
fail the pressure filter (filtered), the rest are produced with two derived fields.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from benchmarks.core import REQUIRED, TYPE_NAMES, compare, run_stage, schema_step
from streamflow.processing.steps import SchemaViolation
from streamflow.processing.validation import ValidationError

WORKLOAD = "parse-schema-validate-filter-sql-produce"
MAX_HUMIDITY = 85.0
DEVICE_PATTERN = r"sensor-\d{4}"
MIN_PRESSURE = 1000.0
DERIVE = "temperature * 1.8 + 32 AS temperature_f, humidity / 100 AS humidity_ratio"


def clean_steps() -> list[dict[str, Any]]:
    """The native stage's steps."""
    return [
        schema_step(),
        {"validate": {"humidity": {"min": 0, "max": MAX_HUMIDITY},
                      "device_id": {"regex": DEVICE_PATTERN}}},
        {"filter": f"pressure >= {MIN_PRESSURE}"},
        {"sql": f"SELECT *, {DERIVE} FROM batch"},
    ]


def typed(event: dict[str, Any]) -> dict[str, Any]:
    """The declared fields of ``event`` with their declared types, as the ``schema`` step keeps."""
    record = {}
    for field, kind in REQUIRED.items():
        value = event.get(field)
        if value is None:
            raise SchemaViolation(f"required field {field!r} is missing or null")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SchemaViolation(f"field {field!r} is not a {TYPE_NAMES[kind]}: {value!r}")
        record[field] = value
    return record


async def clean_agent(stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The native stage's work as a Faust agent body."""
    device_pattern = re.compile(DEVICE_PATTERN)
    async for event in stream:
        record = typed(event)
        if not 0 <= record["humidity"] <= MAX_HUMIDITY:
            raise ValidationError(f"field 'humidity' breaks rule max {MAX_HUMIDITY:g}")
        if not device_pattern.fullmatch(record["device_id"]):
            raise ValidationError(f"field 'device_id' breaks rule regex {DEVICE_PATTERN!r}")
        if record["pressure"] >= MIN_PRESSURE:
            yield {**record, "temperature_f": record["temperature"] * 1.8 + 32,
                   "humidity_ratio": record["humidity"] / 100}


def run_native(bootstrap: str, source: str, records: int, guarantee: str = "at_least_once") -> float:
    return run_stage(bootstrap, source, records, {"steps": clean_steps()}, guarantee=guarantee)


def run_faust(bootstrap: str, source: str, records: int) -> float:
    return run_stage(bootstrap, source, records,
                     {"type": "faust", "agent": "benchmarks.clean:clean_agent"})


def run_clean(records: int, repeat: int) -> list[dict[str, Any]]:
    return compare({"streamflow": run_native,
                    "streamflow-exactly-once": partial(run_native, guarantee="exactly_once"),
                    "faust": run_faust}, WORKLOAD, records, repeat)
