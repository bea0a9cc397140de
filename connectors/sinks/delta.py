"""Delta Lake tables (through the ``deltalake`` package: pip install 'streamflow[delta]').

Each flush is one Delta commit that appends the buffered rows (new fields become new columns by
schema merge) and records, per topic-partition, an application transaction whose version is the
next offset to read. On assignment the runtime reads those versions back and skips what the
table already holds, so a replayed commit is never applied twice. Delta ignores case in column
names: a field whose column differs from another only in case has its records dead-lettered
(column names: :mod:`connectors.sinks.warehouse`). With a lineage manifest (docs/lineage.md),
each commit carries it in its commit info, as custom metadata ``streamflow.lineage`` (JSON text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from pydantic import BaseModel, ConfigDict, Field

from connectors.sinks.warehouse import ColumnType, Naming, buffer_conformed
from streamflow.plugins import ComponentContext, Sink, TransientError
from streamflow.runtime.row_lineage import MANIFEST_PROPERTY, manifest_text
from streamflow.transport.base import TopicPartition

NAMING = Naming("Delta Lake", fold=str.lower)  # delta-rs compares names in Unicode lower case


class DeltaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="table location: a directory (or a URI deltalake supports)")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="passed to deltalake for object stores (credentials...)"
    )


class DeltaSink(Sink[DeltaConfig]):
    """Appends records to a Delta Lake table exactly once; new fields become columns.

    Buffers conformed batches; :meth:`flush` commits them with the offsets as app transactions.
    """

    config_model = DeltaConfig

    def __init__(self, config: DeltaConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.columns: dict[str, ColumnType] = {}
        self._buffer: list[pa.Table] = []

    def app_id(self, partition: TopicPartition, cluster_id: str) -> str:
        """The Delta application id under which ``partition``'s next offset is recorded."""
        topic, number = partition
        return f"streamflow/{self.context.pipeline}/{self.context.name}/{cluster_id}/{topic}/{number}"

    def _table(self) -> DeltaTable | None:
        try:
            return DeltaTable(self.config.path, storage_options=self.config.storage_options or None)
        except TableNotFoundError:
            return None

    def open(self) -> None:
        if "://" not in self.config.path:
            Path(self.config.path).mkdir(parents=True, exist_ok=True)
        table = self._table()
        if table is not None:
            schema = pa.schema(table.schema().to_arrow())
            self.columns = {field.name: field.type for field in schema}

    def resume_offsets(
        self, partitions: Sequence[TopicPartition], cluster_id: str
    ) -> dict[TopicPartition, int]:
        table = self._table()
        if table is None:
            return {}
        versions = {partition: table.transaction_version(self.app_id(partition, cluster_id))
                    for partition in partitions}
        return {partition: version for partition, version in versions.items() if version is not None}

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        buffer_conformed(self._buffer, table, self.columns, [], NAMING)

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int | None:
        if not self._buffer and self._table() is None:
            return 0  # nothing to commit the offsets with yet: a replay dead-letters again
        data = (pa.concat_tables(self._buffer, promote_options="default") if self._buffer
                else pa.schema(self._table().schema().to_arrow()).empty_table())
        transactions = [Transaction(self.app_id(partition, cluster_id), offset)
                        for partition, offset in offsets.items()]
        metadata = ({MANIFEST_PROPERTY: manifest_text(self.lineage_manifest)}
                    if self.lineage_manifest is not None else None)
        try:
            write_deltalake(
                self.config.path, data, mode="append", schema_mode="merge",
                storage_options=self.config.storage_options or None,
                commit_properties=CommitProperties(custom_metadata=metadata,
                                                   app_transactions=transactions),
            )
        except CommitFailedError as exc:
            raise TransientError(f"Delta commit to {self.config.path} failed: {exc}") from exc
        self._buffer.clear()
        return data.nbytes

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        self._buffer.clear()  # the runtime flushed first: only a failed stage's rows remain

    def close(self) -> None:
        self._buffer.clear()
