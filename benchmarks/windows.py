"""Windows workload: the core workload's input, schema-checked, then aggregated per device in
10 s tumbling windows (count, mean, max, p95), against the same stage without a window."""

from __future__ import annotations

from typing import Any

from benchmarks.core import compare, run_stage, run_streamflow, schema_step
from benchmarks.processes import Measures

WORKLOAD = "json-schema-tumbling-window"


def run_windowed(bootstrap: str, source: str, records: int) -> Measures:
    return run_stage(bootstrap, source, records, {
        "steps": [schema_step()],
        "window": {
            "kind": "tumbling", "size_s": 10, "time_field": "ts", "key": ["device_id"],
            "aggregates": {"n": {"fn": "count"},
                           "avg": {"fn": "mean", "field": "temperature"},
                           "high": {"fn": "max", "field": "temperature"},
                           "p95": {"fn": "quantile", "field": "temperature", "q": 0.95}},
        },
    })


def run_windows(records: int, repeat: int) -> list[dict[str, Any]]:
    return compare({"streamflow-window": run_windowed, "streamflow-no-window": run_streamflow},
                   WORKLOAD, records, repeat)
