"""PostgreSQL: incremental polling of a table or query by an increasing tracking column.

Each poll reads rows past the high-water mark, ordered by ``(tracking_column, tie_breaker)``:
``WHERE (tracking_column, tie_breaker) > (last value, last tie-breaker) ORDER BY ... LIMIT n``.
The position is that pair, checkpointed after Kafka acknowledged the rows, so a restart resumes
right after the last row emitted. With a unique tie-breaker (the primary key) rows sharing a
tracking value across a poll boundary are neither skipped nor repeated; without one the
tracking column itself must be unique and increasing (``WHERE col > last``).

Rows must become visible in tracking order: a row committed later with a smaller value than the
high-water mark is never read (use a sequence or a commit-time column written by one writer).
Values become JSON: timestamps and dates ISO 8601, numerics float (or string), bytes base64,
UUIDs strings, intervals seconds.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.sources.records import encode_record, record_key
from streamflow.plugins import ComponentContext, Source, SourceBatch, TransientError


class PostgresConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dsn: str = Field(
        "host=127.0.0.1 port=5432 dbname=postgres user=postgres",
        description="libpq connection string or postgresql:// URL (a password here is masked in logs)",
    )
    table: str | None = Field(None, description="table to poll, optionally schema-qualified (schema.table)")
    query: str | None = Field(None, description="a SELECT to poll instead of a table (no ORDER BY/LIMIT)")
    tracking_column: str = Field(description="increasing column: a serial id or a commit timestamp")
    tie_breaker: str | None = Field(
        None, description="unique column (the primary key) ordering rows with equal tracking values"
    )
    start_after: Any = Field(None, description="initial high-water mark; rows at or below it are skipped")
    poll_interval_s: float = Field(1.0, gt=0, description="pause after a poll that found nothing new")
    key_field: str | None = Field(None, description="column whose value becomes the record key")
    decimals: Literal["float", "string"] = Field("float", description="how NUMERIC values are emitted")
    connect_timeout_s: int = Field(5, ge=1, description="give up connecting after this many seconds")

    @model_validator(mode="after")
    def _table_or_query(self) -> PostgresConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of table (a table name) or query (a SELECT)")
        return self


def to_json_value(value: Any, decimals: str = "float") -> Any:
    """A value from psycopg as JSON-able data."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value) if decimals == "string" or not value.is_finite() else float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [to_json_value(item, decimals) for item in value]
    if isinstance(value, dict):
        return {str(k): to_json_value(v, decimals) for k, v in value.items()}
    return value


def quote_identifier(name: str) -> str:
    """``schema.table`` or ``column`` as quoted SQL identifiers."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def address_of(dsn: str) -> str:
    """host:port of a connection string, for error messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "(unparseable dsn)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}"


class PostgresSource(Source[PostgresConfig]):
    """Emits each new row of a table or query as a JSON object."""

    config_model = PostgresConfig

    def __init__(self, config: PostgresConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._connection: Any = None
        self._mark: Any = config.start_after
        self._tie: Any = None
        self._next_query_at = 0.0

    def open(self, position: dict[str, Any] | None) -> None:
        if position is not None:
            self._mark, self._tie = position["value"], position.get("tie")
        self._connect()

    def _connect(self) -> None:
        import psycopg

        try:
            self._connection = psycopg.connect(self.config.dsn, autocommit=True,
                                               connect_timeout=self.config.connect_timeout_s)
        except psycopg.OperationalError as exc:
            raise TransientError(
                f"PostgreSQL at {address_of(self.config.dsn)} is unreachable: {exc}".strip()
            ) from None

    def _statement(self) -> tuple[str, list[Any]]:
        column = quote_identifier(self.config.tracking_column)
        relation = (f"({self.config.query}) AS polled" if self.config.query
                    else quote_identifier(self.config.table or ""))
        order = [column]
        where, params = "", []
        if self.config.tie_breaker:
            tie = quote_identifier(self.config.tie_breaker)
            order.append(tie)
            if self._mark is not None and self._tie is not None:
                where, params = f" WHERE ({column}, {tie}) > (%s, %s)", [self._mark, self._tie]
            elif self._mark is not None:  # start_after: a value alone
                where, params = f" WHERE {column} > %s", [self._mark]
        elif self._mark is not None:
            where, params = f" WHERE {column} > %s", [self._mark]
        return f"SELECT * FROM {relation}{where} ORDER BY {', '.join(order)} LIMIT %s", params

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        import psycopg

        wait = self._next_query_at - time.monotonic()
        if wait > 0:
            time.sleep(min(timeout_s, wait))
            return SourceBatch([])
        if self._connection is None or self._connection.closed:
            self._connect()
        statement, params = self._statement()
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(statement, [*params, max_records])
                names = [column.name for column in cursor.description or []]
                rows = cursor.fetchall()
        except psycopg.OperationalError as exc:
            self._connection.close()
            raise TransientError(
                f"PostgreSQL at {address_of(self.config.dsn)} failed: {exc}".strip()
            ) from None
        if not rows:
            self._next_query_at = time.monotonic() + self.config.poll_interval_s
            return SourceBatch([])
        values, keys = [], []
        tracking, tie = self.config.tracking_column.split(".")[-1], self.config.tie_breaker
        for row in rows:
            document = {name: to_json_value(value, self.config.decimals)
                        for name, value in zip(names, row, strict=True)}
            values.append(encode_record(document))
            keys.append(record_key(document, self.config.key_field))
        last = dict(zip(names, rows[-1], strict=True))
        self._mark = to_json_value(last[tracking], "string")
        self._tie = to_json_value(last[tie.split(".")[-1]], "string") if tie else None
        return SourceBatch(values, keys)

    def position(self) -> dict[str, Any]:
        return {"value": self._mark, "tie": self._tie}

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
