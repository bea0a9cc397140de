"""Soak (issue 16): ten minutes at 5,000 events/s through the quickstart's shape (clean → model
→ Parquet) on Apache Kafka, with benchmarks.pipeline_latency's producer and durable-row
watcher. Every valid record lands once in Parquet; the process tree's memory (PSS: the model
workers' forked checkpoint writers share their pages) grows at most 5% after the first minute,
and p99 latency in the last minute stays within 20% of the first.

Marked slow (about 11 minutes): ``pytest -m slow tests/integration/test_soak.py``. Its figures
vary with what else the machine runs; run it on a quiet one.
"""

from __future__ import annotations

import shutil

import pytest

from benchmarks.pipeline_latency import measure
from tests.kafka_broker import KafkaCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")]

RATE = 5_000
SECONDS = 600.0


def test_ten_minutes_through_the_quickstart_shape_hold_memory_and_latency_steady() -> None:
    with KafkaCluster(1) as cluster:
        row = measure(cluster.bootstrap, RATE, SECONDS)  # fails unless every row landed once
    print(row)
    assert row["pss_growth_pct"] <= 5.0
    assert row["p99_last_minute_ms"] <= 1.2 * row["p99_first_minute_ms"]
    assert row["p99_ms"] <= 1000.0
