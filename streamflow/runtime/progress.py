"""Progress of a run: a live table at the bottom of a terminal, or periodic log lines.

On a terminal the table (records in, out, per second, dead-lettered and lag of each source and
stage) stays below everything else: while it runs, ``sys.stderr`` (and ``sys.stdout`` when it
is a terminal too) print above it, log lines included. Elsewhere, and with JSON logs, the same
figures are a log line every interval. It reads only the pipeline's metrics registry, like any
other observer would.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from streamflow.metrics.totals import Totals, read_totals

log = logging.getLogger("streamflow.progress")

LIVE_INTERVAL_S = 1.0  # the live table's refresh, at most


def rates(previous: Mapping[str, Totals], current: Mapping[str, Totals], seconds: float
          ) -> dict[str, float]:
    """Records taken in per second by each component between two readings."""
    seconds = max(seconds, 1e-9)
    return {name: (totals.records_in - previous.get(name, Totals()).records_in) / seconds
            for name, totals in current.items()}


def describe(totals: Mapping[str, Totals], per_second: Mapping[str, float]) -> str:
    """One line: each component's records out, rate in and dead letters, and the total lag."""
    parts = []
    for name, figures in totals.items():
        part = f"{name} {figures.records_out:,.0f} out {per_second.get(name, 0.0):,.0f}/s"
        if figures.dead_lettered:
            part += f" {figures.dead_lettered:,.0f} dead-lettered"
        parts.append(part)
    lag = sum(figures.lag for figures in totals.values())
    return f"{'; '.join(parts)}; lag {lag:,.0f}"


def table(totals: Mapping[str, Totals], per_second: Mapping[str, float]) -> Table:
    """The live display: one row per component."""
    view = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    view.add_column("")
    for column in ("in", "out", "per s", "dead-lettered", "lag"):
        view.add_column(column, justify="right")
    for name, figures in totals.items():
        dead = Text(f"{figures.dead_lettered:,.0f}", style="red" if figures.dead_lettered else "")
        view.add_row(Text(name), f"{figures.records_in:,.0f}", f"{figures.records_out:,.0f}",
                     f"{per_second.get(name, 0.0):,.0f}", dead, f"{figures.lag:,.0f}")
    return view


class ProgressReporter:
    """Shows each component's totals, rate, dead letters and lag until :meth:`stop`: live on a
    terminal (``live``), else as a log line every ``interval_s``; components in ``order`` come
    first, in that order."""

    def __init__(self, registry: CollectorRegistry, interval_s: float, live: bool,
                 order: Sequence[str] = (), console: Console | None = None) -> None:
        self.registry = registry
        self.order = {name: position for position, name in enumerate(order)}
        self.live = live
        self.interval_s = min(interval_s, LIVE_INTERVAL_S) if live else interval_s
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._ready = threading.Event()  # the live display took over the output
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> ProgressReporter:
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        """Stop reporting; a live display is removed, and the output is as before."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._report()
        finally:
            self._ready.set()  # also when the display failed to start, so start() returns

    def _totals(self) -> dict[str, Totals]:
        totals = read_totals(self.registry)
        return {name: totals[name]
                for name in sorted(totals, key=lambda name: self.order.get(name, len(self.order)))}

    def _report(self) -> None:
        previous, previous_time = self._totals(), time.monotonic()
        if not self.live:
            self._ready.set()
            while not self._stop.wait(self.interval_s):
                current, now = self._totals(), time.monotonic()
                per_second = rates(previous, current, now - previous_time)
                previous, previous_time = current, now
                log.info("progress: %s", describe(current, per_second),
                         extra={"data": {name: {**vars(figures), "per_s": per_second[name]}
                                         for name, figures in current.items()}})
            return
        with Live(table(previous, {}), console=self.console, auto_refresh=False, transient=True,
                  redirect_stdout=sys.stdout.isatty(), redirect_stderr=True) as display:
            self._ready.set()
            while not self._stop.wait(self.interval_s):
                current, now = self._totals(), time.monotonic()
                display.update(table(current, rates(previous, current, now - previous_time)),
                               refresh=True)
                previous, previous_time = current, now
