"""The http source against hostile clients: header and body timeouts (a chunked body dribbled
past its timeout too), bounded connections, chunked bodies within their limit, a
short body refused, undecodable bodies answered 400; /readyz waits for its listener; a record too
large for Kafka is dead-lettered, its request answered 413 naming it, and the webhook goes on."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from streamflow.config import parse_pipeline
from streamflow.runtime import sources
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport.broker import free_port
from tests.helpers import read_topic
from tests.source_runs import running, source_pipeline, unique, wait_until


def post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw(port: int, data: bytes) -> socket.socket:
    """A connection that has sent ``data``."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(data)
    return connection


def status_of(connection: socket.socket) -> int | None:
    """The status code the server answered on ``connection``, None if it closed without one."""
    answer = b""
    while chunk := connection.recv(4096):
        answer += chunk
        if b"\r\n" in answer:
            break
    return int(answer.split()[1]) if answer else None


@contextmanager
def webhook(bootstrap: str, **settings: Any) -> Iterator[tuple[int, str]]:
    topic, port = unique("hooks"), free_port()
    with running(source_pipeline(bootstrap, "http", topic, port=port, **settings)):
        yield port, topic


def test_a_body_shorter_than_its_content_length_is_refused(bootstrap: str) -> None:
    with webhook(bootstrap) as (port, topic):
        connection = raw(port, b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"n": 1}')
        connection.shutdown(socket.SHUT_WR)  # the client half-closes: no more body comes
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"body ended after 8 of its 100 bytes" in answer
        connection.close()
        assert post(port, b'{"n": 2}')[0] == 202
    assert [json.loads(value) for value in read_topic(bootstrap, topic).values] == [{"n": 2}]


@pytest.mark.parametrize("body", [
    b'{"s": "\\ud800"}',
    b'[{"s": "ok"}, {"s": "\\udfff"}]',
    b'{"key": "\\ud800"}',
    b"[" * 3000 + b"]" * 3000,
    b'{"a": ' * 3000 + b"1" + b"}" * 3000,
    b'{"n": 1}\n' + b"[" * 3000 + b"]" * 3000,
], ids=["surrogate", "surrogate-in-array", "surrogate-key-field", "deep-array", "deep-object",
        "deep-ndjson-line"])
def test_undecodable_bodies_are_answered_400_and_publish_nothing(bootstrap: str, body: bytes) -> None:
    with webhook(bootstrap, key_field="key") as (port, topic):
        status, answer = post(port, body)
        assert status == 400, answer
        assert answer["error"]
        assert post(port, b'{"n": 2}')[0] == 202
    assert [json.loads(value) for value in read_topic(bootstrap, topic).values] == [{"n": 2}]


def test_slow_headers_and_slow_bodies_are_cut_off(bootstrap: str) -> None:
    with webhook(bootstrap, header_timeout_s=1, body_timeout_s=1) as (port, _topic):
        dribbling = raw(port, b"POST / HTTP/1.1\r\n")
        started = time.monotonic()
        with pytest.raises(OSError):  # cut off while it still sends a header byte every 0.2 s
            for _ in range(50):
                dribbling.sendall(b"X")
                time.sleep(0.2)
        assert time.monotonic() - started < 5
        dribbling.close()

        stalled = raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        assert status_of(stalled) in (400, None)
        assert time.monotonic() - started < 5
        stalled.close()


def accepted(port: int, body: bytes) -> bool:
    """Whether the webhook answered 202; False while it still refuses or drops connections."""
    try:
        return post(port, body)[0] == 202
    except OSError:  # the connection was closed as the slots were still full
        return False


def test_connections_beyond_the_limit_are_answered_503_and_threads_stay_bounded(bootstrap: str) -> None:
    with webhook(bootstrap, max_connections=4, header_timeout_s=30) as (port, _topic):
        threads_before = threading.active_count()
        half_sent = [raw(port, b"POST / HTTP/1.1\r\nContent-Le") for _ in range(200)]
        time.sleep(0.5)
        assert threading.active_count() < threads_before + 4  # not a thread per connection
        assert status_of(raw(port, b"POST / HTTP/1.1\r\n")) == 503
        for connection in half_sent:
            connection.close()
        wait_until(lambda: accepted(port, b'{"n": 1}'), 10, "a free connection slot")


def test_readyz_waits_for_the_webhook_to_listen(bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    read_positions = sources.read_positions

    def slow_read_positions(*args: Any) -> dict[str, Any]:
        release.wait(30)
        return read_positions(*args)

    monkeypatch.setattr(sources, "read_positions", slow_read_positions)
    port = free_port()
    runner = PipelineRunner(parse_pipeline(source_pipeline(bootstrap, "http", unique("hooks"), port=port)),
                            metrics_port=0)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: bool(runner.sources) and runner.sources[0].thread.is_alive(), 30,
                   "the source thread")
        time.sleep(0.5)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # not listening yet
        ready, detail = runner.readiness()
        assert not ready, detail
        release.set()
        wait_until(lambda: runner.readiness()[0], 30, "readiness")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) == 0
    finally:
        release.set()
        runner.stop()
        thread.join(30)


def test_a_one_megabyte_post_is_dead_lettered_answered_413_and_the_webhook_goes_on(
    bootstrap: str,
) -> None:
    document = {"n": 1, "blob": ""}
    document["blob"] = "x" * (1_048_576 - len(json.dumps(document)))
    body = json.dumps(document).encode()
    assert len(body) == 1_048_576  # the default max_body_bytes
    topic, port = unique("hooks"), free_port()
    pipeline = source_pipeline(bootstrap, "http", topic, port=port)
    dead_letter_topic = f"{pipeline['pipeline']}.dlq"
    with running(pipeline):
        status, answer = post(port, body)
        assert status == 413
        assert answer["accepted"] == 0
        assert answer["dead_lettered"] == [0]
        assert answer["dead_letter_topic"] == dead_letter_topic
        assert "too large for Kafka" in answer["error"]
        assert post(port, b'{"n": 2}') == (202, {"accepted": 1})
    assert [json.loads(value) for value in read_topic(bootstrap, topic).values] == [{"n": 2}]
    dead = read_topic(bootstrap, dead_letter_topic)
    assert len(dead) == 1
    assert dict(dead.headers[0] or [])["streamflow.stage"] == b"src"


def test_a_request_with_one_record_too_large_names_it_and_publishes_the_others(
    bootstrap: str,
) -> None:
    big = {"n": 1, "blob": "x" * 1_100_000}  # over both clients' own limits
    body = json.dumps([{"n": 0}, big, {"n": 2}]).encode()
    topic, port = unique("hooks"), free_port()
    pipeline = source_pipeline(bootstrap, "http", topic, port=port, max_body_bytes=2_000_000)
    with running(pipeline):
        status, answer = post(port, body)
        assert (status, answer["accepted"], answer["dead_lettered"]) == (413, 2, [1])
        assert post(port, b'{"n": 3}') == (202, {"accepted": 1})  # the next request is its own
    assert [json.loads(value)["n"] for value in read_topic(bootstrap, topic).values] == [0, 2, 3]
    dead = read_topic(bootstrap, f"{pipeline['pipeline']}.dlq")
    assert len(dead) == 1  # truncated: the dead-letter topic refuses it whole too
    assert dead.values[0].startswith(b'{"n":1,')
    letter = dict(dead.headers[0] or [])
    assert letter["streamflow.original.size"] == b"%d" % len(json.dumps(big, separators=(",", ":")))
    assert letter["streamflow.source.index"] == b"1"


def test_a_chunked_body_is_taken_and_one_over_the_limit_refused(bootstrap: str) -> None:
    def post_chunked(port: int, chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", "/", body=iter(chunks), encode_chunked=True,
                               headers={"Transfer-Encoding": "chunked"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    with webhook(bootstrap, max_body_bytes=100) as (port, topic):
        assert post_chunked(port, [b'{"n": 1}\n', b'{"n"', b': 2}\n']) == (202, {"accepted": 2})
        status, answer = post_chunked(port, [b'{"n": 3, "s": "', b"x" * 60, b"x" * 60, b'"}'])
        assert status == 413 and "exceeds 100" in answer["error"]
    assert [json.loads(value) for value in read_topic(bootstrap, topic).values] == [{"n": 1}, {"n": 2}]


def test_a_chunked_body_dribbled_past_the_body_timeout_is_cut_off(bootstrap: str) -> None:
    with webhook(bootstrap, header_timeout_s=1, body_timeout_s=2) as (port, topic):
        slow = raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):  # each chunk comes well within header_timeout_s
            while not select.select([slow], [], [], 0.3)[0]:
                slow.sendall(b"1\r\n \r\n")
                assert time.monotonic() - started < 10
        assert status_of(slow) in (400, None)
        assert 1.9 < time.monotonic() - started < 6
        slow.close()
        assert post(port, b'{"n": 1}')[0] == 202
    assert [json.loads(value) for value in read_topic(bootstrap, topic).values] == [{"n": 1}]
