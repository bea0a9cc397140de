"""Latency through the quickstart's shape, up to durable Parquet: records sent at a fixed rate
(each with its send time, as in benchmarks.latency) go through a clean processor stage, a
model stage (StandardScaler | LinearRegression, predict then learn) and a parquet sink, all in
one streamflow process. A row's arrival is when a watcher first sees the Parquet file holding
it: the sink writes each file under a temporary name, fsyncs it and renames it into place, so
a file is durable once seen. The sink flushes every ``runtime.commit_interval_s`` (0.5 s here).

With ``--seconds`` of two minutes or more, the row also says whether the run held steady (the
soak of issue 16): the growth of the process tree's memory (PSS) after the first minute, and
p99 in the first and last minute of sending.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.clean import clean_steps, expected_sets
from benchmarks.common import local_broker
from benchmarks.core import PARTITIONS
from benchmarks.latency import (
    WARM_UP_RUN_S,
    PacedProducer,
    cpu_per_event,
    timed_latencies,
    wait_until_quiet,
    warmed_up,
)
from benchmarks.peers.cleaning import LATENCY_FIELD
from benchmarks.processes import Measures, running, scratch, streamflow_command
from benchmarks.stats import latency_summary, medians, percentile
from streamflow.transport import TopicSpec, create_transport

WORKLOAD = "latency-pipeline-to-durable-parquet"
COMMIT_INTERVAL_S = 0.5
WATCH_S = 0.01
RELIST_S = 1.0
MINUTE_S = 60.0


class ParquetWatch:
    """Polls a folder in a thread: each new Parquet file's rows' send times, and when the file
    was first seen."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self.arrivals: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A directory is listed only when an entry came or went (its mtime moved), and at least
        # every RELIST_S (a clock tick may hold two changes), and only its new entries are
        # looked at. Walking and sorting thousands of files at each poll cost the run more and
        # more of a core as files piled up, and delayed when a new file was seen.
        listed: dict[Path, tuple[int, float]] = {}  # directory → its mtime, when last listed
        known: dict[Path, set[str]] = {}  # directory → the entries found in it
        subdirectories: dict[Path, list[Path]] = {}
        while not self._stop.is_set():
            pending = [self._folder]
            while pending:
                directory = pending.pop()
                try:
                    mtime, now = os.stat(directory).st_mtime_ns, time.monotonic()
                except FileNotFoundError:  # the sink has not made it yet
                    continue
                before = listed.get(directory)
                if before is None or before[0] != mtime or now - before[1] >= RELIST_S:
                    listed[directory] = (mtime, now)
                    self._list(directory, known.setdefault(directory, set()),
                               subdirectories.setdefault(directory, []))
                pending += subdirectories.get(directory, [])
            self._stop.wait(WATCH_S)

    def _list(self, directory: Path, known: set[str], subdirectories: list[Path]) -> None:
        """Read the Parquet files new in ``directory``; note its new subdirectories."""
        found = [(entry.name, entry.is_dir()) for entry in os.scandir(directory)
                 if entry.name not in known]
        seen = time.time()  # every file found was in place by now
        for name, is_directory in sorted(found):
            known.add(name)
            if is_directory:
                subdirectories.append(directory / name)
            elif name.endswith(".parquet") and not name.startswith(("_", ".")):
                sent = pq.read_table(directory / name, columns=[LATENCY_FIELD]).column(0).to_pylist()
                self.arrivals += [(seen, value) for value in sent]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def pipeline_settings(bootstrap: str, name: str, folder: Path) -> dict[str, Any]:
    """The quickstart's shape on ``<name>.in``: clean → model → parquet sink in ``folder``."""
    steps = clean_steps()
    steps[0]["schema"][LATENCY_FIELD] = {"type": "int", "required": True}
    return {
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": f"{name}.{topic}", "partitions": PARTITIONS}
                   for topic in ("clean", "scored")],
        "processors": [{"name": "clean", "input": f"{name}.in", "output": f"{name}.clean",
                        "steps": steps}],
        "models": [{"name": "predict", "input": f"{name}.clean", "output": f"{name}.scored",
                    "target": "temperature", "features": ["humidity", "pressure"],
                    "estimator": [{"preprocessing.StandardScaler": {}},
                                  {"linear_model.LinearRegression": {"intercept_lr": 0.1}}],
                    "metrics": ["MAE"], "checkpoint": {"path": str(folder / "checkpoints")}}],
        "sinks": [{"name": "lake", "type": "parquet", "input": f"{name}.scored",
                   "path": str(folder / "lake")}],
        "metrics": {"enabled": False},
        "runtime": {"batch": {"max_records": 10_000, "max_wait_ms": 50},
                    "commit_interval_s": COMMIT_INTERVAL_S},
    }


def steadiness(latencies: list[tuple[float, float]], memory: list[tuple[float, int]],
               started: float, sending_s: float) -> Measures:
    """Memory growth after the first minute (the peak after it over the memory at its end, in
    %), and p99 of the records sent in the first and in the last minute; ``latencies`` are (send
    time, ms) and ``memory`` (time, bytes) samples of the process tree's PSS (a checkpoint
    writer forked by a model worker would count twice in an RSS sum), in unix time."""
    after = started + MINUTE_S
    at_minute = next(size for sampled, size in memory if sampled >= after)
    later = max(size for sampled, size in memory if sampled >= after)
    first = [ms for sent, ms in latencies if sent < after]
    last = [ms for sent, ms in latencies if sent >= started + sending_s - MINUTE_S]
    return {"pss_growth_pct": round(100 * (later - at_minute) / at_minute, 1),
            "p99_first_minute_ms": round(percentile(first, 99), 1),
            "p99_last_minute_ms": round(percentile(last, 99), 1)}


def measure(bootstrap: str, rate: int, seconds: float) -> Measures:
    """One run at ``rate`` records per second for ``seconds``; every row that the clean rules
    let through must be in the Parquet output exactly once."""
    name = f"pipeline{uuid.uuid4().hex[:8]}"
    create_transport("confluent", bootstrap).admin().create_topics(
        [TopicSpec(f"{name}.in", PARTITIONS)])
    producer = PacedProducer(bootstrap, f"{name}.in")
    with scratch() as folder:
        command = streamflow_command(pipeline_settings(bootstrap, name, folder), "lake", None,
                                     folder)
        watch = ParquetWatch(folder / "lake")
        with running(*command) as (process, sampler):
            producer.warm_up(lambda: bool(watch.arrivals), process)
            cpu_before = sampler.cpu_seconds()
            total = producer.at_rate(rate, seconds)
            expected = Counter(json.loads(record)[LATENCY_FIELD]
                               for record in expected_sets(0, producer.sent)[0].elements())
            wait_until_quiet(watch.arrivals, sum(expected.values()),
                             producer.started + producer.sending_s)
            cpu_s = sampler.cpu_seconds() - cpu_before
            rss_peak = sampler.stop()
        watch.stop()
    found = Counter(sent for _, sent in watch.arrivals)
    if found != expected:
        missing, extra = expected - found, found - expected
        raise AssertionError(f"Parquet output differs: {sum(missing.values())} rows missing, "
                             f"{sum(extra.values())} unexpected")
    latencies = timed_latencies(watch.arrivals, producer.started)
    row: Measures = {"events_per_s": total / producer.sending_s, **latency_summary(latencies),
                     "rss_peak_mb": rss_peak, "pss_peak_mb": sampler.pss_peak_mb,
                     "cpu_us_per_event": cpu_per_event(cpu_s, total)}
    if seconds >= 2 * MINUTE_S:
        by_send = [(sent / 1e6, (arrival * 1e6 - sent) / 1000) for arrival, sent in watch.arrivals
                   if sent >= producer.started * 1e6]
        row |= steadiness(by_send, sampler.samples, producer.started, producer.sending_s)
    return row


def run_pipeline_latency(rate: int, seconds: float, repeat: int) -> list[dict[str, Any]]:
    """``repeat`` runs after a warm-up run; the median of each measure."""
    runs = []
    with local_broker() as bootstrap:
        warmed_up("streamflow", measure(bootstrap, rate, min(seconds, WARM_UP_RUN_S)))
        for _round in range(repeat):
            found = measure(bootstrap, rate, seconds)
            print("streamflow: " + ", ".join(f"{k} {v:,.1f}" for k, v in found.items()), flush=True)
            runs.append(found)
    row = medians(runs)
    return [{"system": "streamflow", "workload": WORKLOAD, **row,
             "events_per_s": round(row["events_per_s"]), "rate": rate, "seconds": seconds,
             "commit_interval_s": COMMIT_INTERVAL_S}]
