"""A broker outage under a running pipeline, a crash (SIGKILL) or a broker that holds its
connections and answers nothing (SIGSTOP): the daemon says so on /readyz, naming the
partitions, and in ``streamflow_broker_reachable``, keeps running, and carries on once the
broker is back, with nothing lost."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from confluent_kafka import Producer

from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner, RunResult
from tests.kafka_broker import KafkaCluster
from tests.source_runs import TopicWatcher, unique, wait_until

pytestmark = pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+ for Apache Kafka")


def produce(bootstrap: str, topic: str, numbers: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for number in numbers:
        producer.produce(topic, json.dumps({"n": number}).encode())
    assert producer.flush(30) == 0


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_an_outage_shows_on_readyz_and_in_metrics_and_the_stage_resumes(
        tmp_path: Path, outage: str) -> None:
    name = unique("outage")
    with KafkaCluster(1, log_dir=tmp_path) as cluster:
        runner = PipelineRunner(parse_pipeline({
            "pipeline": name,
            "kafka": {"bootstrap": cluster.bootstrap},
            "topics": [{"name": f"{name}.in", "partitions": 2}, {"name": f"{name}.out", "partitions": 2}],
            "processors": [{"name": "copy", "input": f"{name}.in", "output": f"{name}.out",
                            "steps": [{"schema": {"n": {"type": "int", "required": True}}}]}],
        }), metrics_port=0)
        results: list[RunResult] = []
        thread = threading.Thread(target=lambda: results.append(runner.run()), daemon=True)
        thread.start()
        watcher = TopicWatcher(cluster.bootstrap, f"{name}.out", partitions=2)
        reachable = {"pipeline": name, "stage": "copy"}

        def gauge() -> float | None:
            return runner.metrics.registry.get_sample_value("streamflow_broker_reachable", reachable)

        try:
            wait_until(lambda: runner.readiness()[0], 60, "the pipeline to be ready")
            produce(cluster.bootstrap, f"{name}.in", range(100))
            watcher.wait_for(100, timeout_s=60)
            wait_until(lambda: gauge() == 1, 10, "broker_reachable 1")

            reasons: list[str] = []

            def names_the_partitions() -> bool:
                """The reason says which partitions: their leader is down, silent, or gone."""
                reasons.append(runner.readiness()[1].get("components", {}).get("copy", ""))
                return (reasons[-1].startswith("brokers unreachable for its partitions: ")
                        and f"{name}.in[0], {name}.in[1]" in reasons[-1])

            if outage == "killed":
                cluster.kill_node(0)
            else:
                cluster.pause_node(0)
            try:
                wait_until(names_the_partitions, 30, "/readyz to name the unreachable partitions")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}; it said {sorted(set(reasons))}") from exc
            wait_until(lambda: gauge() == 0, 10, "broker_reachable 0")
            assert thread.is_alive() and not results, "the daemon exited during the outage"

            if outage == "killed":
                cluster.start_node(0)
            else:
                cluster.resume_node(0)
            wait_until(lambda: runner.readiness()[0], 120, "/readyz to recover")
            assert gauge() == 1
            produce(cluster.bootstrap, f"{name}.in", range(100, 200))
            watcher.wait_for(200, timeout_s=60)
        finally:
            runner.stop()
            thread.join(60)
            watcher.close()
    assert results and results[0].exit_code == 0, results
    # At-least-once: offsets the stage could not commit during the outage are read again.
    assert {json.loads(value)["n"] for value in watcher.values} == set(range(200))
