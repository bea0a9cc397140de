"""No silent runs: the summary a run ends with matches what really went where, a stage that
dead-letters most of its records is named on /readyz and warned about once, and a run on a
terminal shows a live table with the log lines above it and no librdkafka noise."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pytest

from streamflow.config import parse_pipeline
from streamflow.metrics.totals import read_totals
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport.broker import free_port
from tests.helpers import read_topic, run_on_terminal

COUNT = 1500


def pipeline(bootstrap: str, output: Path, count: int = COUNT, malformed: float = 0.1,
             rate: int = 0) -> dict[str, Any]:
    """generator (some records malformed) → clean (schema, filter) → Parquet."""
    return {
        "pipeline": "tally",
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": "tally.raw", "partitions": 2}, {"name": "tally.clean", "partitions": 2},
                   {"name": "tally.dlq", "partitions": 1}],
        "sources": [{"name": "sensors", "type": "generator", "topic": "tally.raw", "count": count,
                     "rate": rate, "seed": 3, "malformed_fraction": malformed}],
        "processors": [{"name": "clean", "input": "tally.raw", "output": "tally.clean", "steps": [
            {"schema": {"device_id": {"type": "string", "required": True},
                        "temperature": {"type": "float", "required": True}}},
            {"filter": "temperature > 15"},
        ]}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "tally.clean", "path": str(output)}],
    }


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "tally.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_the_summary_counts_what_really_went_where(fresh_broker: str, tmp_path: Path) -> None:
    output = tmp_path / "lake"
    path = write(tmp_path, pipeline(fresh_broker, output))
    completed = subprocess.run(
        [sys.executable, "-m", "streamflow", "--log-format", "json", "run", str(path),
         "--until-idle", "1", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [json.loads(line) for line in completed.stderr.splitlines()]  # JSON lines only
    (summary,) = [line["data"] for line in lines if line["logger"] == "streamflow.summary"]
    assert summary["exit_code"] == 0 and summary["pipeline"] == "tally"
    figures = {c["name"]: c for c in summary["components"]}
    assert list(figures) == ["sensors", "clean", "lake"]

    clean_out = len(read_topic(fresh_broker, "tally.clean"))
    dead = read_topic(fresh_broker, "tally.dlq")
    rows = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/**/*.parquet')").fetchall()[0]
    assert (figures["sensors"]["in"], figures["sensors"]["out"]) == (COUNT, COUNT)
    assert (figures["clean"]["in"], figures["clean"]["out"], figures["clean"]["dead_lettered"]) == (
        COUNT, clean_out, len(dead))
    assert figures["clean"]["filtered"] == COUNT - clean_out - len(dead) > 0
    assert len(dead) > 0
    assert (figures["lake"]["in"], figures["lake"]["out"], figures["lake"]["dead_lettered"]) == (
        clean_out, rows[0], 0)

    # The reasons: each error class of the dead-letter topic's headers, counted, with one of its
    # messages as the example.
    headers = [dict(h or []) for h in dead.headers]
    classes = Counter(h["streamflow.error.class"].decode() for h in headers)
    reasons = figures["clean"]["dead_letter_reasons"]
    assert {r["error_class"]: r["count"] for r in reasons} == classes
    for reason in reasons:
        messages = {h["streamflow.error.message"].decode() for h in headers
                    if h["streamflow.error.class"].decode() == reason["error_class"]}
        assert reason["example"] in {message[:300] for message in messages}


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except urllib.error.URLError:
        return 0, {}


def test_readyz_names_a_stage_that_dead_letters_most_records(
        fresh_broker: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_pipeline(pipeline(fresh_broker, tmp_path / "lake", count=10_000_000,
                                     malformed=0.8, rate=3000))
    runner = PipelineRunner(config, metrics_port=free_port())
    thread = threading.Thread(target=runner.run)
    with caplog.at_level(logging.WARNING, "streamflow.runtime.dead_letter_watch"):
        thread.start()
        try:
            url = f"http://127.0.0.1:{runner.metrics_port}/readyz"
            detail: dict[str, Any] = {}
            for _attempt in range(300):
                _status, detail = get(url)
                if "clean" in detail.get("warnings", {}):
                    break
                time.sleep(0.2)
            warning = detail["warnings"]["clean"]
            assert re.match(r"clean dead-lettered (7\d|8\d|9\d)% of its last [\d,]+ records, "
                            r"above 50%; most often \w+ in step \w+, e\.g\. .+; the records are "
                            r"in tally\.dlq$", warning), warning
            assert "sensors" not in detail["warnings"] and "lake" not in detail["warnings"]
            # Further blocks over the share keep it flagged, with no second warning.
            seen = read_totals(runner.metrics.registry)["clean"].records_in
            while read_totals(runner.metrics.registry)["clean"].records_in < seen + 3000:
                time.sleep(0.2)
            assert "clean" in get(url)[1]["warnings"]
        finally:
            runner.stop()
            thread.join(60)
    warned = [r.getMessage() for r in caplog.records if r.name == "streamflow.runtime.dead_letter_watch"]
    assert len(warned) == 1 and warned[0].startswith("clean dead-lettered"), warned


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_run_on_a_terminal_keeps_its_table_below_the_log_and_ends_quietly(tmp_path: Path) -> None:
    """On the embedded broker, which stops before the process ends: no librdkafka line after it."""
    path = write(tmp_path, pipeline("embedded", tmp_path / "lake", count=4000, rate=1000))
    code, output = run_on_terminal(
        [sys.executable, "-m", "streamflow", "run", str(path), "--until-idle", "1",
         "--metrics-port", "0"], {**os.environ, "COLUMNS": "120"})
    assert code == 0, output[-3000:]
    text = ANSI.sub(b"", output).decode()
    assert "per s" in text and "dead-lettered" in text  # the live table was shown
    assert "streamflow.progress" not in text, "a terminal gets the live table, not log lines"
    lines = [line.strip("\r") for line in re.split(r"\r?\n|\r", text)]
    logged = [line for line in lines if re.search(r" (INFO|WARNING|ERROR) streamflow", line)]
    assert logged and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", line)
                          for line in logged), logged  # whole lines, none mixed into the table
    ended = text.index("pipeline tally ended")
    assert "run summary of pipeline tally" in text[ended:]
    assert "Connection refused" not in text and "|FAIL|" not in text, text[ended:]
