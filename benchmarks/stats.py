"""Pure helpers of the benchmarks: percentiles and medians of measurements, the order of runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values`` (0 < q ≤ 100): the smallest value with
    at least ``q``% of them at or below it; ``percentile(v, 100)`` is the maximum."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile {q} is not in (0, 100]")
    ordered = sorted(values)
    return ordered[math.ceil(q / 100 * len(ordered)) - 1]


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """``p50_ms``, ``p95_ms``, ``p99_ms`` and ``max_ms`` of ``latencies_ms``, to 0.1 ms."""
    return {f"{name}_ms": round(percentile(latencies_ms, q), 1)
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}


def medians(runs: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each measure's median over ``runs`` (a measure some runs lack is the median of the others)."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for name, value in run.items():
            values.setdefault(name, []).append(value)
    return {name: statistics.median(found) for name, found in values.items()}


def rotated(systems: Sequence[T], round_number: int) -> list[T]:
    """``systems`` in the order of round ``round_number``: each round starts one system further
    along, so that over as many rounds as systems each runs once in each place. The first run of
    a round is at a disadvantage: the same build run first and second, four rounds, used more
    CPU and had a higher p50 and p95 latency first in each of them (2 December)."""
    shift = round_number % len(systems) if systems else 0
    return [*systems[shift:], *systems[:shift]]


def measures_line(system: str, measured: Mapping[str, float]) -> str:
    """One run's measures as printed: events per second first, then the others."""
    return f"{system}: {measured['events_per_s']:,.0f} events/s" + "".join(
        f", {name} {value:,.1f}" for name, value in measured.items() if name != "events_per_s")
