"""Row-level lineage (docs/lineage.md): lineage columns on a sink's rows, a manifest with each of
its commits, and the ``sf-origin`` header that lets a trace walk back through the stages' topics.

A sink with ``lineage_columns`` or ``lineage_manifest`` gets each written table with the
lineage columns last (:func:`lineage_count` says how many: the schema's metadata holds it, so a
field of the records bearing the same name is never taken for one). Their names end like a
column name mapped by the table sinks' naming rule (``~`` and 16 hexadecimal digits, here fixed:
:data:`SUFFIX`); a field whose name ends that way is mapped by the rule (the Parquet, Kafka and
console sinks apply it then too), so no field's column takes a lineage column's name unless two
64-bit digests agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow import __version__
from streamflow.config.models import PipelineConfig, SinkConfig
from streamflow.plugins import Sink, SinkRecordError
from streamflow.transport.base import ConsumedBatch, Headers, TopicPartition

METADATA_KEY = b"streamflow.lineage_columns"  # schema metadata: how many last columns are lineage
SUFFIX = hashlib.sha256(b"streamflow row lineage").hexdigest()[:16]
TOPIC, PARTITION, OFFSET, CONFIG_HASH, MODEL_VERSION = (
    f"_sf_lineage_{name}~{SUFFIX}"
    for name in ("topic", "partition", "offset", "config_hash", "model_version"))
COLUMNS = (TOPIC, PARTITION, OFFSET, CONFIG_HASH, MODEL_VERSION)
SHORT_NAMES = dict(zip(COLUMNS, ("topic", "partition", "offset", "config_hash", "model_version"),
                       strict=True))
MODEL_VERSION_FIELD = "model_version"  # the field a model stage adds to its output records
ORIGIN_HEADER = "sf-origin"  # on a stage's output record: topic/partition/offset of its input
MANIFEST_PROPERTY = "streamflow.lineage"  # the Delta commit and Iceberg snapshot property
SIDECAR_SUFFIX = ".lineage.json"  # a Parquet file's manifest: _<file name><SIDECAR_SUFFIX>
COMPACTED_MANIFESTS = "compacted_from"  # a compacted file's sidecar: the manifests it took over


def sidecar_path(path: Path) -> Path:
    """The lineage manifest beside the Parquet file at ``path`` (readers skip a leading ``_``)."""
    return path.with_name(f"_{path.name}{SIDECAR_SUFFIX}")


def write_sidecar(path: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` beside the Parquet file at ``path``: to ``<sidecar>.tmp``, fsynced,
    then renamed, so a reader never sees half of it."""
    sidecar = sidecar_path(path)
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(manifest_text(manifest))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, sidecar)


def lineage_count(table: pa.Table) -> int:
    """How many of ``table``'s last columns are lineage columns (0 without)."""
    metadata = table.schema.metadata or {}
    return int(metadata.get(METADATA_KEY, b"0"))


def split_lineage(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """``table``'s record fields and its lineage columns, as two tables (without the metadata)."""
    cut = table.num_columns - lineage_count(table)
    return (table.select(list(range(cut))).replace_schema_metadata(None),
            table.select(list(range(cut, table.num_columns))).replace_schema_metadata(None))


def origin_header(topic: str, partition: int, offset: int) -> bytes:
    """The ``sf-origin`` header value of an output record whose input was at these coordinates."""
    return f"{topic}/{partition}/{offset}".encode()


def parse_origin(value: bytes) -> tuple[str, int, int]:
    """The (topic, partition, offset) in an ``sf-origin`` header value (topic names hold no ``/``)."""
    topic, partition, offset = value.decode().rsplit("/", 2)
    return topic, int(partition), int(offset)


def origin_headers(batch: ConsumedBatch, rows: Sequence[int]) -> list[Headers | None]:
    """For each of ``rows`` (indices into ``batch``), the ``sf-origin`` header of its input."""
    return [[(ORIGIN_HEADER, origin_header(batch.topics[row], batch.partitions[row],
                                           batch.offsets[row]))] for row in rows]


def row_lineage_on(config: PipelineConfig) -> bool:
    """Whether a sink of ``config`` wants lineage: then stages add ``sf-origin`` headers."""
    return any(sink.lineage_columns or sink.lineage_manifest for sink in config.sinks)


def model_upstream(config: PipelineConfig, topic: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a model stage writes ``topic``, or a stage upstream of it."""
    if topic in seen:
        return False
    if any(model.output == topic for model in config.models):
        return True
    producers = [stage.input for stage in config.processors
                 if stage.output == topic or any(topic in step.output_topics()
                                                  for step in stage.steps)]
    return any(model_upstream(config, source, seen | {topic}) for source in producers)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class _Range:
    """A partition's rows written since the last flush."""

    first: int
    last: int
    rows: int


class LineageSink(Sink[Any]):
    """Wraps a sink configured for row-level lineage: adds the lineage columns to each written
    table (:meth:`annotate`, called by the sink stage with the rows' input coordinates), keeps
    the offsets and model versions of the rows the sink took, and gives the sink the manifest of
    each flush in ``lineage_manifest`` (the sink stores it in that flush's commit)."""

    def __init__(self, inner: Sink, sink: SinkConfig, pipeline: PipelineConfig,
                 config_hash: str) -> None:
        super().__init__(inner.config, inner.context)
        self.inner = inner
        self.columns = sink.lineage_columns
        self.manifests = sink.lineage_manifest
        self.config_hash = config_hash
        self.model = model_upstream(pipeline, sink.input)
        self._ranges: dict[TopicPartition, _Range] = {}
        self._versions: list[int] = []
        self._started: str | None = None

    def annotate(self, part: pa.Table, batch: ConsumedBatch, rows: np.ndarray) -> pa.Table:
        """``part`` (the records of ``batch`` at ``rows``) with the lineage columns last."""
        count = part.num_rows
        arrays = [pa.array([batch.topics[row] for row in rows], pa.string()),
                  pa.array(np.asarray(batch.partitions, dtype=np.int64)[rows], pa.int64()),
                  pa.array(np.asarray(batch.offsets, dtype=np.int64)[rows], pa.int64()),
                  pa.array([self.config_hash] * count, pa.string())]
        names = list(COLUMNS[:4])
        if self.model:
            arrays.append(_versions(part))
            names.append(MODEL_VERSION)
        columns = [*part.columns, *arrays]
        table = pa.Table.from_arrays(columns, names=[*part.column_names, *names])
        return table.replace_schema_metadata({METADATA_KEY: str(len(names)).encode()})

    def open(self) -> None:
        self.inner.open()

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        taken = np.ones(table.num_rows, dtype=bool)
        own = lineage_count(table)
        data = table if self.columns or not own else split_lineage(table)[0]
        try:
            self.inner.write(data, partition, first_offset)
        except SinkRecordError as exc:
            taken[exc.rows] = False
            raise
        finally:
            if own and taken.any():
                self._taken(table, partition, taken)

    def _taken(self, table: pa.Table, partition: TopicPartition, taken: np.ndarray) -> None:
        table = split_lineage(table)[1]  # a field may have a lineage column's name
        offsets = table.column(OFFSET).to_numpy()[taken]
        first, last = int(offsets.min()), int(offsets.max())
        known = self._ranges.get(partition)
        self._ranges[partition] = _Range(first, last, int(taken.sum())) if known is None else \
            _Range(min(known.first, first), max(known.last, last), known.rows + int(taken.sum()))
        if MODEL_VERSION in table.column_names:
            versions = table.column(MODEL_VERSION).to_numpy(zero_copy_only=False)[taken]
            present = [int(v) for v in versions if v is not None and not np.isnan(v)]
            if present:
                self._versions += [min(present), max(present)]
        if self._started is None:
            self._started = _now()

    def manifest(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> dict[str, Any]:
        """What the coming flush commits: per partition, the offsets of the first and last row
        written and the next offset committed (a partition with nothing written has nulls)."""
        entries = []
        for partition in sorted({*offsets, *self._ranges}):
            written = self._ranges.get(partition)
            entries.append({
                "topic": partition[0], "partition": partition[1],
                "first_offset": written.first if written else None,
                "last_offset": written.last if written else None,
                "next_offset": offsets.get(partition),
                "rows": written.rows if written else 0,
            })
        committed = _now()
        return {
            "commit_id": uuid.uuid4().hex, "pipeline": self.context.pipeline,
            "sink": self.context.name, "cluster_id": cluster_id,
            "rows": sum(entry["rows"] for entry in entries), "offsets": entries,
            "config_hash": self.config_hash, "streamflow_version": __version__,
            "model_version": ({"min": min(self._versions), "max": max(self._versions)}
                              if self._versions else None),
            "started_at": self._started or committed, "committed_at": committed,
        }

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int | None:
        if self.manifests:
            self.inner.lineage_manifest = self.manifest(offsets, cluster_id)
        try:
            return self.inner.flush(offsets, cluster_id)
        finally:
            self.inner.lineage_manifest = None
            self._forget()

    def _forget(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        if partitions is None:
            self._ranges.clear()
            self._versions, self._started = [], None
        for partition in partitions or ():
            self._ranges.pop(partition, None)

    def should_flush(self) -> bool:
        return self.inner.should_flush()

    def resume_offsets(self, partitions: Sequence[TopicPartition], cluster_id: str
                       ) -> dict[TopicPartition, int]:
        return self.inner.resume_offsets(partitions, cluster_id)

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        self._forget(partitions)
        self.inner.revoke(partitions)

    def close(self) -> None:
        self._forget()
        self.inner.close()


def _versions(part: pa.Table) -> pa.Array:
    """The ``model_version`` field of each record as int64 (null where absent or not a number)."""
    if MODEL_VERSION_FIELD not in part.column_names:
        return pa.nulls(part.num_rows, pa.int64())
    column = part.column(MODEL_VERSION_FIELD)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return pa.nulls(part.num_rows, pa.int64())
    return pc.cast(column, pa.int64(), safe=False).combine_chunks()


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """A manifest as compact JSON."""
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True)
