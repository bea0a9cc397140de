"""The aiohttp listener under the metrics server and the http source: keep-alive, chunked bodies,
a half-closing peer still answered, and peers that stall (sending or taking an answer) dropped."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aiohttp import web

from streamflow.plugins.listeners import ConnectionLimits, Listener

BIG = b"x" * 32_000_000  # more than the socket buffers on both sides hold


async def echo_length(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


async def big(_request: web.Request) -> web.Response:
    return web.Response(body=BIG)


@contextmanager
def listening(read_timeout_s: float = 0.5, deadline_s: float = 5.0) -> Iterator[Listener]:
    listener = Listener([web.post("/echo", echo_length), web.get("/big", big)], "127.0.0.1", 0,
                        "test-listener", ConnectionLimits(4, read_timeout_s, deadline_s)).start()
    try:
        yield listener
    finally:
        listener.stop()


def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Seconds until ``condition`` held, failing after ``seconds``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds
        time.sleep(0.02)
    return time.monotonic() - started


def test_requests_share_a_connection_until_it_idles_past_the_read_timeout() -> None:
    with listening() as listener:
        connection = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
        for body in (b"abc", b"defgh"):
            connection.request("POST", "/echo", body=body)
            assert connection.getresponse().read() == str(len(body)).encode()
        assert listener.connections == 1
        assert 0.3 < within(5, lambda: listener.connections == 0) < 2
        connection.close()


def test_a_chunked_body_is_read_whole() -> None:
    with listening() as listener:
        connection = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
        connection.request("POST", "/echo", body=iter([b"x" * 70_000, b"", b"y" * 5]),
                           encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        assert connection.getresponse().read() == b"70005"
        connection.close()


def test_a_peer_that_half_closes_after_its_request_gets_the_answer() -> None:
    with listening() as listener, socket.create_connection(("127.0.0.1", listener.port),
                                                            timeout=10) as peer:
        peer.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd")
        peer.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := peer.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n4")
        within(2, lambda: listener.connections == 0)


def test_a_peer_that_does_not_take_its_answer_is_dropped_after_the_read_timeout() -> None:
    with listening() as listener, socket.create_connection(("127.0.0.1", listener.port),
                                                            timeout=10) as peer:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        within(2, lambda: listener.connections == 1)
        assert 0.3 < within(5, lambda: listener.connections == 0) < 3

