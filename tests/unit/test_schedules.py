"""The scheduler on a fake clock: cron ticks, missed ticks, no overlap, failures; the schedules:
block's validation; the python job; the daemon's status JSON."""

from __future__ import annotations

import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from streamflow.cli import main
from streamflow.config.loader import parse_pipeline
from streamflow.metrics import PipelineMetrics
from streamflow.runtime.jobs import build_job
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.runtime.schedules import Schedule, Scheduler, ScheduleState

START = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)


def nightly_report() -> str:
    """A python job for the tests, referenced as ``tests.unit.test_schedules:nightly_report``."""
    return "report written"


def stop_the_scheduler() -> None:
    """A python job that asks its own process to stop, as Ctrl-C would."""
    os.kill(os.getpid(), signal.SIGTERM)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def sample(metrics: PipelineMetrics, name: str, schedule: str = "job") -> float | None:
    return metrics.registry.get_sample_value(name, {"pipeline": "p", "schedule": schedule})


def test_jobs_run_on_their_cron_ticks() -> None:
    clock, ran = FakeClock(START), []
    schedule = Schedule("job", "*/5 * * * *", lambda: ran.append(clock()))
    metrics = PipelineMetrics("p")
    scheduler: Scheduler

    def wait(seconds: float) -> bool:  # let the started job finish, then let time pass
        scheduler.join_jobs()
        clock.advance(seconds)
        return clock.now > START + timedelta(minutes=31)

    scheduler = Scheduler([schedule], metrics, clock=clock, wait=wait)
    scheduler.run()
    assert ran == [START.replace(second=0) + timedelta(minutes=m) for m in (5, 10, 15, 20, 25, 30)]
    assert sample(metrics, "streamflow_schedule_runs_total") == 6
    assert sample(metrics, "streamflow_schedule_duration_seconds_count") == 6
    assert sample(metrics, "streamflow_schedule_failures_total") == 0


@pytest.mark.parametrize(("on_missed", "runs", "skipped"), [("run_once", 1, 0), ("skip", 0, 1)])
def test_a_missed_tick_runs_once_at_start_up_or_is_skipped(
    tmp_path: Path, on_missed: str, runs: int, skipped: int
) -> None:
    state = ScheduleState(tmp_path / "p.schedules.json")
    state.save("job", START - timedelta(hours=3))  # three hourly ticks missed since
    ran: list[int] = []
    schedule = Schedule("job", "0 * * * *", lambda: ran.append(1), on_missed)  # type: ignore[arg-type]
    scheduler = Scheduler([schedule], PipelineMetrics("p"), state, clock=FakeClock(START))
    scheduler.start_up()
    scheduler.join_jobs()
    assert (len(ran), schedule.skipped) == (runs, skipped)  # once, not once per missed tick
    assert state.load() == {"job": START}
    assert schedule.next_tick == datetime(2026, 1, 1, 1, tzinfo=UTC)


def test_nothing_counts_as_missed_at_the_first_start(tmp_path: Path) -> None:
    state = ScheduleState(tmp_path / "p.schedules.json")
    ran: list[int] = []
    schedule = Schedule("job", "* * * * *", lambda: ran.append(1), "run_once")
    Scheduler([schedule], PipelineMetrics("p"), state, clock=FakeClock(START)).start_up()
    assert ran == []
    assert state.load() == {"job": START}


def test_a_tick_while_the_job_still_runs_is_skipped_and_counted() -> None:
    clock, release, ran = FakeClock(START), threading.Event(), []

    def slow() -> None:
        ran.append(clock())
        assert release.wait(10)

    schedule = Schedule("job", "* * * * *", slow)
    metrics = PipelineMetrics("p")
    scheduler = Scheduler([schedule], metrics, clock=clock)
    scheduler.start_up()
    for _minute in range(3):  # the first tick starts it; the next two find it running
        clock.advance(60)
        scheduler.run_due()
    assert (schedule.runs, schedule.skipped) == (1, 2)
    assert scheduler.status()[0]["running"] is True
    release.set()
    assert scheduler.join_jobs(10) == []
    clock.advance(60)
    scheduler.run_due()
    scheduler.join_jobs()
    assert len(ran) == 2
    assert sample(metrics, "streamflow_schedule_skipped_total") == 2
    assert sample(metrics, "streamflow_schedule_runs_total") == 2


def test_a_failed_run_is_counted_and_the_schedule_goes_on() -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")

    clock, metrics = FakeClock(START), PipelineMetrics("p")
    scheduler = Scheduler([Schedule("job", "* * * * *", flaky)], metrics, clock=clock)
    scheduler.start_up()
    clock.advance(60)
    scheduler.run_due()
    scheduler.join_jobs()
    assert scheduler.status()[0]["last_error"] == "OSError: disk full"
    clock.advance(60)
    scheduler.run_due()
    scheduler.join_jobs()
    status = scheduler.status()[0]
    assert (status["runs"], status["failures"], status["last_error"]) == (2, 1, None)
    assert sample(metrics, "streamflow_schedule_failures_total") == 1
    assert sample(metrics, "streamflow_schedule_runs_total") == 2


def test_stop_ends_the_scheduler_thread() -> None:
    scheduler = Scheduler([Schedule("job", "0 0 1 1 *", lambda: None)], PipelineMetrics("p"))
    scheduler.start()
    scheduler.stop()
    assert scheduler.join(5) == []
    assert scheduler._thread is not None and not scheduler._thread.is_alive()


def pipeline(tmp_path: Path, *schedules: dict[str, object]) -> dict[str, object]:
    return {
        "pipeline": "p",
        "sources": [{"name": "gen", "type": "generator", "topic": "raw", "count": 10}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "raw", "path": str(tmp_path / "lake")}],
        "runtime": {"schedule_state_dir": str(tmp_path / "state")},
        "schedules": list(schedules),
    }


def validate(tmp_path: Path, data: dict[str, object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


REPORT = {"function": "tests.unit.test_schedules:nightly_report"}


@pytest.mark.parametrize(("schedule", "expected"), [
    ({"name": "r", "cron": "61 * * * *", "python": REPORT},
     "schedules[0].cron: value error, '61 * * * *' is not a cron expression: give five fields"),
    ({"name": "r", "cron": "@hourly every day", "python": REPORT}, "schedules[0].cron"),
    ({"name": "r", "cron": "* * * * *"}, "a schedule runs exactly one job: set one of python"),
    ({"name": "r", "cron": "* * * * *", "compact_parquet": {"sink": "lak"}},
     "schedules[0].compact_parquet.sink: 'lak' is no sink of this pipeline; name one of its "
     "parquet sinks: ['lake']"),
    ({"name": "r", "cron": "* * * * *", "delta_maintenance": {"sink": "lake"}},
     "schedules[0].delta_maintenance.sink: sink 'lake' is of type parquet; delta_maintenance "
     "works on a delta sink"),
    ({"name": "r", "cron": "* * * * *", "python": {"function": "tests.unit.test_schedules:gone"}},
     "schedules[0].python.function: cannot import 'tests.unit.test_schedules:gone'"),
    ({"name": "r", "cron": "* * * * *", "on_missed": "later", "python": REPORT},
     "schedules[0].on_missed: input should be 'run_once' or 'skip'"),
])
def test_invalid_schedules_are_reported_at_validate_with_their_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], schedule: dict[str, object], expected: str
) -> None:
    code, err = validate(tmp_path, pipeline(tmp_path, schedule), capsys)
    assert code == 2
    assert expected in err


def test_a_valid_schedules_block_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = pipeline(tmp_path, {"name": "report", "cron": "0 3 * * *", "python": REPORT},
                    {"name": "compact", "cron": "*/10 * * * *", "on_missed": "run_once",
                     "compact_parquet": {"sink": "lake"}})
    assert validate(tmp_path, data, capsys)[0] == 0


def test_schedule_names_are_unique(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    twice = {"name": "r", "cron": "* * * * *", "python": REPORT}
    code, err = validate(tmp_path, pipeline(tmp_path, twice, twice), capsys)
    assert code == 2
    assert "schedules: names must be unique; ['r'] appear twice" in err


def test_the_python_job_calls_the_named_function(tmp_path: Path) -> None:
    config = parse_pipeline(pipeline(tmp_path, {"name": "r", "cron": "* * * * *", "python": REPORT}))
    assert build_job(config.schedules[0], config)() == "report written"


def test_the_daemon_runs_the_schedules_and_shows_them_in_its_status(tmp_path: Path) -> None:
    config = parse_pipeline(pipeline(tmp_path, {"name": "r", "cron": "0 3 * * *", "python": REPORT}))
    status = PipelineRunner(config).status()["schedules"]
    assert [(s["name"], s["cron"], s["runs"], s["running"]) for s in status] == [
        ("r", "0 3 * * *", 0, False)]
    assert PipelineRunner(config, stage="lake").scheduler is None  # one-stage containers: none


def test_the_schedule_command_runs_the_schedules_alone_until_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missed tick with on_missed: run_once runs at once; the job sends SIGTERM."""
    data = pipeline(tmp_path, {"name": "stop", "cron": "0 0 1 1 *", "on_missed": "run_once",
                               "python": {"function": "tests.unit.test_schedules:stop_the_scheduler"}})
    data["metrics"] = {"enabled": False}
    ScheduleState(tmp_path / "state" / "p.schedules.json").save("stop", START - timedelta(days=400))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["schedule", str(path)]) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    state = ScheduleState(tmp_path / "state" / "p.schedules.json").load()
    assert state["stop"] > START


def test_the_schedule_command_needs_schedules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline(tmp_path)))
    assert main(["schedule", str(path)]) == 2
    assert "has no schedules: block" in capsys.readouterr().err
