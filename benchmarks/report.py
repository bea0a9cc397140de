"""``python -m benchmarks report``: PNG charts of the JSON results (events/s per system and
workload, latency percentiles, peak RSS) drawn with matplotlib."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after choosing the backend

DEFAULT_FOLDER = Path("benchmarks/results")
LATENCIES = ("p50_ms", "p95_ms", "p99_ms", "max_ms")


def load_rows(folder: Path) -> list[dict[str, Any]]:
    """Every result row of the ``*.json`` files in ``folder`` (each a list of rows, as
    ``python -m benchmarks WORKLOAD --json`` writes), in file order."""
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        found = json.loads(path.read_text())
        if not isinstance(found, list) or not all(
                isinstance(row, dict) and {"system", "workload"} <= row.keys() for row in found):
            raise ValueError(f"{path}: not a list of result rows with system and workload")
        rows += found
    return rows


def series(rows: list[dict[str, Any]], measure: str) -> dict[str, dict[str, float]]:
    """``{workload: {system: value}}`` of the rows that have ``measure``."""
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get(measure) is not None:
            table.setdefault(row["workload"], {})[row["system"]] = row[measure]
    return table


def _bars(path: Path, title: str, unit: str, groups: dict[str, dict[str, float]]) -> None:
    """Grouped bars: one group per key of ``groups``, one bar per system in it."""
    systems = list(dict.fromkeys(system for values in groups.values() for system in values))
    width = 0.8 / len(systems)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * len(systems) ** 0.5), 4))
    for index, system in enumerate(systems):
        positions = [group + index * width for group in range(len(groups))]
        values = [groups[name].get(system, 0) for name in groups]
        bars = axes.bar(positions, values, width, label=system)
        axes.bar_label(bars, labels=[f"{value:,.0f}" if value else "" for value in values],
                       fontsize=7)
    axes.set_xticks([group + width * (len(systems) - 1) / 2 for group in range(len(groups))],
                    list(groups), fontsize=8)
    axes.set_ylabel(unit)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def latency_labels(rows: list[dict[str, Any]]) -> list[str]:
    """A bar label for each row with latencies: its system, and its workload (without
    ``latency-``) when the rows hold several latency workloads."""
    timed = [row for row in rows if row.get("p99_ms")]
    if len({row["workload"] for row in timed}) == 1:
        return [row["system"] for row in timed]
    return [f"{row['system']}, {row['workload'].removeprefix('latency-')}" for row in timed]


def write_charts(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Draw the charts ``rows`` allow into ``folder``; the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    throughput = {workload: values for workload, values in series(rows, "events_per_s").items()
                  if workload not in series(rows, "p99_ms")}
    latency: dict[str, dict[str, float]] = {}  # {percentile: {system: ms}}
    for label, row in zip(latency_labels(rows), (row for row in rows if row.get("p99_ms")),
                          strict=True):
        for name in LATENCIES:
            if row.get(name) is not None:
                latency.setdefault(name.removesuffix("_ms"), {})[label] = row[name]
    charts = (("throughput.png", "Events per second (median of the rounds)", "events/s", throughput),
              ("latency.png", "Latency, send to arrival (output topic, or durable Parquet)", "ms",
               latency),
              ("rss.png", "Peak RSS of the process tree", "MB", series(rows, "rss_peak_mb")))
    for name, title, unit, groups in charts:
        if groups:
            _bars(folder / name, title, unit, groups)
            written.append(folder / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report")
    parser.add_argument("--results", type=Path, default=DEFAULT_FOLDER,
                        help="the folder of JSON results")
    parser.add_argument("--out", type=Path, help="the folder of the charts (default: --results)")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    if not rows:
        parser.error(f"no result rows in {args.results}/*.json")
    for path in write_charts(rows, args.out or args.results):
        print(path)
    return 0
