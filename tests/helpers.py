"""Helpers for integration tests: read a whole topic back, stamp records, run commands."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from streamflow.transport import ConsumedBatch, create_transport


def recent_timestamp_ms() -> int:
    """A record timestamp an hour ago, to the second: well within a topic's retention (7 days by
    default), past which Kafka deletes records at its next retention checks, even in tests."""
    return (int(time.time()) - 3600) * 1000


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> ConsumedBatch:
    """Every record currently in ``topic``, read by a throwaway consumer group."""
    consumer = create_transport("confluent", bootstrap).consumer(f"reader-{uuid.uuid4().hex}", [topic])
    everything = ConsumedBatch()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume_batch(10_000, 0.5)
            for name in ("topics", "partitions", "offsets", "keys", "values", "timestamps_ms", "headers"):
                getattr(everything, name).extend(getattr(batch, name))
            if not len(batch) and consumer.assignment() and sum(consumer.lag().values()) == 0:
                return everything
        raise TimeoutError(f"reading {topic} did not finish in {timeout_s}s")
    finally:
        consumer.close()


def run_on_terminal(command: Sequence[str], env: Mapping[str, str] | None = None,
                    timeout_s: float = 120) -> tuple[int, bytes]:
    """Run ``command`` with a pseudo-terminal as its stdout and stderr: its exit code and all
    it wrote there."""
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    code = process.wait(timeout=timeout_s)
    os.close(controller)
    return code, output


def start_logged(command: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` with its stdout and stderr appended to the file ``log``. (A pipe that
    nobody reads stops the process at its next write once 64 KiB wait in it.)"""
    with log.open("ab") as output:
        return subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=output, stderr=subprocess.STDOUT)


def finish_logged(process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Wait for ``process`` (started by :func:`start_logged`) to exit with 0; otherwise fail with
    the end of its log, after killing it if it is still running at ``timeout_s``."""
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
    if code != 0:
        outcome = f"ran over {timeout_s} s" if code is None else f"exited with {code}"
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        raise AssertionError(f"{list(process.args)} {outcome}; its log ends:\n{tail}")
