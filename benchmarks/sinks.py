"""Sinks workload: one sink stage writing a pre-loaded topic of sensor events, per sink.

Each sink reads the same input topic on the chosen broker with a consumer group of its own.
PostgreSQL is a throwaway server started for the run (``tests/services.py``), or the one that
``STREAMFLOW_TEST_PG_DSN`` names.
Time runs from the first consumed batch until the sink reports every row durable (its flush
returned), so the consumer-group join is not counted; the figure is rows per second.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import measure_stage
from benchmarks.core import PARTITIONS, compare
from benchmarks.processes import Measures
from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from tests.services import postgres

WORKLOAD = "sink-rows-durable"
SINK_TYPES = ("parquet", "postgres", "duckdb", "delta", "iceberg", "kafka")


@contextmanager
def sink_settings(sink_type: str, postgres_dsn: str) -> Iterator[dict[str, Any]]:
    """Settings writing somewhere of the run's own, removed afterwards."""
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        if sink_type != "postgres":
            yield {
                "parquet": {"path": str(directory / "lake")},
                "duckdb": {"path": str(directory / "warehouse.duckdb"), "table": "events"},
                "delta": {"path": str(directory / "events")},
                "iceberg": {"table": "bench.events", "catalog": {"properties": {
                    "type": "sql", "uri": f"sqlite:///{directory}/catalog.db",
                    "warehouse": f"file://{directory}"}}},
                "kafka": {"topic": f"bench.copy.{directory.name}", "partitions": PARTITIONS},
            }[sink_type]
            return
        table = f"bench_{uuid.uuid4().hex[:8]}"
        try:
            yield {"dsn": postgres_dsn, "table": table}
        finally:
            with psycopg.connect(postgres_dsn, autocommit=True) as connection:
                connection.execute(f'DROP TABLE IF EXISTS "{table}"')


def run_sink(bootstrap: str, source: str, records: int, sink_type: str, postgres_dsn: str
             ) -> Measures:
    """Rows per second the sink ``sink_type`` makes durable, reading ``source`` from the start."""
    name = f"sink{uuid.uuid4().hex[:8]}"
    with sink_settings(sink_type, postgres_dsn) as settings:
        config = parse_pipeline({
            "pipeline": name,
            "kafka": {"bootstrap": bootstrap},
            "sinks": [{"name": "out", "type": sink_type, "input": source, **settings}],
            "metrics": {"enabled": False},
            "runtime": {"batch": {"max_records": 10_000, "max_wait_ms": 50},
                        "commit_interval_s": 0.25},
        })
        labels = {"pipeline": name, "sink": "out"}
        return measure_stage(PipelineRunner(config), "out", records, done=lambda runner: (
            runner.metrics.registry.get_sample_value("streamflow_sink_rows_written_total",
                                                     labels) or 0
        ))


def run_sinks(records: int, repeat: int) -> list[dict[str, Any]]:
    """Each sink ``repeat`` times on the same pre-loaded topic; keep each one's best."""
    with postgres() as postgres_dsn:
        return compare({f"streamflow-{sink_type}": partial(run_sink, sink_type=sink_type,
                                                           postgres_dsn=postgres_dsn)
                        for sink_type in SINK_TYPES}, WORKLOAD, records, repeat)
