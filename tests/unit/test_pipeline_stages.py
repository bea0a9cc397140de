"""The pipeline sees sources and stages only through the Stage interface: readiness, idleness,
the dashboard's running flags and the shutdown order, without a broker."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner, RunResult
from streamflow.runtime.stage import Stage
from streamflow.transport.base import STILL_BLOCKED

CONFIG = parse_pipeline({
    "pipeline": "p",
    "sources": [{"name": "gen", "type": "generator", "topic": "raw", "count": 10}],
    "processors": [{"name": "clean", "input": "raw", "output": "clean",
                    "steps": [{"sql": "SELECT * FROM batch"}]}],
})


class FakeStage(Stage):
    """Runs until stopped; its idleness and readiness are set by the test."""

    stopped: ClassVar[list[str]] = []  # names, in the order their threads ended

    def __init__(self, name: str) -> None:
        super().__init__(name, f"fake-{name}")
        self.activity = 0.0
        self.idle = False
        self.waiting_for: str | None = None

    def _run(self) -> None:
        self._stop.wait()
        FakeStage.stopped.append(self.name)

    @property
    def last_activity(self) -> float:
        return self.activity

    def is_idle(self, since: float) -> bool:
        return self.idle

    def starting(self) -> str | None:
        return self.waiting_for


def started_runner() -> tuple[PipelineRunner, FakeStage, FakeStage]:
    runner = PipelineRunner(CONFIG, metrics_port=0)
    source, stage = FakeStage("gen"), FakeStage("clean")
    for fake in (source, stage):
        runner.supervisor.add(lambda fake=fake: fake, runner.metrics.stage(fake.name).restarts)
    runner.supervisor.start()
    runner._started = True
    return runner, source, stage


def test_readiness_reports_what_each_stage_waits_for() -> None:
    runner, source, stage = started_runner()
    try:
        source.waiting_for = "opening"
        stage.waiting_for = "joining its consumer group"
        assert runner.readiness() == (False, {"reason": "components not ready", "components": {
            "gen": "opening", "clean": "joining its consumer group"}})
        source.waiting_for = stage.waiting_for = None
        assert runner.readiness() == (True, {"status": "ready"})
        assert runner.status()["ready"]
        assert [node["running"] for node in runner.status()["nodes"]] == [True, True]
    finally:
        runner.stop()
        assert runner._shutdown().exit_code == 0


def test_idle_once_every_stage_is_idle_after_the_last_activity() -> None:
    runner, source, stage = started_runner()
    try:
        source.idle, stage.idle = False, True
        assert not runner._idle(0)
        source.idle = True
        source.activity = time.monotonic()
        stage.activity = source.activity - 10
        assert runner._idle(0) and not runner._idle(5)
    finally:
        runner.stop()
        runner._shutdown()


def test_sources_stop_before_stages_and_a_hung_stage_is_reported() -> None:
    FakeStage.stopped = []
    runner, source, stage = started_runner()
    assert [s.name for s in runner.sources] == ["gen"] and [s.name for s in runner.stages] == ["clean"]
    result = runner._shutdown()
    assert FakeStage.stopped == ["gen", "clean"] and result.exit_code == 0
    assert not source.is_alive() and not stage.is_alive()

    hung = FakeStage("clean")
    hung.stop = lambda: None  # type: ignore[method-assign]  # never ends
    runner = PipelineRunner(CONFIG.model_copy(update={"runtime": CONFIG.runtime.model_copy(
        update={"shutdown_timeout_s": 0.1})}), metrics_port=0)
    runner.supervisor.add(lambda: hung, runner.metrics.stage("clean").restarts)
    runner.supervisor.start()
    result = runner._shutdown()
    assert result.exit_code == 1 and "clean" in result.errors[0]
    hung._stop.set()


def test_the_run_stops_once_too_many_client_calls_given_up_are_still_blocked() -> None:
    """Each such call holds a Kafka client's threads and buffers: past the bound, only a fresh
    process frees them, so the run ends with exit code 1 and says why."""
    config = CONFIG.model_copy(update={"runtime": CONFIG.runtime.model_copy(
        update={"max_blocked_client_calls": 2})})
    runner = PipelineRunner(config, metrics_port=0)
    stage = FakeStage("clean")
    runner.supervisor.add(lambda: stage, runner.metrics.stage("clean").restarts)
    runner.supervisor.start()
    runner._started = True
    released = threading.Event()
    blocked = [threading.Thread(target=released.wait, daemon=True) for _ in range(2)]
    try:
        for thread in blocked:
            thread.start()
        STILL_BLOCKED.add(blocked[0])
        assert runner.supervisor.check() is None
        STILL_BLOCKED.add(blocked[1])
        results: list[RunResult] = []
        supervising = threading.Thread(target=lambda: results.append(runner._supervise()))
        supervising.start()
        supervising.join(10)
        went_on = supervising.is_alive()
    finally:
        STILL_BLOCKED.difference_update(blocked)
        released.set()
        runner.stop("the test is over")
    supervising.join()
    assert not went_on and results[0].exit_code == 1 and not stage.is_alive()
    assert results[0].errors[0].startswith("2 Kafka client calls given up after ignoring their "
                                       "timeout are still blocked")
