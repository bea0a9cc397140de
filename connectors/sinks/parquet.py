"""Parquet files named by topic, partition and first offset, optionally partitioned and rolled.

Each file is written under a temporary name and renamed atomically, so readers never see a
partial file. A file's name comes from the topic, the Kafka partition and the offset its flush
started at (plus the event-time bucket when rolling by event time), and its directory from the
``partition_by`` values, so a replay of the same records after a crash overwrites the same files
instead of adding new ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.sinks.warehouse import conform
from streamflow.plugins import ComponentContext, Sink, SinkRecordError
from streamflow.transport.base import TopicPartition

TEMPORARY_SUFFIX = ".tmp"


class ParquetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="directory; files go to <path>/<topic>/")
    compression: str = Field("zstd", description="a Parquet codec: zstd, snappy, gzip, none")
    partition_by: list[str] = Field(
        default_factory=list,
        description="fields whose values name Hive-style directories (<field>=<value>/), e.g. a "
                    "date derived from event time by a sql step",
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


class ParquetSink(Sink[ParquetConfig]):
    """Writes Parquet files named by topic, partition and first offset; replays rewrite them.

    Buffers per Kafka partition; :meth:`flush` writes one file per buffered partition and
    ``partition_by`` directory (and event-time bucket with ``roll_interval_s``).
    """

    config_model = ParquetConfig

    def __init__(self, config: ParquetConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.root = Path(config.path)
        self._buffers: dict[TopicPartition, tuple[int, list[pa.Table]]] = {}
        self._buffered_rows = self._buffered_bytes = 0

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.rglob(f"*{TEMPORARY_SUFFIX}"):  # from a crash mid-write
            leftover.unlink()

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        _start, tables = self._buffers.setdefault(partition, (first_offset, []))
        failures: dict[int, BaseException] = {}
        if tables:
            table, failures = _fit(table, tables[0].schema)
        tables.append(table)
        self._buffered_rows += table.num_rows
        self._buffered_bytes += table.nbytes
        if failures:
            raise SinkRecordError(list(failures), list(failures.values()))

    def should_flush(self) -> bool:
        rows, size = self.config.roll_rows, self.config.roll_bytes
        return bool((rows and self._buffered_rows >= rows) or (size and self._buffered_bytes >= size))

    def file_path(self, partition: TopicPartition, first_offset: int,
                  directories: Sequence[str] = (), bucket_ms: int | None = None) -> Path:
        topic, number = partition
        name = f"{topic}+{number:04d}+{first_offset:020d}"
        if bucket_ms is not None:
            name += f"+{bucket_ms:015d}"
        return self.root.joinpath(topic, *directories, f"{name}.parquet")

    def _pieces(self, table: pa.Table) -> list[tuple[list[str], int | None, pa.Table]]:
        """The table split by ``partition_by`` values and event-time bucket."""
        keys: list[pa.ChunkedArray] = []
        names: list[str] = []
        for field in self.config.partition_by:
            column = table.column(field) if field in table.column_names else pa.chunked_array(
                [pa.nulls(table.num_rows, pa.string())])
            keys.append(pc.cast(column, pa.string()))
            names.append(field)
        if self.config.roll_interval_s is not None and self.config.time_field is not None:
            keys.append(self._buckets(table, self.config.time_field, self.config.roll_interval_s))
            names.append("_bucket")
        if not keys:
            return [([], None, table)]
        groups = pa.table(dict(zip(names, keys, strict=True))).group_by(
            names, use_threads=False).aggregate([])
        pieces = []
        for group in groups.to_pylist():
            mask = None
            for name, key in zip(names, keys, strict=True):
                value = group[name]
                matches = pc.is_null(key) if value is None else pc.equal(key, value)
                matches = pc.fill_null(matches, False)
                mask = matches if mask is None else pc.and_(mask, matches)
            directories = [f"{field}={_directory_value(group[field])}"
                           for field in self.config.partition_by]
            bucket = group.get("_bucket")
            pieces.append((directories, int(bucket) if bucket is not None else None,
                           table.filter(mask)))
        return pieces

    @staticmethod
    def _buckets(table: pa.Table, field: str, interval_s: float) -> pa.ChunkedArray:
        """Start (epoch ms) of each record's event-time interval; records without one get -1."""
        column = table.column(field) if field in table.column_names else pa.chunked_array(
            [pa.nulls(table.num_rows, pa.int64())])
        if pa.types.is_timestamp(column.type):
            column = pc.cast(pc.cast(column, pa.timestamp("ms", column.type.tz)), pa.int64())
        millis = pc.cast(column, pa.int64(), safe=False)
        interval_ms = max(int(interval_s * 1000), 1)
        starts = pc.multiply(pc.floor(pc.divide(pc.cast(millis, pa.float64()), interval_ms)),
                             interval_ms)
        return pc.cast(pc.fill_null(starts, -1), pa.string())

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        written = 0
        for partition, (first_offset, tables) in self._buffers.items():
            table = pa.concat_tables(tables, promote_options="permissive")
            for directories, bucket, piece in self._pieces(table):
                written += self._write_file(
                    self.file_path(partition, first_offset, directories, bucket), piece)
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

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            _first, tables = self._buffers.pop(partition, (0, []))
            self._buffered_rows -= sum(table.num_rows for table in tables)
            self._buffered_bytes -= sum(table.nbytes for table in tables)


def _fit(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, dict[int, BaseException]]:
    """``table`` without the rows whose values cannot take the types ``schema`` (the file's
    first records) gave their fields, and those rows with their errors."""
    try:
        pa.unify_schemas([schema, table.schema], promote_options="permissive")
        return table, {}
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    known = {field.name: field.type for field in schema if field.name in table.column_names}
    conformed = conform(table.select(list(known)), known, [])
    fitted = _replace_columns(table, conformed.table)
    if conformed.failures:
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(conformed.failures)] = False
        fitted = fitted.filter(pa.array(keep))
    return fitted, dict(sorted(conformed.failures.items()))


def _replace_columns(table: pa.Table, replacements: pa.Table) -> pa.Table:
    for name in replacements.column_names:
        table = table.set_column(table.schema.get_field_index(name), name,
                                 replacements.column(name))
    return table


def _directory_value(value: str | None) -> str:
    """A partition value safe as one directory name (Hive's default for null)."""
    if value is None:
        return "__HIVE_DEFAULT_PARTITION__"
    return "".join(c if c.isalnum() or c in "-_.:" else f"%{ord(c):02X}" for c in value) or "__EMPTY__"
