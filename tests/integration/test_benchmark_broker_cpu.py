"""The benchmarks' reading of their broker's CPU time (benchmarks.common.broker_cpu_seconds),
which the model workload divides by its records."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from benchmarks.common import broker_cpu_seconds, local_broker


def test_broker_cpu_counts_the_brokers_work_not_ours() -> None:
    with local_broker() as bootstrap:  # the embedded Tansu, the benchmarks' default
        at_start = broker_cpu_seconds()
        end = time.process_time() + 0.5
        while time.process_time() < end:  # this process's CPU is not the broker's
            pass
        idle = broker_cpu_seconds() - at_start
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for index in range(20_000):
            producer.produce("cpu-check", b"x" * 200, str(index % 64).encode())
            producer.poll(0)
        assert producer.flush(30) == 0
        working = broker_cpu_seconds() - at_start - idle
    assert idle < 0.25
    assert working > 0.0
    with pytest.raises(RuntimeError, match="no local_broker"):
        broker_cpu_seconds()
