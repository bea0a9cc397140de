"""Scale-out workload: 1, then 2, replicas of one CPU-bound processor stage, each its own process.

Each replica is ``streamflow run PIPELINE --stage burn``, as one container per replica would be;
they share the stage's consumer group, so Kafka splits the input's partitions between them. The
stage parses the core workload's sensor events and runs a ``python`` step in record mode that
costs a fixed amount of CPU per record (:func:`burn`), so its speed is bound by the cores it
gets, not by the broker. The input is loaded before the replicas start, and the broker's
``group.initial.rebalance.delay.ms`` (3 s) lets every replica join the group's first generation,
so they split the partitions from the first record on. The clock runs from the first output
record to the last, read from the output topic's end offsets.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition

from benchmarks.common import chosen_broker, local_broker
from benchmarks.core import PARTITIONS, load_input
from streamflow.transport import TopicSpec, create_transport

WORKLOAD = "cpu-bound-stage-replicas"
REPLICAS = (1, 2)
BURN_ROUNDS = 200
ROOT = Path(__file__).parents[1]


def burn(record: dict[str, Any]) -> dict[str, Any]:
    """The stage's per-record work: ``BURN_ROUNDS`` chained SHA-256 digests of the device id."""
    digest = record["device_id"].encode()
    for _round in range(BURN_ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return {**record, "digest": digest.hex()[:16]}


def pipeline_file(folder: Path, bootstrap: str, name: str, source: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": f"{name}.out", "partitions": PARTITIONS}],
        "processors": [{"name": "burn", "input": source, "output": f"{name}.out",
                        "steps": [{"python": {"function": "benchmarks.scaleout:burn",
                                              "mode": "record"}}]}],
        "metrics": {"enabled": False},
        "runtime": {"batch": {"max_records": 2_000, "max_wait_ms": 50}},
    }))
    return path


def output_count(consumer: Consumer, topic: str) -> int:
    return sum(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
               for partition in range(PARTITIONS))


def run_replicas(bootstrap: str, folder: Path, replicas: int, records: int) -> float:
    """Events per second of ``replicas`` processes of the stage over ``records`` fresh records."""
    name = f"scale{uuid.uuid4().hex[:8]}"
    source = f"{name}.in"
    create_transport("confluent", bootstrap).admin().create_topics(
        [TopicSpec(source, PARTITIONS), TopicSpec(f"{name}.out", PARTITIONS)])
    load_input(bootstrap, source, records)
    config = pipeline_file(folder, bootstrap, name, source)
    command = [sys.executable, "-m", "streamflow.cli", "run", str(config), "--stage", "burn"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(folder / f"{name}-{i}.log", "wb"))  # noqa: SIM115
                 for i in range(replicas)]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{name}.watch"})
    try:
        started = None
        while (done := output_count(consumer, f"{name}.out")) < records:
            if started is None and done:
                started, at_start = time.perf_counter(), done
            if any(process.poll() is not None for process in processes):
                raise RuntimeError(f"a replica exited; see {folder}")
            time.sleep(0.02)
        assert started is not None
        return (done - at_start) / (time.perf_counter() - started)
    finally:
        consumer.close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)


def run_scaleout(records: int, repeat: int) -> list[dict[str, Any]]:
    """1 and 2 replicas, alternating for ``repeat`` rounds; each count's best is kept."""
    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as temporary, \
            local_broker(**{"group.initial.rebalance.delay.ms": 3000}) as bootstrap:
        for _round in range(repeat):
            for replicas in REPLICAS:
                rate = run_replicas(bootstrap, Path(temporary), replicas, records)
                print(f"{replicas} replica(s): {rate:,.0f} events/s", flush=True)
                best[replicas] = max(best.get(replicas, 0.0), rate)
    print(f"2 replicas / 1 replica: {best[2] / best[1]:.2f}x on {os.cpu_count()} cores, "
          f"{chosen_broker()} broker", flush=True)
    return [{"system": f"streamflow-{replicas}-replica{'s' if replicas > 1 else ''}",
             "workload": WORKLOAD, "events_per_s": round(rate), "records": records}
            for replicas, rate in best.items()]
