"""No silent runs, without a broker: dead-letter reasons, the totals read from the registry, the
summary as tables and as one JSON log line, the dead-letter share warning and /readyz."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest
from rich.console import Console

from streamflow.config import parse_pipeline
from streamflow.config.models import DeadLetterWarningConfig
from streamflow.metrics import PipelineMetrics
from streamflow.metrics.registry import EXAMPLE_CHARS, DeadLetterReason, DeadLetterReasons
from streamflow.metrics.totals import Totals, read_totals
from streamflow.runtime.dead_letter_watch import DeadLetterWatch
from streamflow.runtime.logs import JsonFormatter, configure_logging
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.runtime.progress import ProgressReporter, describe, table
from streamflow.runtime.status import StatusReport, render_status
from streamflow.runtime.summary import RunSummary, component_kinds, summarize

CONFIG = parse_pipeline({
    "pipeline": "p",
    "sources": [{"name": "gen", "type": "generator", "topic": "raw", "count": 10}],
    "processors": [{"name": "clean", "input": "raw", "output": "clean",
                    "steps": [{"sql": "SELECT * FROM batch"}]}],
    "sinks": [{"name": "lake", "type": "parquet", "input": "clean", "path": "/tmp/unused"}],
})


class SchemaError(ValueError):
    pass


def test_reasons_count_each_error_class_and_keep_its_first_message() -> None:
    reasons = DeadLetterReasons()
    reasons.add([("schema", SchemaError("first")), ("sql", KeyError("k")),
                 ("schema", SchemaError("second"))])
    reasons.add([("schema", SchemaError("third")), ("parse", ValueError("x" * 1000))])
    snapshot = reasons.snapshot()
    assert list(snapshot) == ["SchemaError", "KeyError", "ValueError"]  # most frequent first
    assert snapshot["SchemaError"] == DeadLetterReason("schema", "first", 3)
    assert snapshot["KeyError"] == DeadLetterReason("sql", "'k'", 1)
    assert snapshot["ValueError"].example == "x" * EXAMPLE_CHARS


def test_a_stage_keeps_its_reasons_across_restarts() -> None:
    metrics = PipelineMetrics("p")
    metrics.stage("clean").reasons.add([("sql", KeyError("k"))])
    metrics.stage("clean").reasons.add([("sql", KeyError("k"))])  # the restarted stage's handles
    assert metrics.reasons["clean"].snapshot()["KeyError"].count == 2


def test_totals_of_sources_and_stages() -> None:
    metrics = PipelineMetrics("p")
    source = metrics.source("gen")
    source.records_produced.inc(100)
    source.records_dead_lettered.inc(3)
    stage = metrics.stage("clean")
    stage.count(100, 60, 30)
    stage.lag("raw", 0).set(5)
    stage.lag("raw", 1).set(7)
    totals = read_totals(metrics.registry)
    assert totals["gen"] == Totals(records_in=100, records_out=97, dead_lettered=3)
    assert totals["clean"] == Totals(records_in=100, records_out=60, filtered=10, dead_lettered=30,
                                     lag=12)


def ran(metrics: PipelineMetrics) -> RunSummary:
    metrics.source("gen").records_produced.inc(1000)
    clean = metrics.stage("clean")
    clean.count(1000, 300, 650)
    clean.reasons.add([("schema", SchemaError("device_id [bold]missing[/bold] hunter2"))] * 600
                      + [("sql", KeyError("temperature"))] * 50)
    metrics.stage("lake").count(300, 300, 0)
    components = summarize(component_kinds(CONFIG), metrics, lambda text: text.replace("hunter2", "***"))
    return RunSummary("p", "idle for 1s with zero lag", 0, 2.5, components, 0.5)


def test_the_summary_has_every_component_and_the_reasons_of_its_dead_letters() -> None:
    summary = ran(PipelineMetrics("p"))
    document = summary.as_dict()
    assert [(c["name"], c["kind"], c["in"], c["out"], c["filtered"], c["dead_lettered"])
            for c in document["components"]] == [
        ("gen", "source", 1000, 1000, 0, 0), ("clean", "processor", 1000, 300, 50, 650),
        ("lake", "sink", 300, 300, 0, 0)]
    assert document["components"][1]["dead_letter_reasons"] == [
        {"error_class": "SchemaError", "step": "schema", "count": 600,
         "example": "device_id [bold]missing[/bold] ***"},
        {"error_class": "KeyError", "step": "sql", "count": 50, "example": "'temperature'"}]


def test_the_summary_table_shows_counts_shares_and_examples_as_written() -> None:
    console = Console(file=io.StringIO(), width=160)
    ran(PipelineMetrics("p")).report("text", console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "run summary of pipeline p: idle for 1s with zero lag (exit 0) after 2.5s" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["clean", "processor", "1,000", "300", "50", "650", "(65%)"] in rows
    assert ["gen", "source", "1,000", "1,000", "0", "0"] in rows
    assert "device_id [bold]missing[/bold] ***" in text  # no markup, no secret
    assert "SchemaError" in text and "600" in text


def test_json_logs_get_the_summary_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "streamflow.summary"):
        ran(PipelineMetrics("p")).report("json")
    (record,) = caplog.records
    (line,) = JsonFormatter().format(record).splitlines()
    document = json.loads(line)
    assert document["message"].startswith("run summary of pipeline p")
    assert document["data"]["components"][1]["dead_lettered"] == 650


def test_the_progress_shows_totals_rates_dead_letters_and_lag() -> None:
    totals = {"gen": Totals(1000, 1000), "clean": Totals(1000, 300, 50, 650, 12)}
    line = describe(totals, {"gen": 500.0, "clean": 250.0})
    assert line == "gen 1,000 out 500/s; clean 300 out 250/s 650 dead-lettered; lag 12"
    console = Console(file=io.StringIO(), width=100)
    console.print(table(totals, {"clean": 250.0}))
    rows = [line.split() for line in console.file.getvalue().splitlines()]  # type: ignore[attr-defined]
    assert ["clean", "1,000", "300", "250", "650", "12"] in rows


def watch() -> DeadLetterWatch:
    return DeadLetterWatch(DeadLetterWarningConfig(share=0.5, records=1000), {"clean": "p.dlq"})


def test_a_stage_over_the_share_is_flagged_and_warned_about_once(
        caplog: pytest.LogCaptureFixture) -> None:
    reasons = {"clean": DeadLetterReasons()}
    reasons["clean"].add([("schema", SchemaError("device_id missing"))])
    watcher = watch()
    with caplog.at_level(logging.WARNING, "streamflow.runtime.dead_letter_watch"):
        watcher.observe({"clean": Totals(999, 0, 0, 999)}, reasons)
        assert watcher.warnings() == {}  # fewer records than a block
        watcher.observe({"clean": Totals(1000, 400, 0, 600)}, reasons)
        assert watcher.warnings() == {"clean": (
            "clean dead-lettered 60% of its last 1,000 records, above 50%; most often "
            "SchemaError in step schema, e.g. 'device_id missing'; the records are in p.dlq")}
        watcher.observe({"clean": Totals(1500, 400, 0, 1100)}, reasons)  # within the next block
        watcher.observe({"clean": Totals(2000, 1000, 0, 1000)}, reasons)  # 0% of the next
        assert watcher.warnings() == {}
        watcher.observe({"clean": Totals(3000, 1000, 0, 2000)}, reasons)  # flagged again
        assert "clean dead-lettered 100% of its last 1,000" in watcher.warnings()["clean"]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "60%" in warnings[0].getMessage()


def test_a_stage_at_the_share_is_not_flagged() -> None:
    watcher = watch()
    watcher.observe({"clean": Totals(1000, 500, 0, 500)}, {})
    assert watcher.warnings() == {}


def test_readiness_names_a_stage_over_the_share() -> None:
    runner = PipelineRunner(CONFIG, metrics_port=0)
    runner._started = True
    runner.metrics.stage("clean").count(2000, 100, 1900)
    runner.dead_letter_watch.observe(read_totals(runner.metrics.registry), runner.metrics.reasons)
    ready, detail = runner.readiness()
    assert ready and detail["status"] == "ready"
    assert detail["warnings"]["clean"].startswith("clean dead-lettered 95% of its last 2,000")
    assert detail["warnings"]["clean"].endswith("the records are in p.dlq")


def test_without_a_terminal_progress_is_a_log_line_in_pipeline_order(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = PipelineMetrics("p")
    metrics.stage("clean").count(10, 4, 6)
    metrics.source("gen").records_produced.inc(10)
    with caplog.at_level(logging.INFO, "streamflow.progress"):
        reporter = ProgressReporter(metrics.registry, 0.05, live=False, order=["gen", "clean"]).start()
        while not caplog.records:
            time.sleep(0.01)
        reporter.stop()
    record = caplog.records[0]
    assert record.getMessage() == "progress: gen 10 out 0/s; clean 4 out 0/s 6 dead-lettered; lag 0"
    assert record.data["clean"]["dead_lettered"] == 6  # type: ignore[attr-defined]


def test_on_a_terminal_the_table_stays_below_what_is_written_to_stderr(
        root_logging: None) -> None:
    metrics = PipelineMetrics("p")
    metrics.stage("clean").count(10, 4, 6)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    stderr = sys.stderr
    configure_logging("INFO", "text")
    reporter = ProgressReporter(metrics.registry, 0.05, live=True, console=console).start()
    try:
        assert sys.stderr is not stderr  # redirected above the live table
        logging.getLogger("streamflow.test").warning("a log line")
        time.sleep(0.2)
    finally:
        reporter.stop()
    assert sys.stderr is stderr
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "WARNING streamflow.test: a log line" in output
    assert output.index("a log line") < output.rindex("dead-lettered")  # the table redrawn below


def test_a_run_of_one_stage_summarizes_that_stage() -> None:
    runner = PipelineRunner(CONFIG, stage="clean", metrics_port=0)
    runner.metrics.stage("clean").count(10, 10, 0)
    result = runner._shutdown()
    assert result.summary is not None
    assert [(c.name, c.totals.records_in) for c in result.summary.components] == [("clean", 10)]


def test_the_status_command_prints_the_warnings() -> None:
    report = StatusReport(True, {"status": "ready", "warnings": {"clean": "clean dead-lettered 95%"}})
    assert render_status(report).splitlines()[:2] == ["status: ready", "warning: clean dead-lettered 95%"]
