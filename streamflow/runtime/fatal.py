"""Fatal errors in one line: the cause and the fix. The traceback is for DEBUG logs only."""

from __future__ import annotations

import errno

from streamflow.ml.errors import ModelSpecError
from streamflow.runtime.stages import StepFailedError
from streamflow.transport import AuthenticationError

DEBUG_HINT = "run with --log-level DEBUG for the traceback"
# the fix for errors of a kind, after "Kind: message; "
FIXES: list[tuple[type[BaseException], str]] = [
    (StepFailedError, "fix the step or its input, or set the step's on_error: dlq to dead-letter "
                      "such records instead"),
    (AuthenticationError, "check the credentials and ACLs that kafka.config gives (sasl.*, ssl.*)"),
]


class FatalError(Exception):
    """A failure that ends the run, with what to do about it."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}; {fix}")
        self.cause = cause
        self.fix = fix


def metrics_port_error(error: OSError, host: str, port: int) -> FatalError:
    """Why the metrics server could not listen on ``host``:``port``, and what to do."""
    elsewhere = ("pass --metrics-port N (0 takes any free port) or set metrics.port in the "
                 "pipeline file")
    if error.errno == errno.EADDRINUSE:
        return FatalError(f"the metrics port {port} on {host} is in use (by another streamflow "
                          "run?)", f"stop what listens there, or {elsewhere}")
    if error.errno == errno.EACCES:
        return FatalError(f"not allowed to listen on port {port} for metrics",
                          f"use a port above 1023: {elsewhere}")
    if error.errno == errno.EADDRNOTAVAIL:
        return FatalError(f"metrics.host {host} is no address of this machine",
                          "set metrics.host to one of its addresses (127.0.0.1, or 0.0.0.0 for all)")
    return FatalError(f"the metrics server cannot listen on {host}:{port}: {error}",
                      f"check metrics.host, or {elsewhere}")


def describe(error: BaseException) -> str:
    """``error`` in one line, with the fix where one is known."""
    if isinstance(error, FatalError):
        return str(error)
    if isinstance(error, ModelSpecError):
        return (f"a model's estimator cannot be built: {error}; fix it in the pipeline file "
                "(`streamflow validate FILE` checks it without running)")
    fix = next((fix for kind, fix in FIXES if isinstance(error, kind)), DEBUG_HINT)
    return f"{type(error).__name__}: {error}; {fix}"
