"""The metrics and dashboard server: loopback by default, a warning elsewhere, and connections
that cannot hold a connection slot forever."""

from __future__ import annotations

import logging
import select
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streamflow.config.models import MetricsConfig
from streamflow.metrics.server import MetricsServer
from streamflow.plugins.loopback import is_loopback


@contextmanager
def serving(host: str = "127.0.0.1", **limits: Any) -> Iterator[MetricsServer]:
    server = MetricsServer(CollectorRegistry(), host, 0, **limits).start()
    try:
        yield server
    finally:
        server.stop()


def half_sent(server: MetricsServer) -> socket.socket:
    """A connection that sent a request line and one header, but never the blank line."""
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    return connection


def closed_without_response(connection: socket.socket) -> bool:
    try:
        return connection.recv(1024) == b""
    except ConnectionResetError:
        return True


def closed_after(connection: socket.socket) -> float:
    """Seconds until the server closes ``connection`` without a response."""
    started = time.monotonic()
    assert closed_without_response(connection)
    return time.monotonic() - started


def healthy(server: MetricsServer) -> bool:
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=5) as response:
        return bool(response.status == 200)


def test_the_default_host_is_loopback() -> None:
    assert MetricsConfig().host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("metrics.example") and not is_loopback("::")


def test_listening_beyond_loopback_is_logged_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="streamflow.metrics.server"), serving() as server:
        assert server.url.startswith("http://127.0.0.1:") and healthy(server)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="streamflow.metrics.server"), serving("0.0.0.0") as server:
        assert healthy(server)
    [record] = caplog.records
    assert "listen on 0.0.0.0, beyond this machine, without authentication" in record.getMessage()


def test_a_half_sent_request_is_dropped_after_the_read_timeout() -> None:
    with serving(read_timeout_s=0.5) as server, half_sent(server) as connection:
        assert 0.4 < closed_after(connection) < 5
        assert healthy(server)


def test_a_request_sent_a_byte_at_a_time_is_dropped_at_its_deadline() -> None:
    with serving(read_timeout_s=0.5, deadline_s=1.0) as server, half_sent(server) as connection:
        started = time.monotonic()
        while not select.select([connection], [], [], 0.1)[0]:
            connection.sendall(b"X")  # each byte well within the read timeout
            assert time.monotonic() - started < 10
        assert closed_without_response(connection)
        assert 0.9 < time.monotonic() - started < 5


def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    with serving(read_timeout_s=1.0, max_connections=2) as server:
        holders = [half_sent(server), half_sent(server)]
        time.sleep(0.2)  # both are being served
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as refused:
            assert closed_after(refused) < 0.5
        for holder in holders:
            assert closed_after(holder) < 5
            holder.close()
        assert healthy(server)
