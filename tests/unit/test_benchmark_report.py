"""The benchmarks' parts that need no broker: percentiles, medians, the report's reading of JSON
results, and the CPU time of a process tree."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import processes
from benchmarks.pipeline_latency import steadiness
from benchmarks.report import latency_labels, load_rows, series, write_charts
from benchmarks.stats import latency_summary, medians, percentile, rotated


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unordered
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 1) == 7
    assert latency_summary([1.0, 2.0, 3.0, 40.0]) == {
        "p50_ms": 2.0, "p95_ms": 40.0, "p99_ms": 40.0, "max_ms": 40.0}
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_medians_per_measure() -> None:
    runs = [{"events_per_s": 3.0, "rss_peak_mb": 10.0}, {"events_per_s": 1.0},
            {"events_per_s": 2.0, "rss_peak_mb": 30.0}]
    assert medians(runs) == {"events_per_s": 2.0, "rss_peak_mb": 20.0}


def test_each_system_runs_once_in_each_place_over_as_many_rounds() -> None:
    systems = ["streamflow", "quix", "bytewax"]
    orders = [rotated(systems, round_number) for round_number in range(3)]
    assert orders == [systems, ["quix", "bytewax", "streamflow"], ["bytewax", "streamflow", "quix"]]
    assert rotated(systems, 3) == systems and rotated([], 1) == []


def test_report_reads_rows_and_draws_charts(tmp_path: Path) -> None:
    (tmp_path / "clean.json").write_text(json.dumps([
        {"system": "streamflow", "workload": "clean", "events_per_s": 100, "rss_peak_mb": 200.0},
        {"system": "quix", "workload": "clean", "events_per_s": 40, "rss_peak_mb": 80.0}]))
    (tmp_path / "latency.json").write_text(json.dumps([
        {"system": "quix", "workload": "latency", "events_per_s": 5000, "p50_ms": 7.0,
         "p95_ms": 9.0, "p99_ms": 12.0, "max_ms": 30.0}]))
    rows = load_rows(tmp_path)
    assert [row["system"] for row in rows] == ["streamflow", "quix", "quix"]
    assert series(rows, "rss_peak_mb") == {"clean": {"streamflow": 200.0, "quix": 80.0}}
    written = write_charts(rows, tmp_path / "charts")
    assert sorted(path.name for path in written) == ["latency.png", "rss.png", "throughput.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)


def test_report_refuses_other_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"system": "streamflow"}))
    with pytest.raises(ValueError, match="not a list of result rows"):
        load_rows(tmp_path)


def test_peers_skipped_without_their_venv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "PEERS_PYTHON", processes.ROOT / "no-such-venv" / "python")
    assert "make bench-peers" in (processes.peers_missing() or "")
    monkeypatch.setattr(processes, "PEERS_PYTHON", Path(sys.executable))
    assert processes.peers_missing() is None


def test_cpu_seconds_count_the_process_and_its_children() -> None:
    """A process that burns 0.4 s of CPU in a child it waits for, then 0.4 s in a child that
    lives as long as it does, then 0.4 s itself: all three are counted."""
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    outlive = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: time.sleep(0.05)\n"
    script = (
        "import subprocess, sys\n"
        f"burn = {burn!r}\n"
        "subprocess.run([sys.executable, '-c', burn], check=True)\n"
        f"child = subprocess.Popen([sys.executable, '-c', burn + {outlive!r}])\n"
        "exec(burn)\n"
        "print('burnt', flush=True)\n"
        "child.wait()\n")
    with processes.running([sys.executable, "-c", script], dict(os.environ)) as (process, sampler):
        assert process.stdout is not None
        assert process.stdout.readline() == b"burnt\n"
        deadline = time.monotonic() + 10
        while (used := sampler.cpu_seconds()) < 1.2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the running child may not have burnt its share yet
    assert 1.2 <= used < 3.0


def test_soak_steadiness_compares_the_first_and_last_minute() -> None:
    started = 1000.0
    rss = [(started + t, 100 + (t >= 60) * 3 + (t >= 200) * 2) for t in range(300)]
    latencies = [(started + t / 10, 10.0 + (t >= 2400) * 5) for t in range(3000)]
    assert steadiness(latencies, rss, started, 300.0) == {
        "pss_growth_pct": 1.9, "p99_first_minute_ms": 10.0, "p99_last_minute_ms": 15.0}


def test_latency_chart_names_the_workload_when_rows_of_two_share_a_system(tmp_path: Path) -> None:
    rows = [{"system": "streamflow", "workload": workload, "events_per_s": 5000, "p50_ms": 1.0,
             "p95_ms": 2.0, "p99_ms": 3.0, "max_ms": 4.0}
            for workload in ("latency-topic-to-topic-clean", "latency-pipeline-to-durable-parquet")]
    assert set(latency_labels(rows)) == {"streamflow, topic-to-topic-clean",
                                         "streamflow, pipeline-to-durable-parquet"}
