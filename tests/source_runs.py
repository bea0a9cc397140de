"""Helpers for source tests: a source-only pipeline, run in this process or as a killable
``streamflow run`` subprocess (killed and restarted by :func:`kill_and_restart`), and a fast
watcher of a topic (no consumer group to join)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from tests.helpers import start_logged


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def source_pipeline(bootstrap: str, source_type: str, topic: str, partitions: int = 1,
                    **settings: Any) -> dict[str, Any]:
    """A pipeline with one source named ``src`` publishing to ``topic``."""
    return {
        "pipeline": unique("p"),
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": topic, "partitions": partitions}],
        "sources": [{"name": "src", "type": source_type, "topic": topic, **settings}],
    }


@contextmanager
def running(pipeline: dict[str, Any]) -> Iterator[PipelineRunner]:
    """Runs ``pipeline`` in a thread of this process until the block ends."""
    runner = PipelineRunner(parse_pipeline(pipeline), metrics_port=0)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: bool(runner.sources) and runner.readiness()[0], 30, "the source to start")
        yield runner
    finally:
        runner.stop()
        thread.join(30)


def start_process(pipeline: dict[str, Any], directory: Path) -> subprocess.Popen[bytes]:
    """``streamflow run`` of ``pipeline`` as a subprocess (its output goes to run.log)."""
    path = directory / f"{pipeline['pipeline']}.yaml"
    path.write_text(json.dumps(pipeline))  # JSON is YAML
    return start_logged([sys.executable, "-m", "streamflow", "run", str(path), "--metrics-port", "0"],
                        directory / "run.log")


def kill_and_restart(
    pipeline: dict[str, Any], directory: Path, *, before_kill: Callable[[], object],
    after_restart: Callable[[], object], while_down: Callable[[], object] = lambda: None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> None:
    """``streamflow run`` of ``pipeline`` as a subprocess: once ``before_kill`` returns (it waits
    for some progress), SIGKILL it; run ``while_down``; start it again and wait with
    ``after_restart``; then stop it with ``stop_signal``, also when any step failed."""
    process = start_process(pipeline, directory)
    try:
        before_kill()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        while_down()
        process = start_process(pipeline, directory)
        after_restart()
    finally:
        process.send_signal(stop_signal)
        process.wait(30)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class TopicWatcher:
    """Reads a topic from the beginning as records arrive (assigned partitions, no group)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = 1) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("watch"),
                                  "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.values: list[bytes] = []

    def read(self) -> list[bytes]:
        for message in self.consumer.consume(10_000, 0.2):
            if message.error() is None:
                self.values.append(message.value())
        return self.values

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[bytes]:
        wait_until(lambda: len(self.read()) >= count, timeout_s, f"{count} records")
        return self.values

    def close(self) -> None:
        self.consumer.close()
