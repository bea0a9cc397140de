"""Keeping sources and stages running: restarts with exponential backoff for transient failures,
a clean stop for fatal ones, and for too many client calls given up and still blocked."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from streamflow.plugins import TransientError
from streamflow.runtime.fatal import describe
from streamflow.runtime.stage import Stage
from streamflow.transport import AuthenticationError, TransportError, calls_still_blocked

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0


def is_transient(error: BaseException) -> bool:
    """Broker, network and declared-transient failures are retried; anything else is fatal."""
    if isinstance(error, AuthenticationError):
        return False
    return isinstance(error, TransportError | TransientError | ConnectionError | TimeoutError)


def backoff_delay(attempt: int) -> float:
    """0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return float(min(BACKOFF_START_S * 2 ** attempt, BACKOFF_MAX_S))


@dataclass
class Supervised:
    """A runner, how to build a fresh one, and its restart history."""

    factory: Callable[[], Stage]
    restarts: Counter
    runner: Stage | None = None
    attempt: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    history: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.runner = self.factory()
        self.started_at = time.monotonic()
        self.restart_at = None
        self.runner.start()


class Supervisor:
    """Restarts failed runners with backoff; reports a fatal failure for the pipeline to stop,
    or too many client calls given up and still blocked (``max_blocked_calls``)."""

    def __init__(self, max_blocked_calls: int) -> None:
        self.supervised: list[Supervised] = []
        self.max_blocked_calls = max_blocked_calls

    def add(self, factory: Callable[[], Stage], restarts: Counter) -> Supervised:
        entry = Supervised(factory, restarts)
        self.supervised.append(entry)
        return entry

    def start(self) -> None:
        for entry in self.supervised:
            entry.start()

    @property
    def runners(self) -> list[Stage]:
        return [entry.runner for entry in self.supervised if entry.runner is not None]

    def check(self) -> str | None:
        """Handle failed runners; return a reason to stop the pipeline on a fatal failure."""
        blocked = calls_still_blocked()
        if blocked >= self.max_blocked_calls:
            return (f"{blocked} Kafka client calls given up after ignoring their timeout are "
                    "still blocked, each holding its client's threads and buffers (librdkafka "
                    "issues 5456 and 5511); a fresh process frees them: run it under a restart "
                    "policy (runtime.max_blocked_client_calls sets how many are borne)")
        now = time.monotonic()
        for entry in self.supervised:
            runner = entry.runner
            if runner is None:
                continue
            if entry.restart_at is not None:
                if now >= entry.restart_at:
                    entry.restarts.inc()
                    entry.start()
                continue
            if runner.error is None or runner.is_alive():
                if now - entry.started_at > HEALTHY_AFTER_S:
                    entry.attempt = 0
                continue
            error = runner.error
            if not is_transient(error):
                return f"{runner.name} failed: {describe(error)}"
            delay = backoff_delay(entry.attempt)
            entry.attempt += 1
            entry.restart_at = now + delay
            entry.history.append(f"{type(error).__name__}: {error}")
            log.warning("%s failed (%s: %s); restarting in %.1fs (attempt %d)",
                        runner.name, type(error).__name__, error, delay, entry.attempt)
        return None
