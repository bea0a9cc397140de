"""Guards of the confluent transport around librdkafka: the consumer's view of whether its
partitions' leaders answer, from librdkafka's statistics reports (shaped as STATISTICS.md
documents them), and the producer's bound on a call that may never return."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamflow.metrics import PipelineMetrics
from streamflow.transport import confluent
from streamflow.transport.base import STILL_BLOCKED, TransportError
from streamflow.transport.confluent import ConfluentTransport, _Leaders


def broker(node: int, state: str = "UP", waiting: int = 1, answered: int = 2,
           source: str = "learned") -> dict[str, Any]:
    return {"name": f"127.0.0.1:{9000 + node}/{node}", "nodeid": node, "source": source,
            "state": state, "waitresp_cnt": waiting, "rtt": {"cnt": answered}}


def report(*brokers: dict[str, Any], leaders: dict[int, int] | None = None) -> str:
    leaders = {0: 1, 1: 2, 2: 3} if leaders is None else leaders
    return json.dumps({
        "brokers": {entry["name"]: entry for entry in brokers},
        "topics": {"raw": {"partitions": {
            **{str(p): {"partition": p, "leader": leader} for p, leader in leaders.items()},
            "-1": {"partition": -1, "leader": -1},
        }}},
    })


ALL = [("raw", 0), ("raw", 1), ("raw", 2)]


def test_brokers_that_answer_leave_every_partition_reachable() -> None:
    leaders = _Leaders(1000)
    for _ in range(3):
        leaders.update(report(broker(1), broker(2), broker(3, waiting=0, answered=0)))
    assert leaders.unreachable(ALL) is None


def test_a_connection_down_in_two_reports_in_a_row_makes_its_partitions_unreachable() -> None:
    leaders = _Leaders(1000)
    leaders.update(report(broker(1), broker(2, state="TRY_CONNECT"), broker(3)))
    assert leaders.unreachable(ALL) is None, "one report is no outage (a connection being set up)"
    leaders.update(report(broker(1), broker(2, state="CONNECT"), broker(3)))
    assert leaders.unreachable(ALL) == ("broker 2, leader of raw[1]: its connection is CONNECT "
                                        "(2 reports in a row, 1000 ms apart)")
    assert leaders.unreachable([("raw", 0), ("raw", 2)]) is None, "only its own partitions"
    leaders.update(report(broker(1), broker(2), broker(3)))
    assert leaders.unreachable(ALL) is None, "up again"


def test_a_broker_that_holds_requests_and_answers_none_is_unreachable() -> None:
    leaders = _Leaders(1000)
    for _ in range(2):
        leaders.update(report(broker(1, waiting=3, answered=0), broker(2), broker(3),
                              leaders={0: 1, 1: 1, 2: 3}))
    assert leaders.unreachable(ALL) == ("broker 1, leader of raw[0], raw[1]: it answers no "
                                        "request (2 reports in a row, 1000 ms apart)")
    leaders.update(report(broker(1, waiting=3, answered=1), broker(2), broker(3)))
    assert leaders.unreachable(ALL) is None


def test_a_long_fetch_wait_needs_more_silent_reports() -> None:
    leaders = _Leaders(1000, fetch_wait_ms=3000)  # a fetch may go unanswered for 3 s
    for _ in range(4):
        leaders.update(report(broker(1, waiting=1, answered=0), broker(2), broker(3)))
    assert leaders.unreachable(ALL) is None
    leaders.update(report(broker(1, waiting=1, answered=0), broker(2), broker(3)))
    assert leaders.unreachable(ALL) == ("broker 1, leader of raw[0]: it answers no request "
                                        "(5 reports in a row, 1000 ms apart)")


def test_without_statistics_reports_nothing_is_judged() -> None:
    leaders = _Leaders(0)  # statistics.interval.ms 0: librdkafka sends none
    assert leaders.unreachable(ALL) is None


def test_bad_reports_must_come_in_a_row() -> None:
    leaders = _Leaders(1000)
    for state in ("TRY_CONNECT", "UP", "TRY_CONNECT"):
        leaders.update(report(broker(1, state=state), broker(2), broker(3)))
    assert leaders.unreachable(ALL) is None


def test_a_partition_without_a_leader_is_unreachable_at_once() -> None:
    leaders = _Leaders(1000)
    leaders.update(report(broker(1), broker(2), broker(3), leaders={0: 1, 1: -1, 2: 3}))
    assert leaders.unreachable(ALL) == "no leader for raw[1]"


def test_bootstrap_and_coordinator_entries_do_not_count() -> None:
    leaders = _Leaders(1000)
    aliases = [{**broker(-1, state="TRY_CONNECT"), "name": "127.0.0.1:9092/bootstrap"},
               {**broker(1, state="INIT", source="logical"), "name": "GroupCoordinator"}]
    for _ in range(2):
        leaders.update(report(*aliases, broker(1), broker(2), broker(3)))
    assert leaders.unreachable(ALL) is None


def test_before_any_report_nothing_is_known_unreachable() -> None:
    assert _Leaders(1000).unreachable(ALL) is None


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> confluent.ConfluentProducer:
    monkeypatch.setattr(confluent, "_WEDGE_GRACE_S", 0.2)
    made = ConfluentTransport("127.0.0.1:9").producer()  # nothing listens: never connects
    assert isinstance(made, confluent.ConfluentProducer)
    return made


def test_a_bounded_call_returns_or_raises_as_the_call_does(
        producer: confluent.ConfluentProducer) -> None:
    seen: list[float] = []
    producer._call_bounded(lambda timeout_s: seen.append(timeout_s), timeout_s=0.1)
    assert seen == [0.1], "the call gets its own timeout"

    def refused(_timeout_s: float) -> None:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "coordinator load in progress"))

    with pytest.raises(TransportError, match="coordinator load in progress"):
        producer._call_bounded(refused, timeout_s=0.1)
    producer._call_bounded(lambda _timeout_s: None, timeout_s=0.1)  # not wedged by a failure


def test_a_call_that_never_returns_wedges_the_producer(
        producer: confluent.ConfluentProducer) -> None:
    def send_offsets_to_transaction(_timeout_s: float) -> None:
        time.sleep(30)  # as librdkafka 2.16 can, for a group coordinator that left the cluster

    started = time.monotonic()
    with pytest.raises(TransportError, match=r"send_offsets_to_transaction did not return "
                                             r"within 0.1 s plus 0.2 s"):
        producer._call_bounded(send_offsets_to_transaction, timeout_s=0.1)
    assert time.monotonic() - started < 2
    with pytest.raises(TransportError, match="did not return"):
        producer.abort_transaction()  # fails at once: the stage fails and replaces it
    started = time.monotonic()
    producer.close()
    assert time.monotonic() - started < 2, "closing a wedged producer waits for nothing"


def test_a_given_up_call_is_counted_until_it_returns_at_last_which_is_said(
        producer: confluent.ConfluentProducer, caplog: pytest.LogCaptureFixture) -> None:
    released = threading.Event()
    before = len(STILL_BLOCKED)
    with pytest.raises(TransportError, match=rf"\({before + 1} calls given up in this process "
                                             r"are still blocked\)"):
        producer._call_bounded(lambda _timeout_s: released.wait(30), timeout_s=0.1)
    metrics = PipelineMetrics("p")
    gauge = ("streamflow_kafka_calls_still_blocked", {"pipeline": "p"})
    assert metrics.registry.get_sample_value(*gauge) == before + 1
    caplog.set_level(logging.INFO, logger=confluent.__name__)
    released.set()  # as when another broker changes state (librdkafka 5511)
    deadline = time.monotonic() + 5
    while "returned: its producer is released" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert re.search(rf"<lambda>, given up \d+ s ago, returned: its producer is released "
                     rf"\({before} calls given up are still blocked\)", caplog.text), caplog.text
    assert len(STILL_BLOCKED) == before
    assert metrics.registry.get_sample_value(*gauge) == before
