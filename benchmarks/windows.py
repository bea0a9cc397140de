"""Windows workload: the core workload's input, schema-checked, then aggregated per device in
10 s tumbling windows (count, mean, max, p95), against the same stage without a window."""

from __future__ import annotations

import uuid
from typing import Any

from benchmarks.common import measure_stage
from benchmarks.core import PARTITIONS, compare, run_streamflow, schema_step
from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner

WORKLOAD = "json-schema-tumbling-window"


def run_windowed(bootstrap: str, source: str, records: int) -> float:
    name = f"bench{uuid.uuid4().hex[:8]}"
    config = parse_pipeline({
        "pipeline": name,
        "kafka": {"bootstrap": bootstrap},
        "topics": [{"name": f"{name}.out", "partitions": PARTITIONS}],
        "processors": [{
            "name": "agg",
            "input": source,
            "output": f"{name}.out",
            "steps": [schema_step()],
            "window": {
                "kind": "tumbling", "size_s": 10, "time_field": "ts", "key": ["device_id"],
                "aggregates": {"n": {"fn": "count"},
                               "avg": {"fn": "mean", "field": "temperature"},
                               "high": {"fn": "max", "field": "temperature"},
                               "p95": {"fn": "quantile", "field": "temperature", "q": 0.95}},
            },
        }],
        "metrics": {"enabled": False},
        "runtime": {"batch": {"max_records": 10_000, "max_wait_ms": 50}},
    })
    return measure_stage(PipelineRunner(config), "agg", records)


def run_windows(records: int, repeat: int) -> list[dict[str, Any]]:
    return compare({"streamflow-window": run_windowed, "streamflow-no-window": run_streamflow},
                   WORKLOAD, records, repeat)
