"""The http source: 202 only once the records are in Kafka, clear refusals, and nothing answered
202 is lost when the process is killed."""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from streamflow.transport.broker import EmbeddedBroker, free_port
from tests.helpers import read_topic
from tests.source_runs import TopicWatcher, kill_and_restart, running, source_pipeline, unique, wait_until

TOKEN = "s3cret-token-0123456789"


def post(port: int, body: bytes, token: str | None = TOKEN, path: str = "/events",
         timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_pipeline(bootstrap: str, topic: str, port: int, **settings: Any) -> dict[str, Any]:
    return source_pipeline(bootstrap, "http", topic, port=port, path="/events", token=TOKEN,
                           **settings)


def test_records_are_in_kafka_when_the_request_is_answered_202(bootstrap: str) -> None:
    topic, port = unique("webhook"), free_port()
    with running(http_pipeline(bootstrap, topic, port, key_field="id")):
        wait_until(lambda: listening(port), 20, "the webhook to listen")
        watcher = TopicWatcher(bootstrap, topic)
        assert post(port, b'{"id": 1, "v": "one"}') == (202, {"accepted": 1})
        assert len(watcher.wait_for(1, timeout_s=5)) == 1
        assert post(port, b'[{"id": 2}, {"id": 3, "nested": {"a": [1, 2]}}]')[0] == 202
        assert post(port, b'{"id": 4}\n\n{"id": 5}\n')[0] == 202
        assert post(port, b"[]") == (202, {"accepted": 0})
        watcher.close()
    records = read_topic(bootstrap, topic)
    assert [json.loads(v)["id"] for v in records.values] == [1, 2, 3, 4, 5]
    assert records.keys == [b"1", b"2", b"3", b"4", b"5"]
    assert json.loads(records.values[2])["nested"] == {"a": [1, 2]}


def test_bad_requests_are_refused_with_the_reason(bootstrap: str) -> None:
    topic, port = unique("webhook"), free_port()
    with running(http_pipeline(bootstrap, topic, port, max_body_bytes=100)):
        wait_until(lambda: listening(port), 20, "the webhook to listen")
        status, body = post(port, b"{not json")
        assert status == 400 and "not JSON" in body["error"]
        status, body = post(port, b'[{"a": 1}, 7]')
        assert status == 400 and body["error"] == "element 1 is a JSON int, expected an object"
        status, body = post(port, b'{"a": 1}\n{"a": \n')
        assert status == 400 and "line 2" in body["error"]
        status, body = post(port, b'{"a": "' + b"x" * 200 + b'"}')
        assert status == 413 and "exceeds 100" in body["error"]
        assert post(port, b'{"a": 1}', token=None)[0] == 401
        assert post(port, b'{"a": 1}', token="wrong-token-0123456789")[0] == 401
        assert post(port, b'{"a": 1}', path="/elsewhere")[0] == 404
        assert post(port, b'{"ok": true}')[0] == 202
    assert [json.loads(v) for v in read_topic(bootstrap, topic).values] == [{"ok": True}]


def test_kafka_down_gives_503_never_a_false_202(tmp_path: Path) -> None:
    topic, port = unique("webhook"), free_port()
    broker = EmbeddedBroker(log_path=None).start()
    try:
        pipeline = http_pipeline(broker.bootstrap, topic, port, ack_timeout_s=1.0)
        pipeline["runtime"] = {"shutdown_timeout_s": 2}
        with running(pipeline):
            wait_until(lambda: listening(port), 20, "the webhook to listen")
            assert post(port, b'{"n": 1}')[0] == 202
            broker.stop()
            status, body = post(port, b'{"n": 2}')
            assert status == 503 and "retry" in body["error"]
    finally:
        broker.stop()


def test_sigkill_loses_nothing_that_was_answered_202(tmp_path: Path, bootstrap: str) -> None:
    topic, port = unique("webhook"), free_port()
    accepted: list[int] = []
    sender_stop = threading.Event()

    def sender(first: int) -> None:
        number = first
        while not sender_stop.is_set():
            body = "\n".join(json.dumps({"n": number + i}) for i in range(5)).encode()
            try:
                status, _ = post(port, body, timeout_s=5)
            except OSError:  # killed mid-request, or not listening yet: a sender retries later
                status = 0
            if status == 202:
                accepted.extend(range(number, number + 5))
            number += 5

    pipeline = http_pipeline(bootstrap, topic, port)
    threads: list[threading.Thread] = []
    before_restart: list[int] = []

    def send_from(first: int, count: int, what: str) -> None:
        wait_until(lambda: listening(port), 30, "the webhook to listen")
        sender_stop.clear()
        threads[:] = [threading.Thread(target=sender, args=(first,), daemon=True)]
        threads[0].start()
        wait_until(lambda: len(accepted) >= len(before_restart) + count, 30, what)

    def stop_sending() -> None:
        sender_stop.set()
        threads[0].join(10)

    def stop_sending_and_note() -> None:
        stop_sending()
        before_restart[:] = accepted

    def send_more_and_stop() -> None:
        # No request in flight at the last SIGKILL: its open transaction would hold back every
        # read_committed reader of the topic and of the source positions until it timed out.
        send_from(1_000_000, 50, "50 more records")
        stop_sending()

    try:
        kill_and_restart(pipeline, tmp_path, before_kill=lambda: send_from(0, 100, "100 accepted records"),
                         while_down=stop_sending_and_note,
                         after_restart=send_more_and_stop,
                         stop_signal=signal.SIGKILL)
    finally:
        if threads:
            stop_sending()
    in_topic = {json.loads(v)["n"] for v in read_topic(bootstrap, topic).values}
    assert set(accepted) <= in_topic, f"answered 202 but missing: {sorted(set(accepted) - in_topic)[:10]}"
    assert any(n >= 1_000_000 for n in in_topic)


def test_a_public_address_requires_a_token() -> None:
    from pydantic import ValidationError

    from connectors.sources.http import HttpConfig

    with pytest.raises(ValidationError, match="set token"):
        HttpConfig(host="0.0.0.0")
    assert HttpConfig(host="0.0.0.0", token=TOKEN).token == TOKEN
    assert HttpConfig(host="::1").token is None
