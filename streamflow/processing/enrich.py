"""The ``enrich`` step: join fields from a lookup table (CSV, Parquet or a PostgreSQL query) by
key, reloading it every ``refresh_s``."""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamflow.plugins import ComponentContext, Processor, StepResult, TransientError

log = logging.getLogger(__name__)


class EnrichConfig(BaseModel):
    """Settings of an ``enrich`` step."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["csv", "parquet", "postgres"] = Field(description="where the lookup table is")
    path: str | None = Field(None, description="csv, parquet: the file")
    dsn: str | None = Field(None, description="postgres: e.g. postgresql://user@host:5432/db")
    query: str | None = Field(None, description="postgres: the SELECT returning the table")
    key: str = Field(description="record field matched against the lookup table")
    lookup_key: str | None = Field(None, description="the lookup table's key column (default: key)")
    fields: list[str] | None = Field(
        None, min_length=1, description="columns to add (default: all but the key column)"
    )
    refresh_s: float | None = Field(None, gt=0, description="reload the table this often")
    on_miss: Literal["keep", "null", "fail"] = Field(
        "null", description="no matching row: keep the record's own values of the fields, "
        "set them null, or fail the record"
    )

    @model_validator(mode="after")
    def _source_settings(self) -> EnrichConfig:
        if self.source == "postgres" and (self.dsn is None or self.query is None):
            raise ValueError("source: postgres needs 'dsn' and 'query'")
        if self.source != "postgres" and self.path is None:
            raise ValueError(f"source: {self.source} needs 'path' (the {self.source} file)")
        return self


class EnrichMissError(LookupError):
    """A record's key is not in the lookup table (with ``on_miss: fail``)."""


def load_lookup(config: EnrichConfig) -> pa.Table:
    """The lookup table as configured; an unreachable database raises TransientError."""
    if config.source == "csv":
        return pa_csv.read_csv(config.path)
    if config.source == "parquet":
        return pq.read_table(config.path)
    return _postgres(config.dsn or "", config.query or "")


def _postgres(dsn: str, query: str) -> pa.Table:
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ImportError(
            "enrich source postgres needs psycopg: pip install 'streamflow[postgres]'") from None
    info = conninfo_to_dict(dsn)
    address = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
    try:
        with psycopg.connect(dsn, connect_timeout=5) as connection:
            cursor = connection.execute(query)
            names = [column.name for column in cursor.description or []]
            rows = cursor.fetchall()
    except psycopg.OperationalError as exc:
        raise TransientError(f"enrich: PostgreSQL at {address} is unreachable: {exc}") from exc
    return pa.table({name: pa.array([row[i] for row in rows]) for i, name in enumerate(names)})


class EnrichStep(Processor[EnrichConfig]):
    """Adds the lookup table's ``fields`` to each record whose ``key`` it holds (the first row of
    a repeated key wins). A failed reload keeps the previous table and retries later."""

    name = "enrich"
    config_model = EnrichConfig

    def __init__(self, config: EnrichConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.lookup_key = config.lookup_key or config.key
        self._install(load_lookup(config))

    def _install(self, table: pa.Table) -> None:
        if self.lookup_key not in table.column_names:
            raise ValueError(f"enrich: the lookup table has no key column {self.lookup_key!r} "
                             f"(columns: {', '.join(table.column_names)})")
        fields = self.config.fields or [n for n in table.column_names if n != self.lookup_key]
        missing = [name for name in fields if name not in table.column_names]
        if missing:
            raise ValueError(f"enrich: the lookup table has no columns {missing}")
        self.keys = table.column(self.lookup_key).combine_chunks()
        self.values = table.select(fields)
        self.loaded_at = time.monotonic()

    def _refresh(self) -> None:
        refresh_s = self.config.refresh_s
        if refresh_s is None or time.monotonic() - self.loaded_at < refresh_s:
            return
        try:
            self._install(load_lookup(self.config))
        except Exception:
            self.loaded_at = time.monotonic()  # retry after another refresh_s
            log.exception("stage %s: reloading the enrich table failed; keeping the previous one",
                          self.context.name)

    def process(self, table: pa.Table) -> StepResult:
        self._refresh()
        if self.config.key not in table.column_names:
            record_keys = pa.nulls(table.num_rows, self.keys.type)
        else:
            record_keys = table.column(self.config.key)
        positions = self._positions(record_keys)
        matched = pc.is_valid(positions)
        for name in self.values.column_names:
            found = self.values.column(name).take(positions)
            if self.config.on_miss == "keep" and name in table.column_names:
                own = table.column(name)
                try:
                    found = pc.if_else(matched, found, pc.cast(own, found.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise TypeError(f"enrich: field {name!r} ({own.type}) cannot keep its value "
                                    f"beside the lookup's {found.type}: {exc}") from None
            if name in table.column_names:
                table = table.set_column(table.schema.get_field_index(name), name, found)
            else:
                table = table.append_column(name, found)
        if self.config.on_miss != "fail":
            return StepResult(table)
        misses = pc.indices_nonzero(pc.invert(matched)).to_pylist()
        failures: list[tuple[int, BaseException]] = [(row, EnrichMissError(
            f"enrich: no row of the lookup table has {self.lookup_key} = "
            f"{record_keys[row].as_py()!r}")) for row in misses]
        keep = np.ones(table.num_rows, dtype=bool)
        keep[misses] = False
        return StepResult(table.filter(pa.array(keep)), failures)

    def _positions(self, record_keys: pa.ChunkedArray | pa.Array) -> pa.Array:
        """Row of the lookup table per record (null where the key is absent)."""
        keys = self.keys
        if record_keys.type != keys.type:
            try:
                record_keys = pc.cast(record_keys, keys.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                record_keys = pc.cast(record_keys, pa.string())
                keys = pc.cast(keys, pa.string())
        positions = pc.index_in(record_keys, value_set=keys)
        return positions.combine_chunks() if isinstance(positions, pa.ChunkedArray) else positions
