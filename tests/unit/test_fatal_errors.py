"""A quiet, friendly terminal without a broker: a fatal error is one line with its cause and fix
(the traceback only at DEBUG), log lines follow ``sys.stderr`` wherever it goes, and librdkafka
speaks through Python logging."""

from __future__ import annotations

import errno
import io
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamflow.ml.spec import ModelSpecError
from streamflow.runtime.fatal import DEBUG_HINT, FatalError, describe, metrics_port_error
from streamflow.runtime.logs import StderrHandler, configure_logging
from streamflow.runtime.stages import StepFailedError
from streamflow.transport.broker import free_port
from streamflow.transport.confluent import ConfluentTransport, _ClientLog

PIPELINE = """\
pipeline: busy
kafka: {bootstrap: "127.0.0.1:9"}
sources:
  - {name: gen, type: generator, topic: raw, count: 10}
"""


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def run(tmp_path: Path, port: int, *options: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "busy.yaml"
    path.write_text(PIPELINE)
    return subprocess.run(
        [sys.executable, "-m", "streamflow", *options, "run", str(path), "--metrics-port", str(port)],
        capture_output=True, text=True, timeout=60,
    )


def test_a_busy_metrics_port_is_one_line_with_the_fix(tmp_path: Path, busy_port: int) -> None:
    completed = run(tmp_path, busy_port)
    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert f"the metrics port {busy_port} on 127.0.0.1 is in use" in lines[0]
    assert "--metrics-port N (0 takes any free port) or set metrics.port" in lines[0]
    assert " ERROR " in lines[0] and completed.stdout == ""


def test_the_traceback_is_logged_at_debug(tmp_path: Path, busy_port: int) -> None:
    completed = run(tmp_path, busy_port, "--log-level", "DEBUG")
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr and "Address already in use" in completed.stderr
    assert completed.stderr.rstrip().splitlines()[-1].endswith(
        "--metrics-port N (0 takes any free port) or set metrics.port in the pipeline file")


def test_each_metrics_port_failure_says_what_to_do() -> None:
    denied = metrics_port_error(OSError(errno.EACCES, "Permission denied"), "127.0.0.1", 80)
    assert denied.cause == "not allowed to listen on port 80 for metrics"
    assert denied.fix.startswith("use a port above 1023")
    foreign = metrics_port_error(OSError(errno.EADDRNOTAVAIL, "nope"), "10.9.9.9", 9108)
    assert "metrics.host 10.9.9.9 is no address of this machine" in str(foreign)


def test_other_errors_are_one_line_too() -> None:
    assert describe(FatalError("the cause", "the fix")) == "the cause; the fix"
    assert describe(ModelSpecError("river has no 'linear_model.LogisticRegresion'")) == (
        "a model's estimator cannot be built: river has no 'linear_model.LogisticRegresion'; fix "
        "it in the pipeline file (`streamflow validate FILE` checks it without running)")
    assert describe(KeyError("x")) == f"KeyError: 'x'; {DEBUG_HINT}"
    assert describe(StepFailedError("step 'sql' failed (KeyError: 'x') and has on_error: fail")) == (
        "StepFailedError: step 'sql' failed (KeyError: 'x') and has on_error: fail; fix the step or "
        "its input, or set the step's on_error: dlq to dead-letter such records instead")


def test_log_lines_go_to_the_current_stderr_even_after_the_first_was_closed(
        root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("INFO", "text")
    logging.getLogger("streamflow.test").info("to the first")
    monkeypatch.setattr(sys, "stderr", second)
    first.close()  # as a test's captured stderr is, once it ends
    logging.getLogger("streamflow.test").info("to the second")
    assert "to the second" in second.getvalue() and "Logging error" not in second.getvalue()


def test_librdkafka_levels_are_warning_at_most_and_debug_while_closing(
        caplog: pytest.LogCaptureFixture) -> None:
    client_log = _ClientLog()
    with caplog.at_level(logging.DEBUG, "streamflow.transport.librdkafka"):
        client_log.log(logging.CRITICAL, "%s [%s] %s", "FAIL", "rdkafka#producer-1", "refused")
        client_log.log(logging.INFO, "%s [%s] %s", "CONF", "rdkafka#producer-1", "noted")
        client_log.closing = True
        client_log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", "gone")
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.WARNING, "FAIL [rdkafka#producer-1] refused"),
        (logging.INFO, "CONF [rdkafka#producer-1] noted"),
        (logging.DEBUG, "FAIL [rdkafka#producer-1] gone"),
    ]


def test_librdkafka_logs_through_python_logging_not_to_stderr(
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()  # an earlier test's main() may have left its stderr handler
    monkeypatch.setattr(root, "handlers",
                        [h for h in root.handlers if not isinstance(h, StderrHandler)])
    producer = ConfluentTransport(f"127.0.0.1:{free_port()}").producer()  # nothing listens there
    raw = producer._producer  # type: ignore[attr-defined]
    with caplog.at_level(logging.DEBUG, "streamflow.transport.librdkafka"):
        deadline = time.monotonic() + 20
        while not any("Connection refused" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "librdkafka logged no connection failure"
            raw.poll(0.2)
        producer.close()
    refused = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    assert {r.levelno for r in refused} <= {logging.WARNING, logging.DEBUG}
    assert "Connection refused" not in capfd.readouterr().err
