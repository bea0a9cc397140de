"""Progress of a bounded run: a live line on a terminal, periodic log lines otherwise.

It reads only the pipeline's metrics registry, like any other observer would.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

from prometheus_client import CollectorRegistry

log = logging.getLogger("streamflow.progress")


def snapshot(registry: CollectorRegistry) -> tuple[dict[str, float], float]:
    """Records out per stage (plus sources) and the total consumer lag."""
    out: dict[str, float] = {}
    lag = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "streamflow_records_out_total":
                out[sample.labels["stage"]] = sample.value
            elif sample.name == "streamflow_source_records_total":
                out[sample.labels["source"]] = sample.value
            elif sample.name == "streamflow_consumer_lag_records":
                lag += sample.value
    return out, lag


def describe(rates: dict[str, float], lag: float) -> str:
    stages = "  ".join(f"{name} {rate:,.0f}/s" for name, rate in rates.items())
    return f"{stages}  lag {lag:,.0f}"


class ProgressReporter:
    """Reports records per second per component and total lag every ``interval_s``."""

    def __init__(self, registry: CollectorRegistry, interval_s: float,
                 stream: TextIO | None = None) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> ProgressReporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

    def _run(self) -> None:
        previous, _lag = snapshot(self.registry)
        previous_time = time.monotonic()
        while not self._stop.wait(self.interval_s):
            current, lag = snapshot(self.registry)
            now = time.monotonic()
            elapsed = max(now - previous_time, 1e-9)
            rates = {name: (value - previous.get(name, 0.0)) / elapsed
                     for name, value in current.items()}
            previous, previous_time = current, now
            if self.live:
                self.stream.write(f"\r\033[K{describe(rates, lag)}")
                self.stream.flush()
            else:
                log.info("progress: %s", describe(rates, lag))
