"""Clean-and-transform workload: parse → schema → validate → filter → SQL → produce, per event.

``streamflow`` runs it as a native processor stage on Arrow micro-batches (the stage's JSON parse,
then the ``schema``, ``validate``, ``filter`` and ``sql`` steps); ``faust`` runs the same work as a
Faust agent in a ``type: faust`` stage, one event at a time; ``quix`` and ``bytewax`` as the
peers' apps in benchmarks/peers/ (after `make bench-peers`). All read the core workload's
pre-loaded input; about 7% of its records break the humidity rule (dead-lettered) and about 5%
fail the pressure filter (filtered), the rest are produced with two derived fields. Each
system's output and dead-letter topics are then checked record by record.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from benchmarks.core import (
    PARTITIONS,
    REQUIRED,
    TYPE_NAMES,
    compare,
    run_stage,
    schema_step,
    stage_settings,
)
from benchmarks.peers.cleaning import DEVICE, MAX_HUMIDITY, MIN_PRESSURE, clean, fields
from benchmarks.processes import (
    Measures,
    TopicWatch,
    check_output,
    peer_command,
    peers_missing,
    run_self_timed,
    run_until,
    scratch,
    streamflow_command,
)
from connectors.sources.generator import GeneratorConfig, sensor_event
from streamflow.processing.steps import SchemaViolation
from streamflow.processing.validation import ValidationError
from streamflow.transport import TopicSpec, create_transport

WORKLOAD = "parse-schema-validate-filter-sql-produce"
DEVICE_PATTERN = DEVICE.pattern
PEERS = ("quix", "bytewax")
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


def expected_sets(records: int, latency_values: list[bytes] | None = None
                  ) -> tuple[Counter[str], Counter[bytes]]:
    """The output (as :func:`canonical` writes each record) and dead letters the clean stage
    must produce from the first ``records`` pre-loaded records (or from ``latency_values``,
    whose records carry a send time)."""
    declared = fields(latency_values is not None)
    values = latency_values if latency_values is not None else [
        sensor_event(GeneratorConfig(seed=1), index)[1] for index in range(records)]
    output: Counter[str] = Counter()
    dead: Counter[bytes] = Counter()
    for value in values:
        kind, record = clean(value, declared)
        if kind == "out":
            output[json.dumps(record, sort_keys=True)] += 1
        elif kind == "dlq":
            dead[value] += 1
    return output, dead


def canonical(value: bytes) -> str:
    """An output record as JSON with sorted keys, to compare records whatever their key order."""
    return json.dumps(json.loads(value), sort_keys=True)


def checked(system: str, expected: tuple[Counter[str], Counter[bytes]],
            run: Callable[[str, str, str], float | Measures]) -> Callable[[str, str, int], Measures]:
    """A system's run (``run(bootstrap, source, name)``, writing ``<name>.out`` and
    ``<name>.dlq``) followed by the record-by-record check of both topics."""
    def measured(bootstrap: str, source: str, _records: int) -> Measures:
        name = f"{system.replace('-', '')}{uuid.uuid4().hex[:8]}"
        create_transport("confluent", bootstrap).admin().create_topics(
            [TopicSpec(f"{name}.out", PARTITIONS), TopicSpec(f"{name}.dlq", PARTITIONS)])
        result = run(bootstrap, source, name)
        watch = TopicWatch(bootstrap)
        try:
            check_output(watch, system, f"{name}.out", f"{name}.dlq", *expected, canonical)
        finally:
            watch.close()
        return result if isinstance(result, dict) else {"events_per_s": result}
    return measured


def run_native(bootstrap: str, source: str, name: str, records: int,
               guarantee: str = "at_least_once") -> Measures:
    return run_stage(bootstrap, source, records, {"steps": clean_steps()}, guarantee=guarantee,
                     name=name)


def run_isolated(bootstrap: str, source: str, name: str, records: int) -> Measures:
    """The native stage in a process of its own (``benchmarks.isolated``), with its peak RSS."""
    with scratch() as folder:
        return run_self_timed(*streamflow_command(
            stage_settings(bootstrap, source, name, {"steps": clean_steps()}), "stage", records,
            folder))


def run_faust(bootstrap: str, source: str, name: str, records: int) -> Measures:
    return run_stage(bootstrap, source, records,
                     {"type": "faust", "agent": "benchmarks.clean:clean_agent"}, name=name)


def run_peer(system: str, bootstrap: str, source: str, name: str, records: int, total: int
             ) -> Measures:
    """Peer ``system``'s clean app (benchmarks/peers/) until the output and dead-letter topics
    hold the ``total`` records they will get."""
    output, dead = f"{name}.out", f"{name}.dlq"
    with scratch() as folder:
        mark = folder / "first"
        command = peer_command(system, f"{system}_clean", {
            "bootstrap": bootstrap, "input": source, "output": output, "dlq": dead,
            "group": name, "mark": str(mark)})
        watch = TopicWatch(bootstrap)
        try:
            return run_until(*command, records, mark, watch.tally([output, dead]), total)
        finally:
            watch.close()


def run_clean(records: int, repeat: int) -> list[dict[str, Any]]:
    expected = expected_sets(records)
    systems: dict[str, Callable[[str, str, str], float | Measures]] = {
        "streamflow": partial(run_isolated, records=records),
        "streamflow-exactly-once": partial(run_native, records=records, guarantee="exactly_once"),
        "faust": partial(run_faust, records=records),
    }
    skipped = peers_missing()
    if not skipped:
        total = sum(expected[0].values()) + sum(expected[1].values())
        systems.update({peer: partial(run_peer, peer, records=records, total=total)
                        for peer in PEERS})
    return compare({system: checked(system, expected, run)
                    for system, run in systems.items()}, WORKLOAD, records, repeat, skipped)
