"""A real Apache Kafka (KRaft, no ZooKeeper) on loopback, run from the jars on Maven Central.

``make kafka`` (``python -m tests.kafka_broker fetch``) copies ``org.apache.kafka:kafka_2.13`` and
its dependencies, at the version pinned in ``tests/kafka/pom.xml``, into a cache folder once, and
checks every jar against ``tests/kafka/checksums.sha256``. :class:`KafkaCluster` then formats
storage in a temporary folder and starts one node, or three, each a combined broker and
controller on free ports. Nothing is downloaded at import time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from streamflow.transport.broker import free_port
from tests.services import ServiceUnavailable, stop_process, wait_for_port

POM = Path(__file__).parent / "kafka" / "pom.xml"
KAFKA_VERSION = re.search(r"<kafka.version>([^<]+)<", POM.read_text()).group(1)  # type: ignore[union-attr]
CHECKSUMS = Path(__file__).parent / "kafka" / "checksums.sha256"
LOG4J_CONFIG = """<Configuration status="warn">
  <Appenders><Console name="out" target="SYSTEM_OUT">
    <PatternLayout pattern="[%d] %p %m (%c)%n"/></Console></Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="out"/></Root>
    <Logger name="kafka.server.KafkaRaftServer" level="info"/></Loggers>
</Configuration>
"""


def kafka_home() -> Path:
    """The cache folder holding ``libs/`` (``STREAMFLOW_KAFKA_HOME`` overrides it)."""
    override = os.environ.get("STREAMFLOW_KAFKA_HOME")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "streamflow" / f"kafka-{KAFKA_VERSION}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_checksums() -> dict[str, str]:
    pairs = (line.split() for line in CHECKSUMS.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def verify(libs: Path) -> None:
    """Raise unless ``libs`` holds exactly the pinned jars, each with its recorded SHA-256."""
    expected = _expected_checksums()
    present = {path.name for path in libs.glob("*.jar")}
    if present != set(expected):
        missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
        raise ServiceUnavailable(f"Kafka jars in {libs} differ from {CHECKSUMS.name}: "
                                 f"missing {missing}, extra {extra}")
    for name, digest in expected.items():
        if _sha256(libs / name) != digest:
            raise ServiceUnavailable(f"checksum mismatch for {libs / name}: delete {libs.parent} "
                                     "and run `make kafka` again")


def _copy_jars(folder: Path) -> None:
    """Maven copies the broker's runtime jars from Maven Central (through ~/.m2) into ``folder``."""
    subprocess.run(["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                    "-DincludeScope=runtime", f"-DoutputDirectory={folder}"],
                   check=True, capture_output=True, text=True, timeout=900)


def fetch(home: Path | None = None) -> Path:
    """The verified ``libs`` folder, copied from Maven Central first if it is not cached yet."""
    libs = (home or kafka_home()) / "libs"
    if libs.is_dir():
        verify(libs)
        return libs
    if not shutil.which("java") or not shutil.which("mvn"):
        raise ServiceUnavailable("no Apache Kafka: it needs Java 17+ and Maven to fetch its jars "
                                 "(apt-get install openjdk-17-jre-headless maven), or Docker, or "
                                 "STREAMFLOW_TEST_BROKER=tansu|external:HOST:PORT")
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    try:
        _copy_jars(staging)
        verify(staging)
        try:
            staging.rename(libs)
        except OSError:  # another process cached them meanwhile
            verify(libs)
    except subprocess.CalledProcessError as exc:
        raise ServiceUnavailable(f"fetching the Kafka jars failed: {exc.stdout[-2000:]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return libs


@functools.cache
def _verified_libs() -> Path:
    """:func:`fetch`, once per process: every node start would otherwise hash 43 MB of jars."""
    return fetch()


def _cluster_id() -> str:
    """A random cluster id as Kafka writes them: URL-safe base64, never starting with '-'
    (the storage tool would read it as an option)."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


class KafkaCluster:
    """``size`` KRaft nodes on loopback, each both broker and controller, until :meth:`stop`.

    Internal topics are replicated to every node (``min.insync.replicas`` is 2 when there are
    three), group joins start without delay, and data lives in a temporary folder. ``settings``
    add to or override the broker settings.
    """

    def __init__(self, size: int = 1, log_dir: Path | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        self.size = size
        self.settings = settings or {}
        self.ports = [free_port() for _ in range(size)]
        self.controller_ports = [free_port() for _ in range(size)]
        self.cluster_id = _cluster_id()
        self._folder = Path(tempfile.mkdtemp(prefix="streamflow-kafka-"))
        self.log_dir = log_dir or self._folder
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _config(self, node: int) -> Path:
        voters = ",".join(f"{i + 1}@127.0.0.1:{port}" for i, port in enumerate(self.controller_ports))
        replicas = min(self.size, 3)
        settings = {
            "process.roles": "broker,controller",
            "node.id": node + 1,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.ports[node]},"
                         f"CONTROLLER://127.0.0.1:{self.controller_ports[node]}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.ports[node]}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self._folder / f"data-{node + 1}",
            "num.partitions": 4,
            "default.replication.factor": replicas,
            "min.insync.replicas": min(replicas, 2),
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min(replicas, 2),
            "transaction.state.log.num.partitions": 10,
            "group.initial.rebalance.delay.ms": 0,
            "group.consumer.min.session.timeout.ms": 1000,
            "group.min.session.timeout.ms": 1000,
            "log.segment.bytes": 16 * 1024 * 1024,
            "log.flush.interval.messages": sys.maxsize,
            "unclean.leader.election.enable": "false",
            **self.settings,
        }
        path = self._folder / f"server-{node + 1}.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        return path

    def _java(self, main: str, *args: str, heap_mb: int = 512) -> list[str]:
        libs = _verified_libs()
        log4j = self._folder / "log4j2.xml"
        if not log4j.exists():
            log4j.write_text(LOG4J_CONFIG)
        return ["java", f"-Xmx{heap_mb}m", "-Xss1m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}",
                "-cp", f"{libs}/*", main, *args]

    def start(self, timeout_s: float = 90.0) -> KafkaCluster:
        for node in range(self.size):
            config = self._config(node)
            formatted = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(config),
                           "--ignore-formatted", heap_mb=256),
                capture_output=True, text=True, timeout=120)
            if formatted.returncode != 0:
                raise RuntimeError(f"formatting Kafka storage failed ({formatted.returncode}): "
                                   f"{formatted.stdout[-1500:]}{formatted.stderr[-1500:]}")
        for node in range(self.size):
            self.start_node(node, wait=False)
        for node in range(self.size):
            self._wait(node, timeout_s)
        return self

    def log_path(self, node: int) -> Path:
        return self.log_dir / f"kafka-{node + 1}.log"

    def start_node(self, node: int, wait: bool = True, timeout_s: float = 90.0) -> None:
        """Start node ``node`` (0-based) again on its own ports and storage."""
        with open(self.log_path(node), "ab") as log:
            self.processes[node] = subprocess.Popen(
                self._java("kafka.Kafka", str(self._folder / f"server-{node + 1}.properties")),
                stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self._wait(node, timeout_s)

    def _wait(self, node: int, timeout_s: float) -> None:
        process = self.processes[node]
        assert process is not None
        wait_for_port("127.0.0.1", self.ports[node], process, timeout_s, f"Kafka node {node + 1}",
                      self.log_path(node))

    def kill_node(self, node: int) -> None:
        """SIGKILL node ``node``, as a crash would."""
        process = self.processes[node]
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def pause_node(self, node: int) -> None:
        """SIGSTOP node ``node``: it holds its connections but answers nothing."""
        process = self.processes[node]
        assert process is not None
        process.send_signal(signal.SIGSTOP)

    def resume_node(self, node: int) -> None:
        process = self.processes[node]
        assert process is not None
        process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for process in self.processes:
            if process is not None:
                process.send_signal(signal.SIGCONT)
                stop_process(process, timeout_s=20)
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """``fetch``: cache the jars; ``record``: rewrite checksums.sha256 from a fresh copy."""
    if argv == ["fetch"]:
        print(fetch())
        return 0
    if argv == ["record"]:
        with tempfile.TemporaryDirectory() as folder:
            _copy_jars(Path(folder))
            jars = sorted(Path(folder).glob("*.jar"))
            CHECKSUMS.write_text("".join(f"{_sha256(jar)}  {jar.name}\n" for jar in jars))
        print(f"recorded {len(jars)} jars in {CHECKSUMS}")
        return 0
    print("usage: python -m tests.kafka_broker fetch|record", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
