"""What the PostgreSQL and DuckDB sinks share: their settings, and fitting a batch to a table.

A batch decoded from JSON has inferred Arrow types. :func:`conform` casts each column to the type
of the table's existing column (rows whose value does not fit become failures, to be
dead-lettered), turns nested values into JSON text, and lists the columns the table lacks with
the Arrow type to create them from. Each sink maps those types to its own SQL names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

JSON: Literal["json"] = "json"
# What a column holds, for conforming: an Arrow type, JSON text, or None for a database type
# Arrow has no equivalent of (values go as text and the database converts them).
ColumnType = pa.DataType | Literal["json"] | None

SEQUENCE_COLUMN = "_sf_seq"  # the row order within a write, to keep the last row of a key


class WarehouseConfig(BaseModel):
    """Settings common to the table sinks."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    table: str = Field(min_length=1, description="target table, created from the first records")
    mode: Literal["append", "upsert"] = Field(
        "append", description="append every record, or upsert: replace the row with the same keys"
    )
    keys: list[str] = Field(default_factory=list, description="key columns (mode upsert only)")
    offsets_table: str = Field(
        "streamflow_offsets",
        description="table holding the consumed offsets, written in the same transaction as rows",
    )

    @model_validator(mode="after")
    def _keys_match_mode(self) -> WarehouseConfig:
        if self.mode == "upsert" and not self.keys:
            raise ValueError("mode 'upsert' needs keys: the columns that identify a row")
        if self.mode == "append" and self.keys:
            raise ValueError("keys apply only to mode 'upsert'; remove them or set mode: upsert")
        return self


class ColumnTypeError(ValueError):
    """A value does not fit the type of its table column."""


class MissingKeyError(ValueError):
    """An upserted record has no value for a key column."""


@dataclass
class Conformed:
    """A batch fitted to a table: rows in ``failures`` (index → error) must not be written."""

    table: pa.Table
    new_columns: dict[str, pa.DataType | Literal["json"]] = field(default_factory=dict)
    failures: dict[int, BaseException] = field(default_factory=dict)

    def good_rows(self) -> pa.Table:
        """The table without the failed rows, with a ``_sf_seq`` column of row order."""
        keep = np.ones(self.table.num_rows, dtype=bool)
        keep[list(self.failures)] = False
        numbered = self.table.append_column(
            SEQUENCE_COLUMN, pa.array(np.arange(self.table.num_rows, dtype=np.int64))
        )
        return numbered.filter(pa.array(keep))


def is_nested(kind: pa.DataType) -> bool:
    return pa.types.is_nested(kind) or pa.types.is_dictionary(kind)


def json_text(column: pa.ChunkedArray) -> pa.Array:
    """Each value as JSON text; nulls stay null."""
    return pa.array(
        [None if value is None else json.dumps(value, default=str) for value in column.to_pylist()],
        pa.string(),
    )


def new_column_type(kind: pa.DataType) -> pa.DataType | Literal["json"]:
    """The type a new column gets for values of Arrow type ``kind``."""
    if is_nested(kind):
        return JSON
    if pa.types.is_timestamp(kind):
        return pa.timestamp("us", kind.tz)
    return kind


def _cast(column: pa.ChunkedArray, target: pa.DataType, name: str,
          failures: dict[int, BaseException]) -> pa.ChunkedArray:
    """``column`` as ``target``; values that do not fit are recorded in ``failures`` and nulled."""
    if column.type == target:
        return column
    if is_nested(column.type) and pa.types.is_string(target):
        return pa.chunked_array([json_text(column)])
    try:
        return pc.cast(column, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    misfits = np.zeros(len(column), dtype=bool)
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for index in range(len(values)):
        try:
            pc.cast(values.slice(index, 1), target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            misfits[index] = True
            failures.setdefault(index, ColumnTypeError(
                f"field {name!r}: {values[index].as_py()!r} does not fit column type {target}"
            ))
    return pc.cast(pc.if_else(pa.array(misfits), pa.nulls(len(values), values.type), values), target)


def conform(table: pa.Table, columns: dict[str, ColumnType], keys: list[str]) -> Conformed:
    """Fit ``table`` to a table whose existing ``columns`` have the given types.

    Columns the table lacks are listed in ``new_columns`` (all-null ones are left out: their type
    is unknown). Rows without a value for one of ``keys`` fail.
    """
    result = Conformed(table)
    names, arrays = [], []
    for name in table.column_names:
        column = table.column(name)
        if name in columns:
            target = columns[name]
        elif pa.types.is_null(column.type):
            continue
        else:
            target = result.new_columns[name] = new_column_type(column.type)
        if target == JSON:
            column = pa.chunked_array([json_text(column)])
        elif target is None:  # converted by the database
            column = (pa.chunked_array([json_text(column)]) if is_nested(column.type)
                      else pc.cast(column, pa.string()))
        else:
            column = _cast(column, target, name, result.failures)
        names.append(name)
        arrays.append(column)
    if not names:  # nothing but empty or all-null fields: no row to insert
        result.failures = {row: ColumnTypeError("the record has no field with a value to write")
                           for row in range(table.num_rows)}
        return result
    result.table = pa.table(arrays, names=names)
    for key in keys:
        missing = (np.ones(table.num_rows, dtype=bool) if key not in result.table.column_names
                   else result.table.column(key).is_null().to_numpy(zero_copy_only=False))
        for index in np.flatnonzero(missing):
            result.failures.setdefault(int(index), MissingKeyError(f"key field {key!r} is missing"))
    return result
