"""The ``model_report`` scheduled job: a model stage's registry versions over a period, as a
Parquet table and a PNG chart of their metrics (docs/schedules.md).

The table is Parquet rather than CSV: pyarrow is a dependency already, and Parquet keeps the
types (UTC timestamps, 64-bit offsets, metric values to the last bit, each partition's offsets
as a map) that a CSV file would turn into text for every reader to parse back. The chart is drawn
with matplotlib's object API on an Agg canvas: no display, no pyplot state shared between the
scheduler's job threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from streamflow.ml.registry import Registry, Version

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXTRA = "reports"  # the extra that installs matplotlib
SCHEMA = pa.schema([
    ("pipeline", pa.string()),
    ("stage", pa.string()),
    ("version", pa.int64()),
    ("created_at", pa.timestamp("ms", tz="UTC")),
    ("tags", pa.list_(pa.string())),
    ("config_hash", pa.string()),
    ("partition", pa.int64()),
    ("next_offsets", pa.map_(pa.string(), pa.int64())),
    ("records_learned", pa.int64()),
    ("drift_events", pa.int64()),
    ("rollback_to", pa.int64()),  # the version this one continues from by a rollback
    ("metric", pa.string()),  # null for a partition without metrics
    ("cumulative", pa.float64()),
    ("rolling", pa.float64()),
])


def matplotlib_missing() -> str | None:
    """Why the chart cannot be drawn here (matplotlib not installed), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"needs matplotlib ({exc}): pip install 'streamflow[{EXTRA}]'"
    return None


def report_table(versions: list[Version], pipeline: str, stage: str) -> pa.Table:
    """One row per version, input partition and metric, oldest version first."""
    rows: list[dict[str, Any]] = []
    for version in versions:
        metadata = version.metadata
        created = datetime.fromtimestamp(float(metadata["created_at"]), UTC)
        parts = sorted(metadata.get("partitions", {}).values(), key=lambda p: int(p["partition"]))
        for part in parts:
            rollback = part.get("rollback")
            common = {
                "pipeline": pipeline, "stage": stage, "version": version.number,
                "created_at": created, "tags": version.tags,
                "config_hash": metadata.get("config_hash"), "partition": int(part["partition"]),
                "next_offsets": list(part.get("next_offsets", {}).items()),
                "records_learned": int(part.get("records_learned", 0)),
                "drift_events": int(part.get("drift_events", 0)),
                "rollback_to": int(rollback["version"]) if rollback else None,
            }
            metrics = part.get("metrics") or {None: {"cumulative": None, "rolling": None}}
            rows += [{**common, "metric": name, **values} for name, values in metrics.items()]
    return pa.Table.from_pylist(rows, SCHEMA)


def report_chart(table: pa.Table, title: str) -> Figure:
    """Each metric's cumulative and rolling value, and the records learned, by version: one
    panel each, a line per input partition; a dotted vertical line where a version continues
    from a rollback the version before did not."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = table.to_pylist()
    metrics = sorted({row["metric"] for row in data if row["metric"] is not None})
    panels = [*metrics, "records learned"]
    figure = Figure(figsize=(9, 2.6 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    partitions = sorted({row["partition"] for row in data})
    for axis, panel in zip(axes, panels, strict=True):
        for partition in partitions:
            if panel == "records learned":
                points = {row["version"]: row["records_learned"] for row in data
                          if row["partition"] == partition}
                axis.plot(list(points), list(points.values()), marker="o",
                          label=f"partition {partition}")
                continue
            mine = [row for row in data if row["metric"] == panel and row["partition"] == partition]
            for window in ("cumulative", "rolling"):
                axis.plot([row["version"] for row in mine], [row[window] for row in mine],
                          marker="o", linestyle="-" if window == "cumulative" else "--",
                          label=f"partition {partition} {window}")
        axis.set_ylabel(panel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    for version, target in rollbacks(data):
        for axis in axes:
            axis.axvline(version, color="grey", linestyle=":")
        axes[0].annotate(f"rollback to {target}", (version, 1), xycoords=("data", "axes fraction"),
                         xytext=(-3, -12), textcoords="offset points", ha="right",
                         fontsize="small")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("version")
    if not data:
        axes[-1].text(0.5, 0.5, "no versions in this period", ha="center", va="center",
                      transform=axes[-1].transAxes)
    return figure


def rollbacks(data: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(version, version rolled back to) of each version that continues from a rollback the
    version before it did not continue from, per the table's rows."""
    by_version: dict[int, set[int]] = {}
    for row in data:
        targets = by_version.setdefault(row["version"], set())
        if row["rollback_to"] is not None:
            targets.add(row["rollback_to"])
    found, before = [], set()
    for version, targets in sorted(by_version.items()):
        found += [(version, target) for target in sorted(targets - before)]
        before = targets
    return found


@dataclass(frozen=True)
class ModelReport:
    """What a report run wrote."""

    table: Path
    chart: Path
    versions: int

    def __str__(self) -> str:
        return f"{self.versions} versions reported in {self.table} and {self.chart}"


def write_model_report(registry: Registry, pipeline: str, stage: str, since: timedelta,
                       output_dir: Path, now: datetime | None = None) -> ModelReport:
    """Write the versions of ``registry`` created within ``since`` before ``now`` to
    ``<output_dir>/model-report-<stage>-<now>.parquet`` and ``.png``, each written under a
    temporary name and renamed into place."""
    now = now or datetime.now(UTC)
    start = (now - since).timestamp()
    versions = [version for version in registry.versions()
                if start <= float(version.metadata["created_at"]) <= now.timestamp()]
    table = report_table(versions, pipeline, stage)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = output_dir / f"model-report-{stage}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    table_path, chart_path = stem.with_suffix(".parquet"), stem.with_suffix(".png")
    _atomically(table_path, lambda path: pq.write_table(table, path))
    title = (f"{pipeline}.{stage}: {len(versions)} versions, {(now - since):%Y-%m-%d %H:%M} to "
             f"{now:%Y-%m-%d %H:%M} UTC")
    figure = report_chart(table, title)
    _atomically(chart_path, lambda path: figure.savefig(
        path, format="png", dpi=100, metadata={"Title": title, "Source": table_path.name}))
    return ModelReport(table_path, chart_path, len(versions))


def _atomically(path: Path, write: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
