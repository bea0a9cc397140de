"""What the dashboard reads from the daemon: the 15-minute history sampled from the registry,
the latest dead letters, component states, and their endpoints on the metrics server."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from streamflow.config.models import BatchConfig
from streamflow.metrics import PipelineMetrics
from streamflow.metrics.history import History, quantile
from streamflow.metrics.letters import PREVIEW_BYTES, LatestDeadLetters
from streamflow.metrics.server import MetricsServer
from streamflow.runtime.stage import Stage
from streamflow.runtime.stages import StageIdentity, TopicStage
from streamflow.transport import OutgoingBatch
from tests.stage_harness import World, finish, group, new_world, wait_until


def metrics_with_traffic() -> PipelineMetrics:
    metrics = PipelineMetrics("p")
    metrics.source("gen")
    metrics.stage("clean")
    metrics.stage("lake")  # a sink has the metrics of a stage, and its own
    metrics.sink("lake")
    return metrics


def test_rates_come_from_counter_deltas_between_samples() -> None:
    metrics = metrics_with_traffic()
    source, stage = metrics.source("gen"), metrics.stage("clean")
    history = History(metrics.registry)
    started = time.monotonic()
    first = history.sample()
    assert first.charts["throughput"] == dict.fromkeys(("gen", "clean", "lake"))  # no delta yet
    time.sleep(0.2)
    source.records_produced.inc(100)
    source.records_dead_lettered.inc(4)
    stage.count(100, 90, 6)
    second = history.sample()
    elapsed = time.monotonic() - started
    throughput, dead = second.charts["throughput"], second.charts["dead_letters"]
    assert 96 / elapsed <= throughput["gen"] <= 96 / 0.2  # published to its topic
    assert 90 / elapsed <= throughput["clean"] <= 90 / 0.2
    assert 6 / elapsed <= dead["clean"] <= 6 / 0.2 and 4 / elapsed <= dead["gen"] <= 4 / 0.2
    totals = history.document()["totals"]
    assert totals["gen"] == {"records_in": 100, "records_out": 96, "filtered": 0,
                             "dead_lettered": 4}
    assert totals["clean"] == {"records_in": 100, "records_out": 90, "filtered": 4,
                               "dead_lettered": 6}


def test_lag_latency_and_model_series() -> None:
    metrics = metrics_with_traffic()
    stage, sink = metrics.stage("clean"), metrics.sink("lake")
    stage.lag("t", 0).set(30)
    stage.lag("t", 1).set(12)
    model = metrics.model("predict", "MAE")
    model.metric("MAE", "cumulative", 0).set(1.0)
    model.metric("MAE", "cumulative", 1).set(3.0)
    model.metric("MAE", "rolling", 0).set(0.5)
    history = History(metrics.registry)
    for _ in range(50):
        sink.latency.observe(100)  # before the first sample: not in any interval
    history.sample()
    for _ in range(50):
        sink.latency.observe(0.02)
    sample = history.sample()
    assert sample.charts["lag"] == {"clean": 42}
    assert sample.charts["model"] == {"predict MAE": 2.0, "predict MAE (rolling)": 0.5}
    p50, p95 = sample.charts["latency"]["p50"], sample.charts["latency"]["p95"]
    assert p50 is not None and p95 is not None and 0.01 <= p50 <= p95 <= 0.025
    assert history.sample().charts["latency"] == {"p50": None, "p95": None}  # nothing new


def test_quantile_interpolates_within_a_bucket() -> None:
    buckets = {0.1: 0.0, 0.2: 10.0, float("inf"): 10.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.15)
    assert quantile({float("inf"): 0.0}, 0.5) is None


def test_the_ring_buffer_keeps_the_window_and_serves_what_is_newer() -> None:
    metrics = metrics_with_traffic()
    history = History(metrics.registry, interval_s=1.0, window_s=3.0)
    samples = []
    for _ in range(5):
        samples.append(history.sample())
        time.sleep(0.005)  # times are kept to the millisecond
    document = history.document()
    assert document["t"] == [s.time for s in samples[-3:]]
    assert document["window_s"] == 3.0
    assert set(document["charts"]["throughput"]) == {"gen", "clean", "lake"}
    assert len(document["charts"]["throughput"]["clean"]) == 3
    newer = history.document(after=samples[3].time)
    assert newer["t"] == [samples[4].time]
    assert newer["charts"]["throughput"]["clean"] == [samples[4].charts["throughput"]["clean"]]
    assert history.document(after=samples[4].time)["t"] == []


def test_a_series_that_appears_later_is_null_before() -> None:
    metrics = metrics_with_traffic()
    history = History(metrics.registry)
    history.sample()
    metrics.model("predict", "MAE").metric("MAE", "cumulative", 0).set(0.25)
    history.sample()
    assert history.document()["charts"]["model"] == {"predict MAE": [None, 0.25]}


def letters_batch(count: int, topic: str = "p.dlq", size: int = 10) -> OutgoingBatch:
    return OutgoingBatch(topic, [b"v%d" % n + b"x" * size for n in range(count)],
                         [b"k%d" % n for n in range(count)],
                         [[("streamflow.stage", b"clean"), ("streamflow.error.message", b"bad pw=hunter22")]
                          for _ in range(count)],
                         [1_700_000_000_000 + n for n in range(count)])


def test_latest_dead_letters_are_bounded_numbered_and_previewed() -> None:
    letters = LatestDeadLetters(capacity=5)
    letters.add([letters_batch(3)])
    letters.add([letters_batch(1000, size=5000)])  # only the last 5 are looked at
    document = letters.document(mask=lambda text: text.replace("hunter22", "***"))
    assert document["count"] == 8
    assert [letter["number"] for letter in document["letters"]] == [8, 7, 6, 5, 4]
    newest = document["letters"][0]
    assert newest["key"] == "k999" and newest["topic"] == "p.dlq"
    assert newest["value"].startswith("v999xxx") and len(newest["value"]) == PREVIEW_BYTES
    assert newest["truncated"] and newest["size"] == 5004
    assert newest["time"] == 1_700_000_000.999
    assert newest["headers"] == [["streamflow.stage", "clean"],
                                 ["streamflow.error.message", "bad pw=***"]]
    assert [letter["number"] for letter in letters.document(after=6)["letters"]] == [8, 7]
    assert letters.document(after=8) == {"count": 8, "letters": []}


def test_undecodable_bytes_and_markup_come_back_as_text() -> None:
    letters = LatestDeadLetters()
    letters.add([OutgoingBatch("dlq", [b"<img src=x onerror=alert(1)>\xff"], [None])])
    [letter] = letters.document()["letters"]
    assert letter["value"] == "<img src=x onerror=alert(1)>\ufffd" and letter["key"] is None


@pytest.fixture
def world() -> Iterator[World]:
    yield from new_world("dashboard")


def test_a_topic_stage_keeps_the_dead_letters_it_produced(world: World) -> None:
    metrics = PipelineMetrics(world.pipeline)
    stage = TopicStage(StageIdentity(world.pipeline, "copy", world.input, world.dead_letters),
                       world.transport(), BatchConfig(max_records=25, max_wait_ms=10),
                       metrics.stage("copy"), world.output, [])
    stage.start()
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(stage)
    document = metrics.latest_dead_letters.document()
    kept = {letter["value"].encode() for letter in document["letters"]}
    assert kept == world.poison() and document["count"] == len(world.poison())
    headers = dict(document["letters"][0]["headers"])
    assert headers["streamflow.stage"] == "copy" and headers["streamflow.step"] == "parse"


class Job(Stage):
    def __init__(self, fail: bool) -> None:
        super().__init__("job", "job")
        self.fail = fail
        self.release = threading.Event()

    def _run(self) -> None:
        self.release.wait(10)
        if self.fail:
            self.error = RuntimeError("boom")

    @property
    def last_activity(self) -> float:
        return 0.0

    def is_idle(self, since: float) -> bool:
        return False


@pytest.mark.parametrize("fail, ended", [(False, "finished"), (True, "failed")])
def test_a_component_that_ended_is_finished_unless_an_error_ended_it(fail: bool, ended: str) -> None:
    job = Job(fail)
    job.start()
    assert job.state == "running"
    job.release.set()
    job.join(10)
    assert job.state == ended


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_server_serves_history_dead_letters_and_the_charting_library() -> None:
    metrics = metrics_with_traffic()
    metrics.latest_dead_letters.add([letters_batch(2)])
    server = MetricsServer(metrics.registry, "127.0.0.1", 0,
                           dead_letters=metrics.latest_dead_letters.document).start()
    try:
        wait_until(lambda: len(server.history.samples) >= 1, "the first sample", 10)
        code, body = get(f"{server.url}/api/history")
        assert code == 200 and len(json.loads(body)["t"]) >= 1
        code, body = get(f"{server.url}/api/history?after={time.time() + 60}")
        assert code == 200 and json.loads(body)["t"] == []
        assert get(f"{server.url}/api/history?after=soon")[0] == 400
        assert get(f"{server.url}/api/history?after=nan")[0] == 400
        code, body = get(f"{server.url}/api/dead-letters?after=1")
        assert code == 200 and [letter["number"] for letter in json.loads(body)["letters"]] == [2]
        code, body = get(f"{server.url}/uPlot.iife.min.js")
        assert code == 200 and body.startswith(b"/*! https://github.com/leeoniya/uPlot (v1.6.32)")
        assert get(f"{server.url}/uPlot.min.css")[0] == 200
    finally:
        server.stop()
    assert not server.history._thread.is_alive()
