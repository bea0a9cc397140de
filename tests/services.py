"""Throwaway servers the tests (and benchmarks) start themselves: PostgreSQL, Mosquitto and an
MLflow tracking server.

PostgreSQL and Mosquitto are found in this order: an existing server named by an environment
variable (``STREAMFLOW_TEST_PG_DSN``, ``STREAMFLOW_TEST_MQTT=host:port``); a container through
testcontainers when a Docker engine answers; the server binary from Debian's packages, run from
a temporary folder on a free loopback port. When none is possible, :class:`ServiceUnavailable`
says how to install one (the fixtures turn it into a skip). The MLflow tracking server is the one
``make setup`` installs in a virtualenv of its own (or the ``mlflow`` command named by
``STREAMFLOW_TEST_MLFLOW``): without it, its tests fail.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from streamflow.transport.broker import free_port

PG_DSN_VARIABLE = "STREAMFLOW_TEST_PG_DSN"
MQTT_VARIABLE = "STREAMFLOW_TEST_MQTT"
MLFLOW_VARIABLE = "STREAMFLOW_TEST_MLFLOW"
# the full mlflow package, which the Makefile installs apart from the project's (see there)
MLFLOW_SERVER = Path(sys.executable).parent.parent / "mlflow-server" / "bin" / "mlflow"
DUCKDB_ICEBERG = Path(sys.executable).parent.parent / "duckdb-iceberg" / "bin" / "python"


class ServiceUnavailable(RuntimeError):
    """No server of this kind can be had here; the message says how to get one."""


def docker_available() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout_s: float, what: str,
                  log_path: Path) -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceUnavailable(f"{what} exited with {process.returncode}: {_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s: "
                             f"{_tail(log_path)}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process we started, then SIGKILL it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _find_binary(name: str, *patterns: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted((match for pattern in patterns for match in glob.glob(pattern)), reverse=True)
    return candidates[0] if candidates else None


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the ``postgres`` system user then."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextlib.contextmanager
def postgres(database: str = "test") -> Iterator[str]:
    """A DSN (``postgresql://...``) of a PostgreSQL server holding ``database``."""
    if os.environ.get(PG_DSN_VARIABLE):
        yield os.environ[PG_DSN_VARIABLE]
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", username="postgres", password="postgres",
                               dbname=database) as container:
            yield container.get_connection_url(driver=None)
        return
    initdb = _find_binary("initdb", "/usr/lib/postgresql/*/bin/initdb")
    if initdb is None:
        raise ServiceUnavailable(
            "no PostgreSQL server: install one (apt-get install postgresql), start Docker, "
            f"or set {PG_DSN_VARIABLE}=postgresql://user@host:port/db")
    bin_dir = Path(initdb).parent
    with tempfile.TemporaryDirectory(prefix="streamflow-pg-") as folder:
        root = Path(folder)
        data, log_path = root / "data", root / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        subprocess.run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                                          "--auth=trust", "--encoding=UTF8", "--no-sync"]),
                       check=True, capture_output=True)
        port = free_port()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                _as_postgres_user([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                                   "-h", "127.0.0.1", "-k", folder, "-c", "fsync=off",
                                   "-c", "max_connections=200"]),
                stdout=log, stderr=log)
        try:
            wait_for_port("127.0.0.1", port, process, 60, "PostgreSQL", log_path)
            _create_database(f"postgresql://postgres@127.0.0.1:{port}/postgres", database)
            yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
        finally:
            stop_process(process)


def _create_database(dsn: str, database: str) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute(f'CREATE DATABASE "{database}"')
            return
        except psycopg.OperationalError:  # still starting up
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def mosquitto() -> Iterator[tuple[str, int]]:
    """``(host, port)`` of an MQTT 5 broker."""
    if os.environ.get(MQTT_VARIABLE):
        host, _, port = os.environ[MQTT_VARIABLE].rpartition(":")
        yield host or "127.0.0.1", int(port)
        return
    if docker_available():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer("eclipse-mosquitto:2").with_exposed_ports(1883).with_command(
            "mosquitto -c /mosquitto-no-auth.conf")
        with container:
            wait_for_logs(container, "running")
            yield container.get_container_host_ip(), int(container.get_exposed_port(1883))
        return
    binary = _find_binary("mosquitto", "/usr/sbin/mosquitto")
    if binary is None:
        raise ServiceUnavailable("no MQTT broker: install Mosquitto (apt-get install mosquitto), "
                                 f"start Docker, or set {MQTT_VARIABLE}=host:port")
    with tempfile.TemporaryDirectory(prefix="streamflow-mqtt-") as folder:
        port = free_port()
        config, log_path = Path(folder) / "mosquitto.conf", Path(folder) / "mosquitto.log"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                          + ("user root\n" if os.geteuid() == 0 else ""))
        with open(log_path, "wb") as log:
            process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=log)
        try:
            wait_for_port("127.0.0.1", port, process, 30, "Mosquitto", log_path)
            yield "127.0.0.1", port
        finally:
            stop_process(process)


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """The URI of an MLflow tracking server run from ``folder`` (the ``mlflow`` command of
    :data:`MLFLOW_SERVER`): a SQLite backend store and an artifacts directory there, on a free
    loopback port. Its process group (the server, its
    uvicorn worker and job runner) is killed by the server's PID at the end."""
    command = os.environ.get(MLFLOW_VARIABLE) or str(MLFLOW_SERVER)
    if shutil.which(command) is None:
        raise ServiceUnavailable(
            f"no MLflow server at {command}: run make setup (it installs one in a virtualenv of "
            f"its own), or set {MLFLOW_VARIABLE} to an mlflow command")
    port = free_port()
    log_path = folder / "mlflow.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [command, "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=log, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_port("127.0.0.1", port, process, 120, "the MLflow server", log_path)
        deadline = time.monotonic() + 60
        while not _healthy(f"{uri}/health"):
            if time.monotonic() > deadline or process.poll() is not None:
                raise ServiceUnavailable(f"the MLflow server did not answer: {_tail(log_path)}")
            time.sleep(0.2)
        yield uri
    finally:  # a throwaway server: killed at once (a graceful stop takes it seconds)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _healthy(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)
    return False


def duckdb_iceberg_scan(metadata_location: str, order_by: str) -> pa.Table:
    """The rows DuckDB's Iceberg reader reads from an Iceberg table's metadata file, run by the
    Python of the virtualenv ``make setup`` installs it in (tests/readers/duckdb_iceberg.py)."""
    if not DUCKDB_ICEBERG.exists():
        raise FileNotFoundError(f"no {DUCKDB_ICEBERG}: run `make setup`, which installs DuckDB's "
                                "Iceberg reader in a virtualenv of its own")
    done = subprocess.run(
        [str(DUCKDB_ICEBERG), str(Path(__file__).parent / "readers" / "duckdb_iceberg.py"),
         metadata_location.removeprefix("file://"), order_by],
        capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(done.stdout)
    return pa.table({name: [row[index] for row in found["rows"]]
                     for index, name in enumerate(found["columns"])})
