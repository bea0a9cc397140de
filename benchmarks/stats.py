"""Pure helpers of the benchmarks: percentiles and medians of measurements."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence


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
