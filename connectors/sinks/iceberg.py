"""Apache Iceberg tables (through ``pyiceberg``: pip install 'streamflow[iceberg]').

Each flush is one catalog commit (a transaction) that adds the buffered rows (new fields become
new columns, configured partition fields are added once their column exists) and records, per
topic-partition, the next offset to read as a property of the snapshot's summary. On assignment
the runtime reads them back, from the newest snapshot of the current one's ancestry that holds
each, and skips what the table already holds. Column names are compared ignoring case, as the
engines that read Iceberg tables do: a field whose column differs from another only in case has
its records dead-lettered (column names: :mod:`connectors.sinks.warehouse`). With a lineage
manifest (docs/lineage.md), the summary also holds it as ``streamflow.lineage`` (JSON text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError
from pyiceberg.table import Table, Transaction
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.transforms import parse_transform

from connectors.sinks.warehouse import ColumnType, Naming, buffer_conformed
from streamflow.plugins import ComponentContext, Sink, TransientError
from streamflow.runtime.row_lineage import MANIFEST_PROPERTY, manifest_text
from streamflow.transport.base import TopicPartition

NAMING = Naming("Iceberg", fold=str.lower)  # Spark, Trino and DuckDB resolve columns ignoring case


class CatalogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("streamflow", description="catalog name (pyiceberg.catalog.load_catalog)")
    properties: dict[str, str] = Field(
        default_factory=dict,
        description="catalog properties, e.g. type: sql, uri: sqlite:///..., warehouse: file:///...",
    )


# the transforms partition_by takes, each with an instance to ask which types it takes
TRANSFORMS = {name: name for name in ("identity", "year", "month", "day", "hour")} | {
    "bucket[N]": "bucket[2]", "truncate[N]": "truncate[2]"}


class PartitionField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="the record field partitioned on")
    transform: str = Field(
        "identity", pattern=r"^(identity|year|month|day|hour|(bucket|truncate)\[[1-9][0-9]*\])$",
        description="identity, year, month, day, hour, bucket[N] or truncate[N]",
    )


class IcebergConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    catalog: CatalogConfig = Field(default_factory=CatalogConfig, description="the Iceberg catalog")
    table: str = Field(pattern=r"^[^.]+(\.[^.]+)+$", description="namespace.table, created if missing")
    mode: Literal["append", "upsert"] = Field(
        "append", description="append every record, or upsert: replace the row with the same keys"
    )
    keys: list[str] = Field(default_factory=list, description="key fields (mode upsert only)")
    partition_by: list[PartitionField] = Field(
        default_factory=list, description="the partition spec: fields and their transforms"
    )

    @model_validator(mode="after")
    def _keys_match_mode(self) -> IcebergConfig:
        if (self.mode == "upsert") != bool(self.keys):
            raise ValueError("mode 'upsert' needs keys, and keys apply only to mode 'upsert'")
        return self


class IcebergSink(Sink[IcebergConfig]):
    """Appends or upserts records to an Iceberg table exactly once; new fields become columns.

    Buffers conformed batches; :meth:`flush` commits them with the offsets in the snapshot summary.
    """

    config_model = IcebergConfig

    def __init__(self, config: IcebergConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.columns: dict[str, ColumnType] = {}
        self.keys = [NAMING.column(key) for key in config.keys]
        self._buffer: list[pa.Table] = []
        self._catalog: Catalog | None = None

    def offset_key(self, partition: TopicPartition, cluster_id: str) -> str:
        """The snapshot summary property holding ``partition``'s next offset."""
        topic, number = partition
        return f"streamflow/{self.context.pipeline}/{self.context.name}/{cluster_id}/{topic}/{number}"

    def _table(self) -> Table | None:
        assert self._catalog is not None
        try:
            return self._catalog.load_table(self.config.table)
        except NoSuchTableError:
            return None

    def open(self) -> None:
        self._catalog = load_catalog(self.config.catalog.name, **self.config.catalog.properties)
        table = self._table()
        if table is not None:
            self.columns = {field.name: field.type for field in table.schema().as_arrow()}

    def resume_offsets(
        self, partitions: Sequence[TopicPartition], cluster_id: str
    ) -> dict[TopicPartition, int]:
        table = self._table()
        if table is None:
            return {}
        keys = {self.offset_key(partition, cluster_id): partition for partition in partitions}
        found: dict[TopicPartition, int] = {}
        for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
            for key, partition in keys.items():
                value = snapshot.summary[key] if snapshot.summary is not None else None
                if value is not None and partition not in found:
                    found[partition] = int(value)
            if len(found) == len(keys):
                break
        return found

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        buffer_conformed(self._buffer, table, self.columns, self.keys, NAMING)

    def _last_per_key(self, data: pa.Table) -> pa.Table:
        """``data`` with only the last row of each key (an upsert takes one row per key)."""
        # The key columns under names of our own: any name a field has (_sf_index...) is data.
        names = [f"key{position}" for position in range(len(self.keys))]
        numbered = pa.table([*(data.column(key) for key in self.keys),
                             pa.array(range(data.num_rows), pa.int64())], names=[*names, "index"])
        last = numbered.group_by(names, use_threads=False).aggregate([("index", "max")])
        return data.take(last.column("index_max"))

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int | None:
        assert self._catalog is not None
        table = self._table()
        if not self._buffer and table is None:
            return 0  # nothing to commit the offsets with yet: a replay dead-letters again
        data = (pa.concat_tables(self._buffer, promote_options="default") if self._buffer
                else table.schema().as_arrow().empty_table())
        if table is None:
            namespace = Catalog.identifier_to_tuple(self.config.table)[:-1]
            self._catalog.create_namespace_if_not_exists(namespace)
            table = self._catalog.create_table(self.config.table, schema=data.schema)
        properties = {self.offset_key(partition, cluster_id): str(offset)
                      for partition, offset in offsets.items()}
        if self.lineage_manifest is not None:
            properties[MANIFEST_PROPERTY] = manifest_text(self.lineage_manifest)
        try:
            with table.transaction() as transaction:
                existing = set(table.schema().column_names)
                if missing := [field for field in data.schema if field.name not in existing]:
                    with transaction.update_schema() as update:
                        update.union_by_name(pa.schema(missing))
                self._add_partition_fields(table, transaction)
                data = self._aligned(data, transaction.table_metadata.schema().as_arrow())
                if self.config.mode == "append" or not data.num_rows:
                    transaction.append(data, snapshot_properties=properties)
                else:
                    result = transaction.upsert(self._last_per_key(data), join_cols=self.keys,
                                                snapshot_properties=properties)
                    if not result.rows_updated and not result.rows_inserted:  # a replay
                        transaction.append(data.schema.empty_table(), snapshot_properties=properties)
        except CommitFailedException as exc:
            raise TransientError(f"Iceberg commit to {self.config.table} failed: {exc}") from exc
        self._buffer.clear()
        return data.nbytes

    @staticmethod
    def _aligned(data: pa.Table, schema: pa.Schema) -> pa.Table:
        """``data`` with the table's columns in its order, null where a record had no field (an
        upsert replaces whole rows)."""
        columns = [data.column(field.name) if field.name in data.column_names
                   else pa.nulls(data.num_rows, field.type) for field in schema]
        return pa.table(columns, names=schema.names).cast(schema)

    def _add_partition_fields(self, table: Table, transaction: Transaction) -> None:
        """Add the configured partition fields the spec lacks whose column exists by now."""
        schema = transaction.table_metadata.schema()
        spec = table.spec()
        present = {(schema.find_column_name(field.source_id), str(field.transform))
                   for field in spec.fields}
        wanted = [(NAMING.column(field.field), field.transform)
                  for field in self.config.partition_by]
        new = [(column, transform) for column, transform in wanted
               if (column, transform) not in present and column in schema.column_names]
        for column, transform in new:
            column_type = schema.find_type(column)
            if not parse_transform(transform).can_transform(column_type):
                takes = [name for name, example in TRANSFORMS.items()
                         if parse_transform(example).can_transform(column_type)]
                raise ValueError(
                    f"iceberg sink of table {self.config.table}: partition_by field {column!r} "
                    f"has type {column_type} (as its first records gave it), which transform "
                    f"{transform} cannot take; cast the field upstream (a schema step) or use a "
                    f"transform for {column_type}: {', '.join(takes)}")
        if new:
            with transaction.update_spec() as update:
                for column, transform in new:
                    update.add_field(column, transform)

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        self._buffer.clear()  # the runtime flushed first: only a failed stage's rows remain

    def close(self) -> None:
        self._buffer.clear()
