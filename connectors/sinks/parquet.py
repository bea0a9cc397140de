"""Parquet files, one per topic-partition and flush, named by topic, partition and first offset.

Each file is written under a temporary name and renamed atomically, so readers never see a
partial file, and a replay of the same records overwrites the same file instead of adding one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from streamflow.plugins import ComponentContext, Sink
from streamflow.transport.base import TopicPartition

TEMPORARY_SUFFIX = ".tmp"


class ParquetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="directory; files go to <path>/<topic>/")
    compression: str = Field("zstd", description="a Parquet codec: zstd, snappy, gzip, none")


class ParquetSink(Sink[ParquetConfig]):
    """Writes Parquet files named by topic, partition and first offset; replays rewrite them.

    Buffers per partition; :meth:`flush` writes one file per buffered partition.
    """

    config_model = ParquetConfig

    def __init__(self, config: ParquetConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.root = Path(config.path)
        self._buffers: dict[TopicPartition, tuple[int, list[pa.Table]]] = {}

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.rglob(f"*{TEMPORARY_SUFFIX}"):  # from a crash mid-write
            leftover.unlink()

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        _start, tables = self._buffers.setdefault(partition, (first_offset, []))
        tables.append(table)

    def file_path(self, partition: TopicPartition, first_offset: int) -> Path:
        topic, number = partition
        return self.root / topic / f"{topic}+{number:04d}+{first_offset:020d}.parquet"

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        written = 0
        for partition, (first_offset, tables) in self._buffers.items():
            table = pa.concat_tables(tables, promote_options="permissive")
            final = self.file_path(partition, first_offset)
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = final.with_name(final.name + TEMPORARY_SUFFIX)
            pq.write_table(table, temporary, compression=self.config.compression)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, final)
            written += final.stat().st_size
        self._buffers.clear()
        return written

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            self._buffers.pop(partition, None)
