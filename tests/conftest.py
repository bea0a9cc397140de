"""Shared fixtures: a real Kafka-compatible broker for the whole session.

With a Docker engine answering, testcontainers' Kafka container is used; otherwise the bundled
Tansu broker (the same one ``bootstrap: embedded`` runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from streamflow.transport.broker import EmbeddedBroker
from tests import services


@pytest.fixture(scope="session")
def broker_kind() -> str:
    """'kafka' (an external or containerised Apache Kafka) or 'tansu' (the bundled broker)."""
    if os.environ.get("STREAMFLOW_TEST_BOOTSTRAP"):
        return os.environ.get("STREAMFLOW_TEST_BROKER_KIND", "kafka")
    return "kafka" if services.docker_available() else "tansu"


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory, broker_kind: str) -> Iterator[str]:
    """Bootstrap address of a broker that lives for the whole test session."""
    if os.environ.get("STREAMFLOW_TEST_BOOTSTRAP"):
        yield os.environ["STREAMFLOW_TEST_BOOTSTRAP"]
        return
    if broker_kind == "kafka":
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap


@pytest.fixture
def fresh_broker() -> Iterator[str]:
    """A broker of this test's own (Tansu starts in well under a second), for pipeline runs."""
    with EmbeddedBroker(log_path=None) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL database ``test`` for the whole session (see tests/services.py)."""
    try:
        server = services.postgres()
        dsn = server.__enter__()
    except services.ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield dsn
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def mqtt_address() -> Iterator[tuple[str, int]]:
    """``(host, port)`` of an MQTT broker for the whole session (see tests/services.py)."""
    try:
        server = services.mosquitto()
        address = server.__enter__()
    except services.ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield address
    finally:
        server.__exit__(None, None, None)
