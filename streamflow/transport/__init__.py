"""Kafka clients behind one small interface, and the embedded broker."""

from __future__ import annotations

from collections.abc import Mapping

from streamflow.transport.base import (
    Admin,
    AuthenticationError,
    ConsumedBatch,
    Consumer,
    OutgoingBatch,
    Producer,
    Reader,
    RebalanceInProgressError,
    RebalanceListener,
    RecordTooLargeError,
    TopicPartition,
    TopicSpec,
    Transport,
    TransportError,
    calls_still_blocked,
    read_until,
)

CLIENTS = ("confluent", "kafka-python")  # the clients of real brokers
MEMORY = "memory"  # the in-process cluster of streamflow.transport.memory, for broker-free tests


def create_transport(
    client: str, bootstrap: str, client_config: Mapping[str, str] | None = None
) -> Transport:
    """The transport named by ``kafka.client``, or by ``"memory"`` for the in-process cluster
    named by ``bootstrap`` (``memory://NAME``, see :mod:`streamflow.transport.memory`)."""
    if client == "confluent":
        from streamflow.transport.confluent import ConfluentTransport

        return ConfluentTransport(bootstrap, client_config)
    if client == "kafka-python":
        from streamflow.transport.kafkapython import KafkaPythonTransport

        return KafkaPythonTransport(bootstrap, client_config)
    if client == MEMORY:
        from streamflow.transport.memory import MemoryTransport

        return MemoryTransport(bootstrap, client_config)
    raise ValueError(f"unknown kafka.client {client!r}; choose one of {', '.join(CLIENTS)}")


__all__ = [
    "CLIENTS",
    "MEMORY",
    "Admin",
    "AuthenticationError",
    "ConsumedBatch",
    "Consumer",
    "OutgoingBatch",
    "Producer",
    "Reader",
    "RebalanceInProgressError",
    "RebalanceListener",
    "RecordTooLargeError",
    "TopicPartition",
    "TopicSpec",
    "Transport",
    "TransportError",
    "calls_still_blocked",
    "create_transport",
    "read_until",
]
