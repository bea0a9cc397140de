"""The dashboard's memory: per-component series of the last 15 minutes, sampled from the registry.

A thread reads the few sample families the dashboard draws once a second (a restricted collect,
not a whole scrape) and keeps what it derived from them: rates from counter deltas, lag, latency
quantiles of the interval, model metrics. The samples sit in a ring buffer of ``window_s /
interval_s`` entries, so memory is bounded by the window and the pipeline's size, and a
dashboard that opens or reloads draws the whole window, with rates, at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

from prometheus_client import CollectorRegistry

INTERVAL_S = 1.0
WINDOW_S = 15 * 60.0

# counter sample → (label naming the component, field of Counts)
_COUNTERS = {
    "streamflow_records_in_total": ("stage", "records_in"),
    "streamflow_records_out_total": ("stage", "records_out"),
    "streamflow_records_filtered_total": ("stage", "filtered"),
    "streamflow_records_dead_lettered_total": ("stage", "dead_lettered"),
    "streamflow_source_records_total": ("source", "records_in"),
    "streamflow_source_records_dead_lettered_total": ("source", "dead_lettered"),
}
_LAG = "streamflow_consumer_lag_records"
_LATENCY = "streamflow_end_to_end_latency_seconds_bucket"
_MODEL = "streamflow_model_metric"
_CANDIDATE = "streamflow_model_candidate_metric"
_CHAMPION = "streamflow_model_champion"
SAMPLES = (*_COUNTERS, _LAG, _LATENCY, _MODEL, _CANDIDATE, _CHAMPION)
QUANTILES = {"p50": 0.5, "p95": 0.95}
# the charts, each a series per component (or per quantile, per model metric)
CHARTS = ("throughput", "lag", "dead_letters", "latency", "model")


@dataclass
class Counts:
    """A component's counters at one sample; a source takes in what it polled and passes on
    what it published to its topic."""

    records_in: float = 0.0
    records_out: float = 0.0
    filtered: float = 0.0
    dead_lettered: float = 0.0


@dataclass
class Reading:
    """What one collect of the registry gave."""

    counts: dict[str, Counts] = field(default_factory=dict)
    lag: dict[str, float] = field(default_factory=dict)
    buckets: dict[float, float] = field(default_factory=dict)  # latency, cumulative by bound
    model: dict[str, float] = field(default_factory=dict)
    champions: dict[str, list[str]] = field(default_factory=dict)  # stage → champion models


@dataclass(frozen=True)
class Sample:
    """One point of every chart: unix time and each chart's values by series name, and the
    champion of each model stage with challengers (one per input partition)."""

    time: float
    charts: dict[str, dict[str, float | None]]
    champions: dict[str, list[str]] = field(default_factory=dict)


def read(registry: CollectorRegistry) -> Reading:
    """The counters, lag, latency buckets and model metrics in ``registry`` now."""
    reading = Reading()
    model_sums: dict[str, list[float]] = {}
    champions: dict[str, set[str]] = {}
    sources: set[str] = set()
    for family in registry.restricted_registry(SAMPLES).collect():
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if (counter := _COUNTERS.get(sample.name)) is not None:
                label, name = counter
                if label == "source":
                    sources.add(labels[label])
                counts = reading.counts.setdefault(labels[label], Counts())
                setattr(counts, name, getattr(counts, name) + value)
            elif sample.name == _LAG:
                reading.lag[labels["stage"]] = reading.lag.get(labels["stage"], 0.0) + value
            elif sample.name == _LATENCY:
                bound = float(labels["le"])
                reading.buckets[bound] = reading.buckets.get(bound, 0.0) + value
            elif sample.name in (_MODEL, _CANDIDATE) and math.isfinite(value):
                # a line per stage (the published predictions') and, with challengers, per model
                window = " (rolling)" if labels["window"] == "rolling" else ""
                model = f"/{labels['candidate']}" if sample.name == _CANDIDATE else ""
                name = f"{labels['stage']}{model} {labels['metric']}{window}"
                model_sums.setdefault(name, []).append(value)
            elif sample.name == _CHAMPION and value == 1:
                champions.setdefault(labels["stage"], set()).add(labels["candidate"])
    for name in sources:
        counts = reading.counts[name]
        counts.records_out = counts.records_in - counts.dead_lettered
    reading.model = {name: sum(values) / len(values) for name, values in model_sums.items()}
    reading.champions = {stage: sorted(names) for stage, names in champions.items()}
    return reading


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a histogram's cumulative ``buckets`` (linear within a bucket), or
    None without observations."""
    bounds = sorted(buckets)
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    previous_bound = previous_count = 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= q * total:
            if math.isinf(bound):
                return previous_bound
            within = count - previous_count
            fraction = (q * total - previous_count) / within if within > 0 else 0.0
            return previous_bound + (bound - previous_bound) * fraction
        previous_bound, previous_count = bound, count
    return previous_bound


def derive(now: Reading, before: Reading | None, seconds: float) -> dict[str, dict[str, float | None]]:
    """Each chart's values at ``now``: rates over the ``seconds`` since ``before`` (None at the
    first sample), lag, the latency quantiles of the interval, and model metrics."""
    def rate(name: str, field_name: str) -> float | None:
        if before is None or name not in before.counts:
            return None
        delta = getattr(now.counts[name], field_name) - getattr(before.counts[name], field_name)
        return max(delta, 0.0) / seconds

    interval = {bound: count - (before.buckets.get(bound, 0.0) if before else 0.0)
                for bound, count in now.buckets.items()}
    return {
        "throughput": {name: rate(name, "records_out") for name in now.counts},
        "lag": dict(now.lag),
        "dead_letters": {name: rate(name, "dead_lettered") for name in now.counts},
        "latency": ({label: quantile(interval, q) for label, q in QUANTILES.items()}
                    if before is not None else {}),
        "model": dict(now.model),
    }


class History:
    """The ring buffer of samples, filled by a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S,
                 window_s: float = WINDOW_S) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=max(1, round(window_s / interval_s)))
        self.totals: dict[str, Counts] = {}
        self._previous: tuple[float, Reading] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-history", daemon=True)

    def start(self) -> History:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> Sample:
        """Read the registry and add a sample now."""
        reading, clock = read(self.registry), time.monotonic()
        before = self._previous
        charts = derive(reading, before[1] if before else None,
                        max(clock - before[0], 1e-3) if before else 0.0)
        sample = Sample(round(time.time(), 3), charts,  # time as served: ?after= compares equal
                        reading.champions)
        with self._lock:
            self.samples.append(sample)
            self.totals = reading.counts
        self._previous = clock, reading
        return sample

    def document(self, after: float = 0.0) -> dict[str, Any]:
        """The samples later than unix time ``after`` (all: 0) as JSON-ready columns, ``t`` and
        one list per chart and series (null where a series has no value), and the totals and
        the champions of model stages with challengers now."""
        with self._lock:
            samples = (list(takewhile(lambda sample: sample.time > after, reversed(self.samples)))
                       [::-1] if after else list(self.samples))
            totals = {name: vars(counts).copy() for name, counts in self.totals.items()}
            champions = self.samples[-1].champions if self.samples else {}
        charts: dict[str, dict[str, list[float | None]]] = {chart: {} for chart in CHARTS}
        for index, sample in enumerate(samples):
            for chart, values in sample.charts.items():
                series = charts[chart]
                for name, value in values.items():
                    column = series.setdefault(name, [None] * len(samples))
                    column[index] = value
        return {"interval_s": self.interval_s, "window_s": self.interval_s * self.samples.maxlen,
                "t": [sample.time for sample in samples], "charts": charts,
                "totals": totals, "champions": champions}

