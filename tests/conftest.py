"""Shared fixtures: a real broker, PostgreSQL and Mosquitto, each started by the suite itself.

``STREAMFLOW_TEST_BROKER`` chooses the broker:

- ``kafka`` (the default where Java exists): Apache Kafka in KRaft mode from its Maven Central
  jars (``tests/kafka_broker.py``), or testcontainers' Kafka where only Docker answers;
- ``tansu``: the bundled Tansu broker, the one ``bootstrap: embedded`` runs;
- ``external:HOST:PORT``: a broker that is already running (``fresh_broker`` then shares it).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import settings

from streamflow.transport.broker import EmbeddedBroker
from tests import services
from tests.kafka_broker import KafkaCluster

BROKER_VARIABLE = "STREAMFLOW_TEST_BROKER"
T = TypeVar("T")

# The property tests check outcomes, not speed: no per-example deadline, which a machine running
# the suite on three workers (or anything else) misses now and then (test_dedupe did, at 321 ms).
settings.register_profile("streamflow", deadline=None)
settings.load_profile("streamflow")


def _broker_choice() -> str:
    choice = os.environ.get(BROKER_VARIABLE, "")
    if choice:
        if choice not in ("kafka", "tansu") and not choice.startswith("external:"):
            raise pytest.UsageError(f"{BROKER_VARIABLE}={choice!r}: use kafka, tansu or external:HOST:PORT")
        return choice
    return "kafka" if shutil.which("java") or services.docker_available() else "tansu"


@contextmanager
def _kafka(log_dir: Path) -> Iterator[str]:
    """Apache Kafka from its jars where Java exists, else (or if they cannot be had) Docker's."""
    if shutil.which("java"):
        cluster = KafkaCluster(1, log_dir=log_dir)
        try:
            cluster.start()
        except BaseException as exc:
            cluster.stop()
            if not isinstance(exc, services.ServiceUnavailable):
                raise
            if not services.docker_available():
                pytest.skip(str(exc))
        else:
            try:
                yield cluster.bootstrap
            finally:
                cluster.stop()
            return
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@contextmanager
def _broker(folder: Path) -> Iterator[str]:
    """The bootstrap address of a broker of the chosen kind; logs go to ``folder``."""
    choice = _broker_choice()
    if choice.startswith("external:"):
        yield choice.removeprefix("external:")
    elif choice == "kafka":
        with _kafka(folder) as address:
            yield address
    else:
        with EmbeddedBroker(log_path=folder / "tansu.log") as broker:
            yield broker.bootstrap


@pytest.fixture(scope="session")
def broker_kind() -> str:
    """'kafka' (Apache Kafka, started here or external) or 'tansu' (the bundled broker)."""
    return "tansu" if _broker_choice() == "tansu" else "kafka"


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a broker that lives for the whole test session (per xdist worker)."""
    with _broker(tmp_path_factory.mktemp("broker")) as address:
        yield address


@pytest.fixture
def fresh_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker of this test's own, for pipeline runs with fixed topic and group names."""
    with _broker(tmp_path_factory.mktemp("broker")) as address:
        yield address


def _service_or_skip(server: AbstractContextManager[T]) -> Iterator[T]:
    """What ``server`` yields while it runs; a skip saying how to get one where it cannot run."""
    try:
        value = server.__enter__()
    except services.ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield value
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL database ``test`` for the whole session (see tests/services.py)."""
    yield from _service_or_skip(services.postgres())


@pytest.fixture(scope="session")
def mqtt_address() -> Iterator[tuple[str, int]]:
    """``(host, port)`` of an MQTT broker for the whole session (see tests/services.py)."""
    yield from _service_or_skip(services.mosquitto())


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger's handlers and level, restored after a test that configures logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of a real MLflow tracking server for the whole session (SQLite backend store,
    artifacts in a temporary folder; see tests/services.py), started on first use."""
    with services.mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
