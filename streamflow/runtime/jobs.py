"""The jobs a schedule runs: a user function, Parquet small-file compaction, Delta maintenance,
Iceberg snapshot expiry, bounded backfills (streamflow.runtime.backfill) and model reports
(streamflow.runtime.model_report).

Parquet compaction knows the ``parquet`` sink's file names (connectors/sinks/parquet.py, which
streamflow does not import): ``<topic>+<partition>+<first offset>[+<bucket>]+<cluster>.parquet``,
written under ``<name>.tmp`` and renamed. The sink stores no offsets in its files: a restart
replays from the group's committed offsets and rewrites the files of the flushes after them,
under the same names. A sink commits its offsets right after each flush, so only the newest
flush of a Kafka partition may be rewritten; compaction leaves the newest ``keep_newest``
flushes of each partition as they are, and merges only older, finished files. A compacted
file's lineage sidecar holds the manifests of the files it replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from streamflow.config.models import (
    BackfillJobConfig,
    CompactParquetJobConfig,
    DeltaMaintenanceJobConfig,
    IcebergExpireSnapshotsJobConfig,
    ModelReportJobConfig,
    PipelineConfig,
    PythonJobConfig,
    ScheduleConfig,
    parse_duration,
)
from streamflow.ml.registry import Registry
from streamflow.processing.python_step import import_function
from streamflow.runtime.model_report import matplotlib_missing, write_model_report
from streamflow.runtime.row_lineage import COMPACTED_MANIFESTS, sidecar_path, write_sidecar

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"  # the parquet sink removes leftovers with it when it opens
COMPACTED_FROM = b"streamflow.compacted_from"  # file metadata: the names a compacted file replaced
SINK_FILE = re.compile(
    r"^(?P<topic>[^+/]+)\+(?P<partition>\d+)\+(?P<first>\d{20})"
    r"(?:\+compacted-(?P<last>\d{20})|\+-?\d+)?\+(?P<cluster>[^+/]+)\.parquet$")


@dataclass(frozen=True)
class ParquetFile:
    path: Path
    partition: int
    first_offset: int
    cluster: str
    compacted: bool
    size: int


@dataclass
class CompactionResult:
    files_in: int = 0
    files_out: int = 0
    rows: int = 0

    def __str__(self) -> str:
        return f"{self.files_in} files compacted into {self.files_out} ({self.rows} rows)"


def _listing(folder: Path) -> list[ParquetFile]:
    files = []
    for path in folder.rglob("*.parquet"):
        match = SINK_FILE.match(path.name)
        if match is None:
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # replaced or compacted meanwhile
            continue
        files.append(ParquetFile(path, int(match["partition"]), int(match["first"]),
                                 match["cluster"], match["last"] is not None, size))
    return files


def finish_interrupted(folder: Path) -> int:
    """Delete the files a compacted file replaced, where a crash left them beside it; how many."""
    removed = 0
    for item in _listing(folder):
        if not item.compacted:
            continue
        metadata = pq.read_schema(item.path).metadata or {}
        for name in json.loads(metadata.get(COMPACTED_FROM, b"[]")):
            replaced = item.path.parent / name
            if replaced != item.path and replaced.exists():
                replaced.unlink()
                removed += 1
            if replaced != item.path:
                sidecar_path(replaced).unlink(missing_ok=True)
    return removed


def compact_parquet(folder: Path, max_file_bytes: int, keep_newest: int = 1,
                    compression: str = "zstd") -> CompactionResult:
    """Merge the small, finished files of each directory under ``folder`` (a parquet sink's
    ``<path>/<topic>``), per Kafka partition and cluster, in offset order.

    Each compacted file is written under a temporary name, fsynced and renamed into place, then
    the files it replaced are deleted; its metadata names them, so a crash in between is
    finished by the next run (:func:`finish_interrupted`) instead of leaving rows twice.
    """
    result = CompactionResult()
    if not folder.is_dir():
        return result
    finish_interrupted(folder)
    files = _listing(folder)
    flushes: dict[tuple[int, str], set[int]] = defaultdict(set)
    for item in files:
        if not item.compacted:
            flushes[item.partition, item.cluster].add(item.first_offset)
    protected = {key: set(sorted(offsets)[-keep_newest:]) for key, offsets in flushes.items()}
    groups: dict[tuple[Path, int, str], list[ParquetFile]] = defaultdict(list)
    for item in files:
        newest = protected.get((item.partition, item.cluster), set())
        if item.size < max_file_bytes and (item.compacted or item.first_offset not in newest):
            groups[item.path.parent, item.partition, item.cluster].append(item)
    for (directory, _partition, _cluster), group in sorted(groups.items()):
        for chunk in _chunks(sorted(group, key=lambda f: f.first_offset), max_file_bytes):
            rows = _merge(directory, chunk, compression)
            if rows is not None:
                result.files_in += len(chunk)
                result.files_out += 1
                result.rows += rows
    return result


def _chunks(files: list[ParquetFile], max_bytes: int) -> list[list[ParquetFile]]:
    """``files`` in runs of at least two whose sizes add up to at most ``max_bytes``."""
    chunks: list[list[ParquetFile]] = [[]]
    size = 0
    for item in files:
        if chunks[-1] and size + item.size > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item.size
    return [chunk for chunk in chunks if len(chunk) > 1]


def _merge(directory: Path, chunk: list[ParquetFile], compression: str) -> int | None:
    """Write ``chunk``'s rows to one compacted file and delete ``chunk``; its row count, or None
    when the files' types cannot be merged (they are left as they are)."""
    try:
        table = pa.concat_tables([pq.ParquetFile(item.path).read() for item in chunk],
                                 promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        log.warning("compaction: %s files from %s on are left as they are: %s",
                    directory, chunk[0].path.name, exc)
        return None
    first = SINK_FILE.match(chunk[0].path.name)
    assert first is not None
    last_offset = max(item.first_offset for item in chunk)
    final = directory / (f"{first['topic']}+{first['partition']}+{first['first']}"
                         f"+compacted-{last_offset:020d}+{first['cluster']}.parquet")
    metadata = dict(table.schema.metadata or {})
    metadata[COMPACTED_FROM] = json.dumps([item.path.name for item in chunk]).encode()
    temporary = final.with_name(final.name + TEMPORARY_SUFFIX)
    pq.write_table(table.replace_schema_metadata(metadata), temporary, compression=compression)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    taken_over = _manifests(chunk)
    if taken_over:
        write_sidecar(final, {"file": final.name, "rows": table.num_rows,
                              "compacted_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                              COMPACTED_MANIFESTS: taken_over})
    os.replace(temporary, final)
    for item in chunk:
        if item.path != final:
            item.path.unlink(missing_ok=True)
            sidecar_path(item.path).unlink(missing_ok=True)
    return table.num_rows


def _manifests(chunk: list[ParquetFile]) -> list[dict[str, Any]]:
    """The lineage manifests of ``chunk``'s files (docs/lineage.md), a compacted file's own
    taken-over manifests in place of its sidecar; files without a sidecar add none."""
    found: list[dict[str, Any]] = []
    for item in chunk:
        try:
            manifest = json.loads(sidecar_path(item.path).read_text())
        except FileNotFoundError:
            continue
        found += manifest.get(COMPACTED_MANIFESTS, [manifest])
    return found


def delta_maintenance(path: str, storage_options: dict[str, str], optimize: bool,
                      vacuum_retention_hours: float | None) -> str:
    """Optimize (compact) and vacuum the Delta table at ``path``; what was done."""
    from deltalake import DeltaTable  # the [delta] extra

    table = DeltaTable(path, storage_options=storage_options or None)
    done = []
    if optimize:
        metrics = table.optimize.compact()
        done.append(f"optimize: {metrics.get('numFilesRemoved', 0)} files into "
                    f"{metrics.get('numFilesAdded', 0)}")
    if vacuum_retention_hours is not None:
        removed = table.vacuum(retention_hours=int(vacuum_retention_hours), dry_run=False,
                               enforce_retention_duration=False)
        done.append(f"vacuum: {len(removed)} files deleted")
    return "; ".join(done) or "nothing to do"


OFFSET_PROPERTY_PREFIX = "streamflow/"  # the iceberg sink's offsets in snapshot summaries


def iceberg_expire_snapshots(catalog_name: str, properties: dict[str, str], table_name: str,
                             older_than: timedelta, retain_last: int,
                             now: datetime | None = None) -> str:
    """Expire the snapshots of an Iceberg table older than ``older_than``; what was done.

    Kept however old: the newest ``retain_last`` of the current snapshot's ancestry, branch
    and tag heads, and the ancestry from the current snapshot back to the newest snapshot
    holding each Kafka partition's offsets (the iceberg sink reads them back along the
    ancestry on assignment: expiring them would replay what the table already holds)."""
    from pyiceberg.catalog import load_catalog  # the [iceberg] extra
    from pyiceberg.table.snapshots import ancestors_of

    table = load_catalog(catalog_name, **properties).load_table(table_name)
    ancestry = list(ancestors_of(table.current_snapshot(), table.metadata))  # newest first
    keep = {snapshot.snapshot_id for snapshot in ancestry[:retain_last]}
    keep |= {ref.snapshot_id for ref in table.metadata.refs.values()}

    def offset_keys(snapshot: Any) -> set[str]:
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        return {key for key in summary if key.startswith(OFFSET_PROPERTY_PREFIX)}

    wanted = set().union(*map(offset_keys, ancestry)) if ancestry else set()
    seen: set[str] = set()
    for snapshot in ancestry:
        if seen >= wanted:
            break
        keep.add(snapshot.snapshot_id)
        seen |= offset_keys(snapshot)
    cutoff_ms = int(((now or datetime.now(UTC)) - older_than).timestamp() * 1000)
    snapshots = [snapshot.snapshot_id for snapshot in table.metadata.snapshots]
    expired = [snapshot.snapshot_id for snapshot in table.metadata.snapshots
               if snapshot.timestamp_ms < cutoff_ms and snapshot.snapshot_id not in keep]
    if expired:
        table.maintenance.expire_snapshots().by_ids(expired).commit()
    return f"{len(expired)} snapshots of {table_name} expired, {len(snapshots) - len(expired)} kept"


def build_job(schedule: ScheduleConfig, config: PipelineConfig) -> Callable[[], object]:
    """The callable a schedule runs (the pipeline validated that its sink exists and fits)."""
    job = schedule.job
    if isinstance(job, PythonJobConfig):
        return import_function(job.function)
    if isinstance(job, BackfillJobConfig):
        from streamflow.runtime.backfill import run_backfill_job  # it imports the runner

        return lambda: run_backfill_job(config, job.from_, job.until, job.output_suffix,
                                        job.model_checkpoint)
    if isinstance(job, ModelReportJobConfig):
        [model] = [model for model in config.models if job.stage in (None, model.name)]
        registry = Registry.of_stage(model.checkpoint.path, config.pipeline, model.name)
        since = parse_duration(job.since)
        return lambda: write_model_report(registry, config.pipeline, model.name, since,
                                          Path(job.output_dir))
    sink = next(sink for sink in config.sinks if sink.name == job.sink)
    settings = sink.connector_settings()
    if isinstance(job, CompactParquetJobConfig):
        folder = Path(settings["path"]) / sink.input
        compression = str(settings.get("compression", "zstd"))
        return lambda: compact_parquet(folder, job.max_file_bytes, job.keep_newest, compression)
    if isinstance(job, IcebergExpireSnapshotsJobConfig):
        from connectors.sinks.iceberg import IcebergConfig  # the [iceberg] extra

        iceberg = IcebergConfig.model_validate(settings)
        older_than = parse_duration(job.older_than)
        return lambda: iceberg_expire_snapshots(
            iceberg.catalog.name, iceberg.catalog.properties, iceberg.table, older_than,
            job.retain_last)
    assert isinstance(job, DeltaMaintenanceJobConfig)
    return lambda: delta_maintenance(settings["path"], settings.get("storage_options") or {},
                                     job.optimize, job.vacuum_retention_hours)


def schedule_errors(config: PipelineConfig) -> list[str]:
    """Where a schedule's python function cannot be imported, the pipeline cannot run the
    bounded run of a backfill job, or a model report cannot draw its chart, with the field
    path."""
    errors = []
    for number, schedule in enumerate(config.schedules):
        if schedule.python is not None:
            try:
                import_function(schedule.python.function)
            except ValueError as exc:
                errors.append(f"schedules[{number}].python.function: {exc}; name an importable "
                              "'package.module:function'")
        if schedule.backfill is not None:
            from streamflow.runtime.backfill import backfill_errors

            errors += [f"schedules[{number}].backfill: {error}" for error in backfill_errors(config)]
        if schedule.model_report is not None and (missing := matplotlib_missing()):
            errors.append(f"schedules[{number}].model_report: {missing}")
    return errors
