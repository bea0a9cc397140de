"""PostgreSQL: the warehouse sink, exactly once.

Rows are bulk-loaded with COPY inside one transaction per flush; the consumed offsets go into
``offsets_table`` in that same transaction, so after a crash the runtime resumes each partition
exactly where the committed rows end. The table is created from the first records and gains a
column (ALTER TABLE ADD COLUMN) when a new field appears, up to PostgreSQL's 1,600 columns (the
records of fields beyond them are dead-lettered). Every identifier is quoted; a field
whose name cannot be a column (empty, with a control character, longer than PostgreSQL's 63
bytes) gets a column named by the rule in :mod:`connectors.sinks.warehouse`. With a lineage
manifest (docs/lineage.md), each commit adds a row to ``lineage_table`` in its transaction.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from pydantic import Field

from connectors.sinks.warehouse import (
    JSON,
    ColumnType,
    Naming,
    WarehouseConfig,
    conform,
)
from streamflow.plugins import ComponentContext, Sink, TransientError
from streamflow.transport.base import TopicPartition

# PostgreSQL's names for the Arrow types a JSON batch can hold, and back.
_SQL_TYPES = {"int": "bigint", "float": "double precision", "bool": "boolean", "string": "text",
              "date": "date", "timestamp": "timestamp", "timestamptz": "timestamptz",
              JSON: "jsonb"}
_ARROW_TYPES: dict[str, ColumnType] = {
    "bigint": pa.int64(), "integer": pa.int32(), "smallint": pa.int16(),
    "double precision": pa.float64(), "real": pa.float32(), "boolean": pa.bool_(),
    "text": pa.string(), "character varying": pa.string(), "character": pa.string(),
    "date": pa.date32(), "timestamp without time zone": pa.timestamp("us"),
    "timestamp with time zone": pa.timestamp("us", "UTC"), "json": JSON, "jsonb": JSON,
}
Stored = tuple[str, int]  # a partition's row in the offsets table: cluster id, next offset

# The server answered but refuses this connection for good (wrong credentials, database or
# role, pg_hba.conf); other connection failures (refused, timeout, starting up) are retried.
_FATAL_CONNECTION_ERRORS = ("does not exist", "authentication failed", "no pg_hba.conf entry",
                            "permission denied")
# Quoted identifiers keep their case; longer ones than 63 bytes would be cut (NAMEDATALEN - 1).
NAMING = Naming("PostgreSQL", max_bytes=63)
# A table's columns, dropped ones included (MaxHeapAttributeNumber).
MAX_COLUMNS = 1600


class PostgresConfig(WarehouseConfig):
    dsn: str = Field(
        "postgresql://postgres@127.0.0.1:5432/postgres",
        description="libpq connection URI or key=value string (password via PGPASSWORD or ${VAR})",
    )
    db_schema: str = Field("public", alias="schema", description="schema of the tables")
    connect_timeout_s: int = Field(10, ge=1, description="seconds to wait for a connection")


def sql_type(kind: pa.DataType | Literal["json"]) -> str:
    """PostgreSQL's type for a new column of Arrow type ``kind``."""
    if kind == JSON:
        return _SQL_TYPES[JSON]
    assert isinstance(kind, pa.DataType)
    if pa.types.is_timestamp(kind):
        return _SQL_TYPES["timestamptz" if kind.tz else "timestamp"]
    for name, test in (("int", pa.types.is_integer), ("float", pa.types.is_floating),
                       ("bool", pa.types.is_boolean), ("date", pa.types.is_date)):
        if test(kind):
            return _SQL_TYPES[name]
    if pa.types.is_decimal(kind):
        return "numeric"
    return _SQL_TYPES["string"]


def csv_bytes(table: pa.Table) -> bytes:
    """``table`` as headerless CSV for COPY: nulls unquoted and empty, strings quoted."""
    sink = io.BytesIO()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False))
    return sink.getvalue()


class PostgresSink(Sink[PostgresConfig]):
    """Writes records to a PostgreSQL table exactly once: append or upsert, new fields become columns.

    Rows are COPied into one open transaction; :meth:`flush` adds the offsets and commits.
    """

    config_model = PostgresConfig

    def __init__(self, config: PostgresConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        params = conninfo_to_dict(config.dsn)
        self.address = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        self.connection: psycopg.Connection | None = None
        self.columns: dict[str, ColumnType] = {}
        self.attributes = 0  # the table's columns, dropped ones included: MAX_COLUMNS at most
        self.table_exists = False
        self._bytes = 0
        # Per partition, the stored (cluster id, next offset) this sink last read or wrote.
        self._expected: dict[TopicPartition, Stored | None] = {}
        self._table = sql.Identifier(config.db_schema, config.table)
        self.keys = [NAMING.column(key) for key in config.keys]
        self._offsets = sql.Identifier(config.db_schema, config.offsets_table)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Database failures as clear errors: transient ones as :class:`TransientError`."""
        try:
            yield
        except psycopg.OperationalError as exc:
            message = f"PostgreSQL at {self.address}: {str(exc).strip()}"
            if any(reason in str(exc) for reason in _FATAL_CONNECTION_ERRORS):
                raise RuntimeError(f"{message} (check the sink's dsn)") from exc
            raise TransientError(message) from exc
        except psycopg.errors.InsufficientPrivilege as exc:
            raise RuntimeError(f"PostgreSQL at {self.address}: {exc}") from exc
        except psycopg.errors.InvalidColumnReference as exc:  # ON CONFLICT without a key
            raise RuntimeError(
                f"PostgreSQL at {self.address}: mode upsert needs a primary key or unique "
                f"constraint on {self.config.keys} in table {self.config.table!r} ({exc})"
            ) from exc

    def open(self) -> None:
        with self._errors():
            self.connection = psycopg.connect(self.config.dsn,
                                              connect_timeout=self.config.connect_timeout_s)
            self._create_offsets_table()
            with self.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = %s",
                    (self.config.db_schema, self.config.table),
                )
                found = cursor.fetchall()
                cursor.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = "
                               "to_regclass(%s) AND attnum > 0",
                               (sql.Identifier(self.config.db_schema, self.config.table)
                                .as_string(self.connection),))
                self.attributes = cursor.fetchone()[0]  # type: ignore[index]
            self.connection.commit()
        self.table_exists = bool(found)
        self.columns = {name: _ARROW_TYPES.get(kind) for name, kind in found}

    def _create_offsets_table(self) -> None:
        assert self.connection is not None
        try:
            self.connection.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (pipeline text, sink text, topic text, "
                "partition integer, cluster_id text, next_offset bigint NOT NULL, "
                "PRIMARY KEY (pipeline, sink, topic, partition))"
            ).format(self._offsets))
            self.connection.commit()
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            self.connection.rollback()  # another sink created it at the same moment

    def _stored(self, cursor: psycopg.Cursor[Any],
                locking: Sequence[TopicPartition] = ()) -> dict[TopicPartition, Stored]:
        """This sink's rows of the offsets table; with ``locking``, only those partitions' rows,
        locked until the transaction ends."""
        query = "SELECT topic, partition, cluster_id, next_offset FROM {} WHERE pipeline = %s " \
                "AND sink = %s"
        params: list[Any] = [self.context.pipeline, self.context.name]
        if locking:
            query += " AND topic = ANY(%s) AND partition = ANY(%s) FOR UPDATE"
            params += [sorted({topic for topic, _ in locking}), sorted({p for _, p in locking})]
        cursor.execute(sql.SQL(query).format(self._offsets), params)
        return {(topic, partition): (cluster, offset) for topic, partition, cluster, offset in cursor}

    def resume_offsets(
        self, partitions: Sequence[TopicPartition], cluster_id: str
    ) -> dict[TopicPartition, int]:
        assert self.connection is not None
        with self._errors(), self.connection.cursor() as cursor:
            stored = self._stored(cursor)
        for partition in partitions:
            self._expected[partition] = stored.get(partition)
        return {partition: offset for partition, (cluster, offset) in stored.items()
                if partition in partitions and cluster == cluster_id}

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        assert self.connection is not None
        conformed = conform(table, self.columns, self.keys, NAMING,
                            room=MAX_COLUMNS - self.attributes)
        with self._errors():
            if self.connection.info.transaction_status == TransactionStatus.IDLE:
                # Open the flush's transaction now, so that the savepoints of _load nest in it.
                self.connection.execute("SELECT 1")
            if conformed.new_columns:
                self._add_columns(conformed.new_columns)
            rows = conformed.good_rows()
            if rows.num_rows:
                conformed.failures.update(self._load(rows, conformed.sequence))
        conformed.raise_failures()

    def _add_columns(self, new_columns: Mapping[str, pa.DataType | Literal["json"]]) -> None:
        assert self.connection is not None
        definitions = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(sql_type(kind)))
            for name, kind in new_columns.items()
        )
        with self.connection.cursor() as cursor:
            if not self.table_exists:
                keys = sql.SQL("")
                if self.keys:
                    keys = sql.SQL(", PRIMARY KEY ({})").format(
                        sql.SQL(", ").join(map(sql.Identifier, self.keys)))
                cursor.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}{})").format(
                    self._table, definitions, keys))
                self.table_exists = True
            else:
                cursor.execute(sql.SQL("ALTER TABLE {} {}").format(self._table, sql.SQL(", ").join(
                    sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(
                        sql.Identifier(name), sql.SQL(sql_type(kind)))
                    for name, kind in new_columns.items()
                )))
        self.columns.update(new_columns)
        self.attributes += len(new_columns)

    def _load(self, rows: pa.Table, sequence: str) -> dict[int, BaseException]:
        """Load ``rows``; those the database rejects are found by halving and returned by their
        row order (column ``sequence``). Each attempt runs under a savepoint, so a rejection
        undoes only itself."""
        assert self.connection is not None
        try:
            with self.connection.transaction():
                self._copy(rows, sequence)
            return {}
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError,
                psycopg.errors.ProgramLimitExceeded) as exc:  # e.g. a row over 8 kB of columns
            if rows.num_rows == 1:
                return {rows.column(sequence)[0].as_py(): ValueError(
                    f"PostgreSQL rejected the record: {str(exc).strip()}")}
        middle = rows.num_rows // 2
        return {**self._load(rows.slice(0, middle), sequence),
                **self._load(rows.slice(middle), sequence)}

    def _copy(self, rows: pa.Table, sequence: str) -> None:
        assert self.connection is not None
        names = [name for name in rows.column_names if name != sequence]
        columns = sql.SQL(", ").join(map(sql.Identifier, names))
        with self.connection.cursor() as cursor:
            if self.config.mode == "append":
                payload = csv_bytes(rows.select(names))
                with cursor.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
                        self._table, columns)) as copy:
                    copy.write(payload)
            else:
                payload = csv_bytes(rows)
                staging = sql.Identifier("sf_upsert_staging")
                cursor.execute(sql.SQL(
                    "CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA"
                ).format(staging, columns, self._table))
                cursor.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint").format(
                    staging, sql.Identifier(sequence)))
                with cursor.copy(sql.SQL("COPY {} ({}, {}) FROM STDIN (FORMAT csv)").format(
                        staging, columns, sql.Identifier(sequence))) as copy:
                    copy.write(payload)
                keys = sql.SQL(", ").join(map(sql.Identifier, self.keys))
                updates = [name for name in names if name not in self.keys]
                action = sql.SQL("DO NOTHING") if not updates else sql.SQL(
                    "DO UPDATE SET {}").format(sql.SQL(", ").join(
                        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name))
                        for name in updates))
                cursor.execute(sql.SQL(
                    "INSERT INTO {table} ({columns}) SELECT DISTINCT ON ({keys}) {columns} "
                    "FROM {staging} ORDER BY {keys}, {seq} DESC ON CONFLICT ({keys}) {action}"
                ).format(table=self._table, columns=columns, keys=keys, staging=staging,
                         seq=sql.Identifier(sequence), action=action))
                cursor.execute(sql.SQL("DROP TABLE {}").format(staging))
        self._bytes += len(payload)

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        """Store ``offsets`` and commit, unless another writer moved them since this sink read
        them (a replica that took the partitions over): then roll back, to be replayed."""
        assert self.connection is not None
        with self._errors():
            with self.connection.cursor() as cursor:
                stored = self._stored(cursor, locking=list(offsets))
                moved = [p for p in offsets if stored.get(p) != self._expected.get(p)]
                if moved:
                    self.connection.rollback()
                    raise TransientError(
                        f"PostgreSQL at {self.address}: the offsets of {moved} in "
                        f"{self.config.offsets_table} were moved by another writer; replaying"
                    )
                cursor.executemany(sql.SQL(
                    "INSERT INTO {} (pipeline, sink, topic, partition, cluster_id, next_offset) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (pipeline, sink, topic, partition) "
                    "DO UPDATE SET cluster_id = EXCLUDED.cluster_id, "
                    "next_offset = EXCLUDED.next_offset"
                ).format(self._offsets), [
                    (self.context.pipeline, self.context.name, topic, partition, cluster_id, offset)
                    for (topic, partition), offset in offsets.items()
                ])
                if self.lineage_manifest is not None:
                    self._store_manifest(cursor, self.lineage_manifest)
            self.connection.commit()
        self._expected.update({partition: (cluster_id, offset)
                               for partition, offset in offsets.items()})
        written, self._bytes = self._bytes, 0
        return written

    def _store_manifest(self, cursor: psycopg.Cursor[Any], manifest: Mapping[str, Any]) -> None:
        """Add ``manifest`` to the lineage table (created if missing), in the open transaction."""
        assert self.connection is not None
        lineage = sql.Identifier(self.config.db_schema, self.config.lineage_table)
        try:
            with self.connection.transaction():  # a savepoint: another sink may create it too
                cursor.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (pipeline text, sink text, table_name text, "
                    "commit_id text PRIMARY KEY, committed_at timestamptz, rows bigint, "
                    "config_hash text, manifest jsonb NOT NULL)").format(lineage))
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            pass
        cursor.execute(sql.SQL(
            "INSERT INTO {} (pipeline, sink, table_name, commit_id, committed_at, rows, "
            "config_hash, manifest) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(lineage), (
            self.context.pipeline, self.context.name, self.config.table, manifest["commit_id"],
            datetime.fromisoformat(manifest["committed_at"]), manifest["rows"],
            manifest["config_hash"], json.dumps(manifest)))

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            self._expected.pop(partition, None)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()  # an unflushed transaction is rolled back
            self.connection = None
