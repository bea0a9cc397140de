"""DuckDB: an embedded warehouse in one file, exactly once, for users without a database server.

The same semantics as the PostgreSQL sink: the table is created from the first records and gains
columns as new fields appear; ``append`` or ``upsert`` on key columns; the consumed offsets are
stored in ``offsets_table`` in the transaction that inserts the rows. DuckDB allows one writing
process per file: give each pipeline (or each replica) its own file. DuckDB ignores the case of
ASCII letters in column names: a field whose column differs from another only that way has
its records dead-lettered (column names: :mod:`connectors.sinks.warehouse`). With a lineage
manifest (docs/lineage.md), each commit adds a row to ``lineage_table`` in its transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
from pydantic import Field

from connectors.sinks.warehouse import (
    JSON,
    ColumnType,
    ColumnTypeError,
    Naming,
    WarehouseConfig,
    ascii_lower,
    conform,
)
from streamflow.plugins import ComponentContext, Sink
from streamflow.transport.base import TopicPartition

_ARROW_TYPES: dict[str, ColumnType] = {
    "BIGINT": pa.int64(), "INTEGER": pa.int32(), "SMALLINT": pa.int16(), "TINYINT": pa.int8(),
    "DOUBLE": pa.float64(), "FLOAT": pa.float32(), "BOOLEAN": pa.bool_(), "VARCHAR": pa.string(),
    "DATE": pa.date32(), "TIMESTAMP": pa.timestamp("us"),
    "TIMESTAMP WITH TIME ZONE": pa.timestamp("us", "UTC"), "JSON": JSON,
}
NAMING = Naming("DuckDB", fold=ascii_lower)


class DuckDBConfig(WarehouseConfig):
    path: str = Field(description="database file, created if missing")


def quote(identifier: str) -> str:
    """``identifier`` as a quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def sql_type(kind: pa.DataType | Literal["json"]) -> str:
    """DuckDB's type for a new column of Arrow type ``kind``."""
    if kind == JSON:
        return "JSON"
    assert isinstance(kind, pa.DataType)
    if pa.types.is_timestamp(kind):
        return "TIMESTAMP WITH TIME ZONE" if kind.tz else "TIMESTAMP"
    for name, test in (("BIGINT", pa.types.is_integer), ("DOUBLE", pa.types.is_floating),
                       ("BOOLEAN", pa.types.is_boolean), ("DATE", pa.types.is_date)):
        if test(kind):
            return name
    return "VARCHAR"


class DuckDBSink(Sink[DuckDBConfig]):
    """Writes records to a table in a DuckDB file exactly once: append or upsert, new fields become
    columns. Rows go into one open transaction; :meth:`flush` adds the offsets and commits.
    """

    config_model = DuckDBConfig

    def __init__(self, config: DuckDBConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.connection: duckdb.DuckDBPyConnection | None = None
        self.columns: dict[str, ColumnType] = {}
        self.table_exists = False
        self._in_transaction = False
        self._table = quote(config.table)
        self._offsets = quote(config.offsets_table)
        self.keys = [NAMING.column(key) for key in config.keys]

    def open(self) -> None:
        Path(self.config.path).parent.mkdir(parents=True, exist_ok=True)
        self.connection = duckdb.connect(self.config.path)
        self.connection.execute(
            f"CREATE TABLE IF NOT EXISTS {self._offsets} (pipeline VARCHAR, sink VARCHAR, "
            "topic VARCHAR, partition INTEGER, cluster_id VARCHAR, next_offset BIGINT NOT NULL, "
            "PRIMARY KEY (pipeline, sink, topic, partition))"
        )
        found = self.connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?", [self.config.table]
        ).fetchall()
        self.table_exists = bool(found)
        self.columns = {name: _ARROW_TYPES.get(kind) for name, kind in found}

    def resume_offsets(
        self, partitions: Sequence[TopicPartition], cluster_id: str
    ) -> dict[TopicPartition, int]:
        assert self.connection is not None
        rows = self.connection.execute(
            f"SELECT topic, partition, next_offset FROM {self._offsets} "
            "WHERE pipeline = ? AND sink = ? AND cluster_id = ?",
            [self.context.pipeline, self.context.name, cluster_id],
        ).fetchall()
        stored = {(topic, partition): offset for topic, partition, offset in rows}
        return {partition: stored[partition] for partition in partitions if partition in stored}

    def _begin(self) -> duckdb.DuckDBPyConnection:
        assert self.connection is not None
        if not self._in_transaction:
            self.connection.begin()
            self._in_transaction = True
        return self.connection

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        conformed = conform(table, self.columns, self.keys, NAMING)
        connection = self._begin()
        if conformed.new_columns:
            self._add_columns(connection, conformed.new_columns)
        rows, sequence = conformed.good_rows(), conformed.sequence
        if rows.num_rows:
            conformed.failures.update(self._unconvertible(connection, rows, sequence))
            keep = ~np.isin(rows.column(sequence).to_numpy(), list(conformed.failures))
            self._insert(connection, rows.filter(pa.array(keep)), sequence)
        conformed.raise_failures()

    def _add_columns(self, connection: duckdb.DuckDBPyConnection,
                     new_columns: Mapping[str, pa.DataType | Literal["json"]]) -> None:
        if not self.table_exists:
            definitions = [f"{quote(name)} {sql_type(kind)}" for name, kind in new_columns.items()]
            connection.execute(f"CREATE TABLE IF NOT EXISTS {self._table} ({', '.join(definitions)})")
            self.table_exists = True
        else:
            for name, kind in new_columns.items():
                connection.execute(f"ALTER TABLE {self._table} ADD COLUMN IF NOT EXISTS "
                                   f"{quote(name)} {sql_type(kind)}")
        self.columns.update(new_columns)

    def _unconvertible(self, connection: duckdb.DuckDBPyConnection, rows: pa.Table,
                       sequence: str) -> dict[int, BaseException]:
        """Rows (by their ``sequence``) whose text values DuckDB cannot convert to a column type
        Arrow does not know (an error inside the transaction would abort it, so they are found
        beforehand)."""
        failures: dict[int, BaseException] = {}
        unknown = [name for name in rows.column_names
                   if name in self.columns and self.columns[name] is None]
        if not unknown:
            return failures
        kinds = dict(connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?", [self.config.table]
        ).fetchall())
        for name in unknown:
            view = f"sf_check_{uuid.uuid4().hex}"
            connection.register(view, rows.select([name, sequence]))
            try:
                bad = connection.execute(
                    f"SELECT {quote(sequence)}, {quote(name)} FROM {view} WHERE "
                    f"{quote(name)} IS NOT NULL AND TRY_CAST({quote(name)} AS {kinds[name]}) IS NULL"
                ).fetchall()
            finally:
                connection.unregister(view)
            for sequence, value in bad:
                failures.setdefault(sequence, ColumnTypeError(
                    f"field {name!r}: {value!r} does not fit column type {kinds[name]}"))
        return failures

    def _insert(self, connection: duckdb.DuckDBPyConnection, rows: pa.Table, sequence: str) -> None:
        names = [name for name in rows.column_names if name != sequence]
        columns = ", ".join(map(quote, names))
        view = f"sf_batch_{uuid.uuid4().hex}"
        connection.register(view, rows)
        try:
            if self.config.mode == "upsert":
                keys = ", ".join(map(quote, self.keys))
                same_key = " AND ".join(f"{self._table}.{quote(key)} = {view}.{quote(key)}"
                                        for key in self.keys)
                connection.execute(f"DELETE FROM {self._table} USING {view} WHERE {same_key}")
                connection.execute(
                    f"INSERT INTO {self._table} ({columns}) SELECT {columns} FROM {view} "
                    f"QUALIFY row_number() OVER (PARTITION BY {keys} "
                    f"ORDER BY {quote(sequence)} DESC) = 1"
                )
            else:
                connection.execute(
                    f"INSERT INTO {self._table} ({columns}) SELECT {columns} FROM {view}")
        finally:
            connection.unregister(view)

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> None:
        connection = self._begin()
        connection.executemany(
            f"INSERT INTO {self._offsets} (pipeline, sink, topic, partition, cluster_id, "
            "next_offset) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (pipeline, sink, topic, partition) "
            "DO UPDATE SET cluster_id = EXCLUDED.cluster_id, next_offset = EXCLUDED.next_offset",
            [[self.context.pipeline, self.context.name, topic, partition, cluster_id, offset]
             for (topic, partition), offset in offsets.items()],
        )
        if self.lineage_manifest is not None:
            self._store_manifest(connection, self.lineage_manifest)
        connection.commit()
        self._in_transaction = False

    def _store_manifest(self, connection: duckdb.DuckDBPyConnection,
                        manifest: Mapping[str, Any]) -> None:
        """Add ``manifest`` to the lineage table (created if missing), in the open transaction."""
        lineage = quote(self.config.lineage_table)
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {lineage} (pipeline VARCHAR, sink VARCHAR, "
            "table_name VARCHAR, commit_id VARCHAR PRIMARY KEY, committed_at TIMESTAMPTZ, "
            "rows BIGINT, config_hash VARCHAR, manifest JSON NOT NULL)")
        connection.execute(
            f"INSERT INTO {lineage} VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [self.context.pipeline, self.context.name, self.config.table, manifest["commit_id"],
             datetime.fromisoformat(manifest["committed_at"]), manifest["rows"],
             manifest["config_hash"], json.dumps(manifest)])

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()  # an unflushed transaction is rolled back
            self.connection = None
