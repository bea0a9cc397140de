"""The scheduler: jobs on cron expressions (UTC), in a thread of the daemon or alone.

Each schedule's job runs in a thread of its own, so a long job delays no other schedule, and
never beside itself: a tick while the job's previous run still goes is skipped and counted.
Each schedule's last tick is kept in a JSON file, so that at start-up a tick missed while
nothing ran is told apart: ``on_missed: run_once`` runs the job once then, ``skip`` skips it.
The clock and the wait are injectable, so tests drive the scheduler with a fake clock.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from croniter import croniter

from streamflow.config.models import PipelineConfig
from streamflow.metrics import PipelineMetrics
from streamflow.metrics.registry import ScheduleMetrics
from streamflow.runtime.jobs import build_job

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
Wait = Callable[[float], bool]  # waits up to that many seconds; True once asked to stop
MAX_WAIT_S = 60.0  # the wall clock may jump (NTP, suspend): look at it at least this often


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Schedule:
    """A job and when to run it."""

    name: str
    cron: str
    job: Callable[[], object]
    on_missed: Literal["run_once", "skip"] = "skip"
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    next_tick: datetime | None = None
    last_start: datetime | None = None
    last_seconds: float | None = None
    last_error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def tick_after(self, moment: datetime) -> datetime:
        return croniter(self.cron, moment).get_next(datetime)  # type: ignore[no-any-return]

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class ScheduleState:
    """Each schedule's last handled tick, in a JSON file written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, datetime]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("schedule state %s unreadable (%s): no tick counts as missed", self.path, exc)
            return {}
        return {name: datetime.fromisoformat(value) for name, value in data.items()}

    def save(self, name: str, tick: datetime) -> None:
        with self._lock:
            ticks = self.load()
            ticks[name] = tick
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps({k: v.isoformat() for k, v in ticks.items()}),
                                 encoding="utf-8")
            os.replace(temporary, self.path)


class Scheduler:
    """Runs ``schedules`` on their cron expressions until :meth:`stop`."""

    def __init__(
        self,
        schedules: list[Schedule],
        metrics: PipelineMetrics,
        state: ScheduleState | None = None,
        clock: Clock = utc_now,
        wait: Wait | None = None,
    ) -> None:
        self.schedules = schedules
        self.state = state
        self.clock = clock
        self._stop = threading.Event()
        self.wait = wait or self._stop.wait
        self._metrics: dict[str, ScheduleMetrics] = {s.name: metrics.schedule(s.name)
                                                     for s in schedules}
        self._thread: threading.Thread | None = None

    def start_up(self) -> None:
        """Set each schedule's next tick; handle a tick missed since its last one."""
        now = self.clock()
        last_ticks = self.state.load() if self.state else {}
        for schedule in self.schedules:
            last = last_ticks.get(schedule.name)
            if last is not None and schedule.tick_after(last) <= now:
                if schedule.on_missed == "run_once":
                    log.info("schedule %s: a tick was missed since %s: running it once now",
                             schedule.name, last.isoformat())
                    self._launch(schedule, now)
                else:
                    log.info("schedule %s: a tick missed since %s is skipped (on_missed: skip)",
                             schedule.name, last.isoformat())
                    self._skip(schedule, now)
            elif last is None and self.state:
                self.state.save(schedule.name, now)  # ticks from now on count as missed
            schedule.next_tick = schedule.tick_after(now)

    def run_due(self) -> float:
        """Start the jobs whose tick has come; the seconds until the next tick."""
        now = self.clock()
        for schedule in self.schedules:
            assert schedule.next_tick is not None, "start_up first"
            if schedule.next_tick > now:
                continue
            if schedule.running:
                log.warning("schedule %s: the tick of %s is skipped: the previous run still goes",
                            schedule.name, schedule.next_tick.isoformat())
                self._skip(schedule, now)
            else:
                self._launch(schedule, now)
            schedule.next_tick = schedule.tick_after(now)
        soonest = min((s.next_tick for s in self.schedules if s.next_tick), default=None)
        return MAX_WAIT_S if soonest is None else min(
            max((soonest - now).total_seconds(), 0.0), MAX_WAIT_S)

    def _skip(self, schedule: Schedule, tick: datetime) -> None:
        schedule.skipped += 1
        self._metrics[schedule.name].skipped.inc()
        if self.state:
            self.state.save(schedule.name, tick)

    def _launch(self, schedule: Schedule, tick: datetime) -> None:
        if self.state:
            self.state.save(schedule.name, tick)
        schedule.last_start = tick
        schedule.thread = threading.Thread(target=self._run_job, args=(schedule,),
                                           name=f"schedule-{schedule.name}", daemon=True)
        schedule.thread.start()

    def _run_job(self, schedule: Schedule) -> None:
        metrics = self._metrics[schedule.name]
        metrics.runs.inc()
        schedule.runs += 1
        log.info("schedule %s: job started", schedule.name)
        started = time.perf_counter()
        try:
            outcome = schedule.job()
        except Exception as exc:
            schedule.failures += 1
            metrics.failures.inc()
            schedule.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("schedule %s: job failed", schedule.name)
        else:
            schedule.last_error = None
            log.info("schedule %s: job done in %.3fs%s", schedule.name,
                     time.perf_counter() - started, f": {outcome}" if outcome is not None else "")
        finally:
            schedule.last_seconds = time.perf_counter() - started
            metrics.duration.observe(schedule.last_seconds)

    def join_jobs(self, timeout: float | None = None) -> list[str]:
        """Wait for running jobs; the names of those still running after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for schedule in self.schedules:
            if schedule.thread is not None:
                schedule.thread.join(None if deadline is None
                                     else max(deadline - time.monotonic(), 0))
        return [schedule.name for schedule in self.schedules if schedule.running]

    def run(self) -> None:
        """Start up, then run the due jobs until stopped. Running jobs are not interrupted."""
        self.start_up()
        while not self.wait(self.run_due()) and not self._stop.is_set():
            pass

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self.run, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Start no more jobs (running ones go on: see :meth:`join`)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> list[str]:
        """Wait up to ``timeout`` for the scheduler and its jobs; the names still running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.join_jobs(timeout)

    def join_when_stopped(self, timeout: float | None = None) -> list[str]:
        """Wait for :meth:`stop`, then :meth:`join`."""
        self._stop.wait()
        return self.join(timeout)

    def status(self) -> list[dict[str, Any]]:
        """Per schedule, for the dashboard's status JSON."""
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return [{"name": s.name, "cron": s.cron, "running": s.running, "runs": s.runs,
                 "failures": s.failures, "skipped": s.skipped, "next_tick": iso(s.next_tick),
                 "last_start": iso(s.last_start), "last_seconds": s.last_seconds,
                 "last_error": s.last_error} for s in self.schedules]


def pipeline_scheduler(config: PipelineConfig, metrics: PipelineMetrics) -> Scheduler:
    """The scheduler of ``config``'s schedules, its state in ``runtime.schedule_state_dir``."""
    schedules = [Schedule(s.name, s.cron, build_job(s, config), s.on_missed)
                 for s in config.schedules]
    state = ScheduleState(Path(config.runtime.schedule_state_dir) / f"{config.pipeline}.schedules.json")
    return Scheduler(schedules, metrics, state)
