"""Operating the daemon: health and readiness, the live dashboard in a real browser, the metric
catalogue checked by promtool, and a real Prometheus server scraping a running pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import OutgoingBatch, create_transport
from streamflow.transport.broker import free_port
from tests.browser import Browser, chromium_binary
from tests.unit.test_docker_files import dashboard_queries

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"


@contextmanager
def quickstart(broker: str, tmp_path: Path, malformed: float = 0.02) -> Iterator[PipelineRunner]:
    """The quickstart, unbounded at 1,500 records/s with ``malformed`` of them not valid,
    running in a background thread."""
    env = {"STREAMFLOW_BOOTSTRAP": broker, "QUICKSTART_OUTPUT": str(tmp_path / "lake"),
           "QUICKSTART_CHECKPOINTS": str(tmp_path / "checkpoints"),
           "QUICKSTART_COUNT": "10000000", "QUICKSTART_RATE": "1500"}
    config = load_pipeline(QUICKSTART, env)
    config.runtime.commit_interval_s = 0.5
    config.sources[0].malformed_fraction = malformed
    runner = PipelineRunner(config, metrics_port=free_port())
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        yield runner
    finally:
        runner.stop()
        thread.join(60)


@pytest.fixture
def running_pipeline(fresh_broker: str, tmp_path: Path) -> Iterator[PipelineRunner]:
    with quickstart(fresh_broker, tmp_path) as runner:
        yield runner


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except urllib.error.URLError:
        return 0, b""  # not listening yet


def wait_until(predicate: Any, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.2)


def base_url(runner: PipelineRunner) -> str:
    wait_until(lambda: runner.metrics_server is not None, what="metrics server")
    assert runner.metrics_server is not None
    return f"http://127.0.0.1:{runner.metrics_server.port}"


def test_health_and_readiness(running_pipeline: PipelineRunner) -> None:
    url = base_url(running_pipeline)
    assert get(f"{url}/healthz") == (200, b"ok\n")
    status, body = get(f"{url}/readyz")
    if status == 503:  # still joining consumer groups: the reason says so
        assert "reason" in json.loads(body)
    wait_until(lambda: get(f"{url}/readyz")[0] == 200, what="readiness")
    assert json.loads(get(f"{url}/readyz")[1]) == {"status": "ready"}


def test_readyz_is_503_with_a_reason_while_kafka_is_unreachable(tmp_path: Path) -> None:
    env = {"STREAMFLOW_BOOTSTRAP": f"127.0.0.1:{free_port()}", "QUICKSTART_OUTPUT": str(tmp_path)}
    runner = PipelineRunner(load_pipeline(QUICKSTART, env), metrics_port=free_port())
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        url = base_url(runner)
        status, body = get(f"{url}/readyz")
        assert status == 503
        assert "waiting for Kafka" in json.loads(body)["reason"]
        time.sleep(2)
        assert thread.is_alive(), "the daemon must wait for the broker, not crash"
    finally:
        runner.stop()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="needs promtool (apt-get install prometheus)")
def test_promtool_accepts_the_metrics(running_pipeline: PipelineRunner) -> None:
    url = base_url(running_pipeline)
    wait_until(lambda: b"streamflow_model_metric{" in get(f"{url}/metrics")[1], what="model metric")
    text = get(f"{url}/metrics")[1]
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    for name in ("streamflow_build_info", "streamflow_records_in_total",
                 "streamflow_end_to_end_latency_seconds_bucket",
                 "streamflow_consumer_lag_records", "streamflow_sink_bytes_written_total",
                 "streamflow_checkpoint_last_success_timestamp_seconds",
                 "streamflow_last_processed_timestamp_seconds",
                 'streamflow_record_errors_total{pipeline="quickstart",stage="clean",step="sql"} 0.0'):
        assert name.encode() in text, name


MARKUP = "<img src=x onerror=alert(1)>"  # a known bad record: no JSON, and markup


@pytest.mark.skipif(chromium_binary() is None, reason="needs chromium (apt-get install chromium)")
def test_dashboard_charts_update_in_a_real_browser(fresh_broker: str, tmp_path: Path) -> None:
    """The charts grow; a reload draws the history, with rates, at its first paint; the
    dead-letter panel shows a bad record's value as text. Few records are malformed here
    (1.5/s), so the panel's latest 50 dead letters still hold the bad record."""
    with quickstart(fresh_broker, tmp_path, malformed=0.001) as runner:
        url = base_url(runner)
        wait_until(lambda: get(f"{url}/readyz")[0] == 200, what="readiness")
        ARTIFACTS.mkdir(exist_ok=True)
        with Browser(f"{url}/") as browser:
            page = DashboardPage(browser)
            # An alert would mean that a bad record's markup ran.
            no_alerts = "window.alert = () => { window.alerted = true; };"
            browser.evaluate(no_alerts)
            browser.call("Page.enable")  # without it, the script below is not run on a reload
            browser.call("Page.addScriptToEvaluateOnNewDocument", source=no_alerts)
            wait_until(lambda: page.updates() >= 2, 30, "two dashboard refreshes")
            first = page.charts()["chart-throughput"]["points"]
            wait_until(lambda: page.updates() >= 6, 30, "six dashboard refreshes")
            before = page.charts()
            create_transport("confluent", fresh_broker).producer().produce(
                [OutgoingBatch("sensors.raw", [MARKUP.encode()], [b"markup-probe"])])
            wait_until(lambda: b"markup-probe" in get(f"{url}/api/dead-letters")[1], 30,
                       "the bad record dead-lettered")
            alerted = browser.evaluate("window.alerted === true")
            # A reload draws the daemon's history, with rates, at its first paint.
            browser.evaluate("window.beforeReload = true; location.reload()")
            wait_until(lambda: browser.evaluate(
                "!window.beforeReload && document.body.dataset.updates === '1'"), 30,
                "the reloaded page's first update")
            reloaded, rates, letters = page.charts(), page.rates(), page.dead_letters()
            images = browser.evaluate("document.querySelectorAll('#dead-letters img').length")
            alerted = alerted or browser.evaluate("window.alerted === true")
            totals = page.totals()
            states = browser.evaluate("""Object.fromEntries([...document.querySelectorAll(
                '#graph .node[data-state]')].map(n => [n.dataset.name, n.dataset.state]))""")
            browser.screenshot(ARTIFACTS / "dashboard.png", full_page=True)
    assert before["chart-throughput"]["points"] > first
    assert reloaded["chart-throughput"]["points"] >= before["chart-throughput"]["points"]
    assert max(reloaded["chart-throughput"]["last"].values()) > 0, reloaded
    for chart in ("chart-lag", "chart-dead_letters", "chart-latency", "chart-model"):
        assert reloaded[chart]["points"] > 0, chart
    assert any(name.endswith("(rolling)") for name in reloaded["chart-model"]["last"])
    assert set(rates) == {"sensors", "clean", "predict", "lake", "quickstart.dlq"}
    assert all(rate.endswith(" /s") for rate in rates.values()), rates
    assert not rates["clean"].startswith("0 "), rates
    assert states == dict.fromkeys(["sensors", "clean", "predict", "lake"], "running")
    assert {name: row["kind"] for name, row in totals.items()} == {
        "sensors": "source", "clean": "processor", "predict": "model", "lake": "sink"}
    assert all(row["cells"][1] != "0" for row in totals.values()), totals  # records in
    assert totals["clean"]["cells"][4] != "0", totals  # dead-lettered
    probe = [letter for letter in letters if letter["key"] == "markup-probe"]
    assert probe, letters
    assert probe[0]["value"] == MARKUP and probe[0]["error"].startswith("DecodeError")
    assert probe[0]["headers"] >= 5 and images == 0 and not alerted
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


class DashboardPage:
    """What the dashboard in ``browser`` shows, read from its DOM."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser

    def updates(self) -> int:
        return int(self.browser.evaluate("Number(document.body.dataset.updates || 0)") or 0)

    def charts(self) -> dict[str, Any]:
        """By chart: its points drawn and each series' last value."""
        return dict(self.browser.evaluate("""Object.fromEntries(
            [...document.querySelectorAll('.chart')].map(c => [c.id,
                {points: Number(c.dataset.points), last: JSON.parse(c.dataset.last || '{}')}]))"""))

    def rates(self) -> dict[str, str]:
        """The rate shown in each node of the pipeline graph."""
        return dict(self.browser.evaluate("""Object.fromEntries(
            [...document.querySelectorAll('#graph .node')]
            .map(n => [n.dataset.name, n.querySelector('.rate').textContent]))"""))

    def totals(self) -> dict[str, dict[str, Any]]:
        """Each row of the totals table by component: its kind and cells."""
        return dict(self.browser.evaluate("""Object.fromEntries(
            [...document.querySelectorAll('#totals tr[data-name]')].map(r => [r.dataset.name,
                {kind: r.dataset.kind, cells: [...r.children].map(c => c.textContent)}]))"""))

    def dead_letters(self) -> list[dict[str, Any]]:
        return list(self.browser.evaluate("""[...document.querySelectorAll('#dead-letters tbody tr')]
            .map(r => ({key: r.children[3].textContent, error: r.children[2].textContent,
                        value: r.querySelector('.value').textContent,
                        headers: r.querySelectorAll('dt').length}))"""))


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="needs prometheus (apt-get install prometheus)")
def test_prometheus_scrapes_a_nonzero_rate_for_every_stage(
    running_pipeline: PipelineRunner, tmp_path: Path
) -> None:
    url = base_url(running_pipeline)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: streamflow\n    static_configs: [{{targets: ['{url.split('//')[1]}']}}]\n"
    )
    server = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    query = urllib.parse.quote("sum by (stage) (rate(streamflow_records_out_total[10s]))")
    rates: dict[str, float] = {}

    def every_stage_flowing() -> bool:
        status, body = get(f"http://127.0.0.1:{port}/api/v1/query?query={query}")
        if status != 200:
            return False
        result = json.loads(body)["data"]["result"]
        rates.update({r["metric"]["stage"]: float(r["value"][1]) for r in result})
        return {"clean", "predict", "lake"} <= {s for s, v in rates.items() if v > 0}

    try:
        wait_until(every_stage_flowing, 90, "a non-zero rate for every stage in Prometheus")
        # Every query of the provisioned Grafana dashboard is valid and returns data.
        empty = []
        for expr in dashboard_queries():
            status, body = get(f"http://127.0.0.1:{port}/api/v1/query?query="
                               f"{urllib.parse.quote(expr)}")
            assert status == 200, (expr, body)
            if not json.loads(body)["data"]["result"]:
                empty.append(expr)
    finally:
        server.terminate()
        server.wait(10)
    assert all(rates[stage] > 0 for stage in ("clean", "predict", "lake")), rates
    assert not empty, f"dashboard queries without data: {empty}"


def test_a_transient_sink_failure_restarts_the_stage_and_loses_nothing(
    fresh_broker: str, tmp_path: Path
) -> None:
    from streamflow import Pipeline

    lake = tmp_path / "lake"
    pipeline = (
        Pipeline("flaky", bootstrap=fresh_broker)
        .topic("raw", partitions=2)
        .source("gen", "generator", topic="raw", count=3000, rate=0)
        .sink("lake", "tests.plugins:FlakySink", input="raw", path=str(lake), failures=2)
        .configure("metrics", port=0)
        .configure("runtime", commit_interval_s=0.5)
        .build()
    )
    runner = PipelineRunner(pipeline, until_idle_s=2)
    result = runner.run()
    assert result.exit_code == 0, result.errors
    restarts = runner.metrics.registry.get_sample_value(
        "streamflow_stage_restarts_total", {"pipeline": "flaky", "stage": "lake"})
    assert restarts == 2
    import duckdb

    rows = duckdb.sql(f"SELECT count(DISTINCT ts) FROM read_parquet('{lake}/*.parquet')")
    assert rows.fetchall()[0][0] == 3000


def test_status_command_prints_a_table_of_a_running_daemon(
    running_pipeline: PipelineRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamflow.cli import main

    url = base_url(running_pipeline)
    wait_until(lambda: get(f"{url}/readyz")[0] == 200, what="readiness")
    wait_until(lambda: b'stage="lake"} ' in get(f"{url}/metrics")[1]
               and running_pipeline.metrics.registry.get_sample_value(
                   "streamflow_records_out_total", {"pipeline": "quickstart", "stage": "lake"}),
               what="records at the sink")
    assert main(["status", "--url", url]) == 0
    output = capsys.readouterr().out.splitlines()
    assert output[0] == "status: ready"
    assert output[1].split() == ["stage", "in", "out", "filtered", "dead_lettered", "lag",
                                 "last", "batch"]
    assert [line.split()[0] for line in output[2:]] == ["clean", "lake", "predict"]


def test_status_command_says_when_no_daemon_answers(capsys: pytest.CaptureFixture[str]) -> None:
    from streamflow.cli import main

    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "no streamflow daemon answers" in capsys.readouterr().err
