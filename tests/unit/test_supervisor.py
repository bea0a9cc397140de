"""The supervisor: transient failures restart with exponential backoff, fatal ones stop."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter

from streamflow.plugins import TransientError
from streamflow.runtime.stage import Stage
from streamflow.runtime.supervisor import Supervisor, backoff_delay, is_transient
from streamflow.transport import AuthenticationError, TransportError


class FailingRunner(Stage):
    """A stage that has already ended when start() returns, with ``error``."""

    def __init__(self, name: str, error: BaseException | None) -> None:
        super().__init__(name, f"stage-{name}")
        self.error = error

    def _run(self) -> None:
        """Nothing runs."""

    def start(self) -> None:
        super().start()
        self.join()

    @property
    def last_activity(self) -> float:
        return 0.0

    def is_idle(self, since: float) -> bool:
        return True


def counter() -> tuple[Counter, CollectorRegistry]:
    registry = CollectorRegistry()
    return Counter("restarts", "restarts", registry=registry), registry


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_transient_and_fatal_errors() -> None:
    assert is_transient(TransportError("broker down"))
    assert is_transient(TransientError("warehouse down"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(AuthenticationError("SASL authentication failed"))
    assert not is_transient(ValueError("bug"))


def test_transient_failures_restart_with_backoff_and_are_counted() -> None:
    built: list[FailingRunner] = []

    def factory() -> FailingRunner:
        runner = FailingRunner("sink", TransportError("down") if len(built) < 2 else None)
        built.append(runner)
        return runner

    restarts, registry = counter()
    supervisor = Supervisor(max_blocked_calls=8)
    supervisor.add(factory, restarts)
    supervisor.start()
    started = time.monotonic()
    while len(built) < 3 and time.monotonic() - started < 5:
        assert supervisor.check() is None
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert len(built) == 3
    assert registry.get_sample_value("restarts_total") == 2
    assert elapsed >= backoff_delay(0) + backoff_delay(1) - 0.1


def test_a_fatal_failure_stops_with_one_clear_reason() -> None:
    supervisor = Supervisor(max_blocked_calls=8)
    supervisor.add(lambda: FailingRunner("clean", AuthenticationError("bad password")), counter()[0])
    supervisor.start()
    assert supervisor.check() == ("clean failed: AuthenticationError: bad password; check the "
                                  "credentials and ACLs that kafka.config gives (sasl.*, ssl.*)")
