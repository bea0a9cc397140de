"""Plugins used by tests, named directly as ``tests.plugins:Class`` in pipeline files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from streamflow.plugins import ComponentContext, Sink, TransientError
from streamflow.transport.base import TopicPartition


class FlakyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    failures: int = 1


class FlakySink(Sink[FlakyConfig]):
    """Writes Parquet files like the real sink, but its first ``failures`` flushes fail as a
    warehouse outage would. The failure count lives on disk so it survives restarts."""

    config_model = FlakyConfig

    def __init__(self, config: FlakyConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.root = Path(config.path)
        self.buffers: dict[TopicPartition, tuple[int, list[pa.Table]]] = {}

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        self.buffers.setdefault(partition, (first_offset, []))[1].append(table)

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        counter = self.root / "failed-flushes"
        failed = int(counter.read_text()) if counter.exists() else 0
        if failed < self.config.failures:
            counter.write_text(str(failed + 1))
            raise TransientError(f"warehouse unavailable (simulated outage {failed + 1})")
        for (topic, partition), (first, tables) in self.buffers.items():
            pq.write_table(pa.concat_tables(tables), self.root / f"{topic}-{partition}-{first}.parquet")
        self.buffers.clear()
        return 0

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            self.buffers.pop(partition, None)
