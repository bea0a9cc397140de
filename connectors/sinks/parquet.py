"""Parquet files named by topic, partition, first offset and cluster, optionally partitioned
and rolled.

Each file is written under a temporary name and renamed atomically, so readers never see a
partial file. A file's name comes from the topic, the Kafka partition and the offset its flush
started at (plus the event-time bucket when rolling by event time) and ends with the Kafka
cluster's id, and its directory from the ``partition_by`` values, so a replay of the same records
after a crash overwrites the same files instead of adding new ones, while the records of another
cluster (a new in-memory embedded broker starts its offsets at 0 again) never overwrite them.

With a lineage manifest (docs/lineage.md), each file has a sidecar beside it,
``_<file name>.lineage.json`` (a leading ``_``: readers of the folder skip it), written before
the file and replaced with it by a replay.

Partition directories are ``<field>=<value>``, one value to one directory (on a case-sensitive
file system): see :func:`directory_name`. A record whose ``partition_by`` value cannot name a
directory (a JSON object or array) is dead-lettered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.sinks.warehouse import (
    ColumnTypeError,
    apart_from_lineage,
    cast_values,
    conform,
    is_nested,
)
from streamflow.plugins import ComponentContext, Sink, SinkRecordError
from streamflow.processing.steps import type_depth
from streamflow.runtime.row_lineage import MODEL_VERSION, OFFSET, write_sidecar
from streamflow.transport.base import TopicPartition

TEMPORARY_SUFFIX = ".tmp"
NULL_DIRECTORY = "__HIVE_DEFAULT_PARTITION__"  # Hive's name for a null value
EMPTY_DIRECTORY = "__EMPTY__"  # the empty string
MAX_DIRECTORY_BYTES = 128  # longer encoded values are cut and get a digest
DIGEST_DIGITS = 32  # hexadecimal digits of SHA-256 in the name of a long value
_SAFE = "-_.:"  # kept as they are, with letters and digits
BUCKET = "_bucket"  # the event-time interval, beside the partition_by values


class ParquetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="directory; files go to <path>/<topic>/")
    compression: str = Field("zstd", description="a Parquet codec: zstd, snappy, gzip, none")
    partition_by: list[str] = Field(
        default_factory=list,
        description="fields whose values name Hive-style directories (<field>=<value>/), e.g. a "
                    "date derived from event time by a sql step; values are percent-encoded",
    )
    roll_rows: int | None = Field(
        None, ge=1, description="flush (close the files) once this many records are buffered")
    roll_bytes: int | None = Field(
        None, ge=1, description="flush once the buffered records take this many bytes in memory")
    roll_interval_s: float | None = Field(
        None, gt=0, description="no file spans more than one event-time interval of this length")
    time_field: str | None = Field(
        None, description="event-time field for roll_interval_s: a timestamp or epoch milliseconds")

    @model_validator(mode="after")
    def _time_field_with_interval(self) -> ParquetConfig:
        if (self.roll_interval_s is None) != (self.time_field is None):
            raise ValueError("roll_interval_s and time_field go together: set both or neither")
        return self


class PartitionValueError(ValueError):
    """A ``partition_by`` value cannot name a directory."""


class NestingTooDeepError(ValueError):
    """A value nests deeper than Parquet readers take (a schema 100 levels deep)."""


class EmptyObjectError(ValueError):
    """A value holds an empty object, which Parquet cannot store (a group needs a field)."""


MAX_SCHEMA_DEPTH = 100  # Parquet readers' default limit (Arrow's C++ reader, with the root)


def has_empty_struct(kind: pa.DataType) -> bool:
    """Whether a struct without fields is anywhere in ``kind`` (Parquet cannot write one)."""
    if pa.types.is_struct(kind):
        return kind.num_fields == 0 or any(has_empty_struct(child.type) for child in kind)
    if pa.types.is_map(kind):
        return has_empty_struct(kind.key_type) or has_empty_struct(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return has_empty_struct(kind.value_type)
    return False


class ParquetSink(Sink[ParquetConfig]):
    """Writes Parquet files named by topic, partition, first offset and Kafka cluster; replays
    rewrite them.

    Buffers per Kafka partition, each table with its rows' places (``partition_by`` directories
    and event-time bucket, computed when written); :meth:`flush` writes one file per buffered
    partition and place.
    """

    config_model = ParquetConfig

    def __init__(self, config: ParquetConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.root = Path(config.path)
        # Per Kafka partition: the first offset, the buffered tables and their places.
        self._buffers: dict[TopicPartition, tuple[int, list[pa.Table], list[pa.Table]]] = {}
        self._buffered_rows = self._buffered_bytes = 0

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.rglob(f"*{TEMPORARY_SUFFIX}"):  # from a crash mid-write
            leftover.unlink()

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        _start, tables, places = self._buffers.setdefault(partition, (first_offset, [], []))
        failures: dict[int, BaseException] = {}
        table = apart_from_lineage(table)
        table = self._readable(table, failures)
        table = self._placeable(table, failures)
        if tables:
            table = _fit(table, tables[0].schema, failures)
        place = self._places(table, failures)
        if failures:
            keep = np.ones(table.num_rows, dtype=bool)
            keep[list(failures)] = False
            table, place = table.filter(pa.array(keep)), place.filter(pa.array(keep))
        if table.num_rows:
            tables.append(table)
            places.append(place)
            self._buffered_rows += table.num_rows
            self._buffered_bytes += table.nbytes
        if failures:
            failed = sorted(failures)
            raise SinkRecordError(failed, [failures[row] for row in failed])

    def should_flush(self) -> bool:
        rows, size = self.config.roll_rows, self.config.roll_bytes
        return bool((rows and self._buffered_rows >= rows) or (size and self._buffered_bytes >= size))

    def file_path(self, partition: TopicPartition, first_offset: int, cluster_id: str,
                  directories: Sequence[str] = (), bucket_ms: int | None = None) -> Path:
        """``<topic>/<directories>/<topic>+<partition>+<first offset>[+<bucket>]+<cluster>.parquet``,
        the cluster id encoded like a partition value (so it holds no ``+`` or ``/``)."""
        topic, number = partition
        name = f"{topic}+{number:04d}+{first_offset:020d}"
        if bucket_ms is not None:
            name += f"+{bucket_ms:015d}"
        return self.root.joinpath(topic, *directories,
                                  f"{name}+{directory_name(cluster_id)}.parquet")

    @staticmethod
    def _readable(table: pa.Table, failures: dict[int, BaseException]) -> pa.Table:
        """``table`` without the columns Parquet cannot hold, and their rows with a value failed:
        columns nesting deeper than readers take (a file with one is written, but no reader with
        default settings opens it) and columns whose type has an object without fields (which
        failed the whole flush, and so the stage)."""
        for column in table.schema:
            if type_depth(column.type, list_levels=2) + 1 > MAX_SCHEMA_DEPTH:  # + the root
                error: ValueError = NestingTooDeepError(
                    f"field {column.name!r} nests deeper than a Parquet schema of {MAX_SCHEMA_DEPTH} "
                    "levels takes (49 lists or 98 objects)")
            elif has_empty_struct(column.type):
                error = EmptyObjectError(
                    f"field {column.name!r} holds an empty object, which Parquet cannot store")
            else:
                continue
            for row in np.flatnonzero(table.column(column.name).is_valid().to_numpy(zero_copy_only=False)):
                failures.setdefault(int(row), error)
            table = table.drop_columns([column.name])
        return table

    def _placeable(self, table: pa.Table, failures: dict[int, BaseException]) -> pa.Table:
        """``table`` without the ``partition_by`` columns whose values cannot be text (objects,
        arrays); their rows with a value there fail."""
        for field in self.config.partition_by:
            if field not in table.column_names or not is_nested(table.column(field).type):
                continue
            column = table.column(field)
            for row in np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False)):
                failures.setdefault(int(row), PartitionValueError(
                    f"partition_by field {field!r}: a JSON object or array cannot name a directory "
                    f"({json.dumps(column[int(row)].as_py(), default=str)[:200]})"))
            table = table.drop_columns([field])
        return table

    def _places(self, table: pa.Table, failures: dict[int, BaseException]) -> pa.Table:
        """Per row, the directory of each ``partition_by`` field and the event-time bucket."""
        places: dict[str, pa.ChunkedArray] = {}
        for field in self.config.partition_by:
            column = table.column(field) if field in table.column_names else pa.chunked_array(
                [pa.nulls(table.num_rows, pa.string())])
            places[field] = _directories(field, pc.cast(column, pa.string()))
        if self.config.roll_interval_s is not None and self.config.time_field is not None:
            places[BUCKET] = self._buckets(table, self.config.time_field,
                                           self.config.roll_interval_s, failures)
        return pa.table(places or {BUCKET: pa.nulls(table.num_rows, pa.int64())})

    @staticmethod
    def _buckets(table: pa.Table, field: str, interval_s: float,
                 failures: dict[int, BaseException]) -> pa.ChunkedArray:
        """Start (epoch ms) of each record's event-time interval; records without one get -1, and
        those whose value is no time fail."""
        column = table.column(field) if field in table.column_names else pa.chunked_array(
            [pa.nulls(table.num_rows, pa.int64())])
        if pa.types.is_timestamp(column.type):
            column = pc.cast(pc.cast(column, pa.timestamp("ms", column.type.tz)), pa.int64())
        millis = cast_values(column, pa.float64(), field, failures)
        infinite = pc.invert(pc.fill_null(pc.is_finite(millis), True))
        for row in np.flatnonzero(infinite.to_numpy(zero_copy_only=False)):
            failures.setdefault(int(row), ColumnTypeError(
                f"time_field {field!r}: {millis[int(row)].as_py()} is not a time"))
        interval_ms = max(int(interval_s * 1000), 1)
        starts = pc.multiply(pc.floor(pc.divide(millis, interval_ms)), interval_ms)
        starts = pc.if_else(pc.is_finite(starts), starts, None)
        return pc.cast(pc.fill_null(starts, -1), pa.int64())

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        written = 0
        for partition, (first_offset, tables, places) in self._buffers.items():
            if not tables:
                continue
            table = pa.concat_tables(tables, promote_options="permissive")
            for directories, bucket, piece in _pieces(table, pa.concat_tables(places)):
                path = self.file_path(partition, first_offset, cluster_id, directories, bucket)
                if self.lineage_manifest is not None:
                    self._write_sidecar(path, partition, piece)
                written += self._write_file(path, piece)
        self._buffers.clear()
        self._buffered_rows = self._buffered_bytes = 0
        return written

    def _write_file(self, final: Path, table: pa.Table) -> int:
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(final.name + TEMPORARY_SUFFIX)
        pq.write_table(table, temporary, compression=self.config.compression)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        return final.stat().st_size

    def _write_sidecar(self, path: Path, partition: TopicPartition, piece: pa.Table) -> None:
        """The commit's manifest for the file at ``path`` (holding ``piece`` of ``partition``'s
        rows): that partition's offsets, with the file's own rows, and with lineage columns its
        own first and last offset and model versions."""
        assert self.lineage_manifest is not None
        entries = [dict(entry) for entry in self.lineage_manifest["offsets"]
                   if (entry["topic"], entry["partition"]) == partition]
        for entry in entries:
            entry["rows"] = piece.num_rows
            if OFFSET in piece.column_names and piece.num_rows:
                entry["first_offset"] = pc.min(piece.column(OFFSET)).as_py()
                entry["last_offset"] = pc.max(piece.column(OFFSET)).as_py()
        manifest = {**self.lineage_manifest, "file": path.name, "rows": piece.num_rows,
                    "offsets": entries}
        if MODEL_VERSION in piece.column_names and piece.column(MODEL_VERSION).null_count < len(piece):
            versions = pc.min_max(piece.column(MODEL_VERSION)).as_py()
            manifest["model_version"] = {"min": versions["min"], "max": versions["max"]}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_sidecar(path, manifest)

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            _first, tables, _places = self._buffers.pop(partition, (0, [], []))
            self._buffered_rows -= sum(table.num_rows for table in tables)
            self._buffered_bytes -= sum(table.nbytes for table in tables)


def _pieces(table: pa.Table, places: pa.Table) -> list[tuple[list[str], int | None, pa.Table]]:
    """``table`` split by ``places``: each piece with its directories and event-time bucket."""
    names = places.column_names
    groups = places.group_by(names, use_threads=False).aggregate([])
    pieces = []
    for group in groups.to_pylist():
        mask = None
        for name in names:
            value = group[name]
            matches = pc.is_null(places[name]) if value is None else pc.equal(places[name], value)
            matches = pc.fill_null(matches, False)
            mask = matches if mask is None else pc.and_(mask, matches)
        bucket = group.get(BUCKET)
        pieces.append(([group[name] for name in names if name != BUCKET], bucket, table.filter(mask)))
    return pieces


def _fit(table: pa.Table, schema: pa.Schema, failures: dict[int, BaseException]) -> pa.Table:
    """``table`` with the types ``schema`` (the file's first records) gave its fields where they
    differ; rows whose values cannot take them are added to ``failures`` (their values nulled)."""
    try:
        pa.unify_schemas([schema, table.schema], promote_options="permissive")
        return table
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    known = {field.name: field.type for field in schema if field.name in table.column_names}
    conformed = conform(table.select(list(known)), known, [])
    for row, error in conformed.failures.items():
        failures.setdefault(row, error)
    return _replace_columns(table, conformed.table)


def _replace_columns(table: pa.Table, replacements: pa.Table) -> pa.Table:
    for name in replacements.column_names:
        table = table.set_column(table.schema.get_field_index(name), name,
                                 replacements.column(name))
    return table


def _directories(field: str, values: pa.ChunkedArray) -> pa.ChunkedArray:
    """``<field>=<directory_name(value)>`` for each of ``values`` (text or null)."""
    distinct = pc.unique(values)
    names = pa.array([f"{field}={directory_name(value)}" for value in distinct.to_pylist()],
                     pa.string())
    return pc.take(names, pc.index_in(values, value_set=distinct))


def directory_name(value: str | None) -> str:
    """A ``partition_by`` value as one directory name, one-to-one.

    Null is ``__HIVE_DEFAULT_PARTITION__`` and the empty string ``__EMPTY__``. Otherwise letters,
    digits and ``-_.:`` stay as they are and every other character becomes the ``%XX`` escapes
    of its UTF-8 bytes (``%`` included, so the name decodes back to the value); a value that would
    read as one of the two names above gets its first ``_`` escaped (``%5F``). An encoded value
    longer than 128 bytes is cut to 95 bytes (at a character or escape boundary) and ends with
    ``~`` and 32 hexadecimal digits of the SHA-256 of the value: ``~`` is always escaped
    otherwise, so such a name is never that of a shorter value.
    """
    if value is None:
        return NULL_DIRECTORY
    if not value:
        return EMPTY_DIRECTORY
    pieces = [c if c.isalnum() or c in _SAFE else
              "".join(f"%{byte:02X}" for byte in c.encode("utf-8", "surrogatepass"))
              for c in value]
    if "".join(pieces) in (NULL_DIRECTORY, EMPTY_DIRECTORY):
        pieces[0] = "%5F"
    encoded = "".join(pieces)
    if len(encoded.encode()) <= MAX_DIRECTORY_BYTES:
        return encoded
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_DIGITS]
    room, kept = MAX_DIRECTORY_BYTES - 1 - DIGEST_DIGITS, []
    for piece in pieces:
        room -= len(piece.encode())
        if room < 0:
            break
        kept.append(piece)
    return "".join(kept) + "~" + digest
