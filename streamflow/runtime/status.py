"""`streamflow status`: a running daemon's readiness and per-stage figures, from its HTTP port."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

COLUMNS = ("in", "out", "filtered", "dead_lettered")


@dataclass
class StatusReport:
    ready: bool
    detail: dict[str, object]
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def fetch_status(base_url: str) -> StatusReport:
    """Ask the daemon at ``base_url`` (its metrics port) for /readyz and /metrics."""
    base_url = base_url.rstrip("/")
    code, body = _get(f"{base_url}/readyz")
    report = StatusReport(code == 200, json.loads(body))
    _code, text = _get(f"{base_url}/metrics")
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            stage = sample.labels.get("stage")
            name = sample.name.removeprefix("streamflow_")
            if stage is None:
                continue
            if name.startswith("records_") and name.endswith("_total"):
                figures = report.stages.setdefault(stage, {"lag": 0.0})
                figures[name.removeprefix("records_").removesuffix("_total")] = sample.value
            elif name == "consumer_lag_records":
                report.stages.setdefault(stage, {"lag": 0.0})["lag"] += sample.value
            elif name == "last_processed_timestamp_seconds" and sample.value:
                report.stages.setdefault(stage, {"lag": 0.0})["idle_s"] = time.time() - sample.value
    return report


def render_status(report: StatusReport) -> str:
    """A readable table: one line per stage."""
    lines = [f"status: {'ready' if report.ready else 'NOT READY'}"]
    detail = dict(report.detail)
    warnings = detail.pop("warnings", {})
    if not report.ready:
        lines.append(f"reason: {json.dumps(detail)}")
    if isinstance(warnings, dict):
        lines += [f"warning: {warning}" for warning in warnings.values()]
    header = ("stage", *COLUMNS, "lag", "last batch")
    rows = [header]
    for stage, figures in sorted(report.stages.items()):
        idle = figures.get("idle_s")
        rows.append((
            stage, *(f"{figures.get(column, 0):,.0f}" for column in COLUMNS),
            f"{figures['lag']:,.0f}", "never" if idle is None else f"{idle:,.1f}s ago",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ))
    return "\n".join(lines)
