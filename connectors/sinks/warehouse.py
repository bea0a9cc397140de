"""What the table sinks (PostgreSQL, DuckDB, Delta) share: settings, column names, and fitting
a batch to a table.

A batch decoded from JSON has inferred Arrow types. :func:`conform` names each field's column,
casts each column to the type of the table's existing column (rows whose value does not fit
become failures, to be dead-lettered), turns nested values into JSON text, and lists the
columns the table lacks with the Arrow type to create them from. Each sink maps those types to
its own SQL names.

Column names (:class:`Naming`), one-to-one and deterministic. A field's column is the field name
itself, unless that name cannot be a column: empty, holding a control character (NUL included)
or an unpaired surrogate, longer than the database allows (PostgreSQL: 63 bytes of UTF-8), or
ending like a mapped name does (``~`` and 16 hexadecimal digits). Such a field's column is
``<prefix>~<digest>``: the name's other characters cut to at most 46 bytes, ``~``, and the first
16 hexadecimal digits of the SHA-256 of the name's UTF-8 (63 bytes at most in all). A name kept
as it is never ends like a mapped one, so two fields share a column only if their digests and
prefixes both agree (a 64-bit hash collision). Where the database ignores case in column names
(DuckDB: ASCII letters; Delta: all letters), a field whose column differs only in case from an
existing column, or from one an earlier field of the batch creates, is a different field that
cannot get a column: its records with a value there are dead-lettered (``ColumnNameError``).

The sinks' own column, the row order within a write (:attr:`Conformed.sequence`), takes a name
no column of the batch has, so a field named ``_sf_seq`` is ordinary data. Lineage columns
(:mod:`streamflow.runtime.row_lineage`), last in a batch, keep their names, which end like mapped
names: a field named like one is mapped by the rule above.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamflow.plugins import SinkRecordError
from streamflow.runtime.row_lineage import lineage_count

JSON: Literal["json"] = "json"
# What a column holds, for conforming: an Arrow type, JSON text, or None for a database type
# Arrow has no equivalent of (values go as text and the database converts them).
ColumnType = pa.DataType | Literal["json"] | None

SEQUENCE_COLUMN = "_sf_seq"  # the row order within a write, to keep the last row of a key
DIGEST_DIGITS = 16  # hexadecimal digits of SHA-256 in a mapped column name
MAPPED_BYTES = 63  # the longest mapped column name, in UTF-8 bytes
# Characters no column name keeps: control characters (NUL included) and unpaired surrogates.
_UNFIT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MAPPED = re.compile(rf"~[0-9a-fA-F]{{{DIGEST_DIGITS}}}\Z")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(name: str) -> str:
    """``name`` with its ASCII letters in lower case (how DuckDB compares column names)."""
    return name.translate(_ASCII_LOWER)


def mapped_name(name: str) -> str:
    """The column name of a field whose own name cannot be one: ``<prefix>~<digest>``."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_DIGITS]
    room = MAPPED_BYTES - 1 - DIGEST_DIGITS
    prefix = _UNFIT.sub("", name).encode()[:room].decode("utf-8", "ignore")
    return f"{prefix}~{digest}"


@dataclass(frozen=True)
class Naming:
    """A database's rules for column names (see the module docstring)."""

    database: str
    max_bytes: int | None = None  # the longest column name, in UTF-8 bytes
    fold: Callable[[str], str] | None = None  # names equal after it are one column

    def keeps(self, name: str) -> bool:
        """Whether field ``name`` is its own column name."""
        return bool(name) and not _UNFIT.search(name) and not _MAPPED.search(name) and (
            self.max_bytes is None or len(name.encode()) <= self.max_bytes)

    def column(self, name: str) -> str:
        """The column of field ``name``."""
        return name if self.keeps(name) else mapped_name(name)


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
    lineage_table: str = Field(
        "streamflow_lineage",
        description="with the sink's lineage_manifest: a row per commit, in its transaction",
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


class ColumnNameError(ValueError):
    """A field's column would differ only in case from another field's, where case is ignored."""


class ColumnLimitError(ValueError):
    """A field needs a new column, but the table has as many as the database allows."""


@dataclass
class Conformed:
    """A batch fitted to a table: rows in ``failures`` (index → error) must not be written."""

    table: pa.Table
    new_columns: dict[str, pa.DataType | Literal["json"]] = field(default_factory=dict)
    failures: dict[int, BaseException] = field(default_factory=dict)

    @property
    def sequence(self) -> str:
        """The name of the row-order column: ``_sf_seq``, with ``_`` appended while a column of
        the batch has it (in any case)."""
        taken = {name.lower() for name in self.table.column_names}
        name = SEQUENCE_COLUMN
        while name in taken:
            name += "_"
        return name

    def good_rows(self) -> pa.Table:
        """The table without the failed rows, with a last column of row order, :attr:`sequence`."""
        keep = np.ones(self.table.num_rows, dtype=bool)
        keep[list(self.failures)] = False
        numbered = self.table.append_column(
            self.sequence, pa.array(np.arange(self.table.num_rows, dtype=np.int64))
        )
        return numbered.filter(pa.array(keep))

    def raise_failures(self) -> None:
        """Raise :class:`SinkRecordError` for the failed rows, if there are any."""
        if self.failures:
            failed = sorted(self.failures)
            raise SinkRecordError(failed, [self.failures[row] for row in failed])


def apart_from_lineage(table: pa.Table) -> pa.Table:
    """For a sink that keeps field names as they are (Parquet, Kafka, console): ``table`` with
    the fields whose names end like a mapped name renamed by the rule (:func:`mapped_name`)
    when it has lineage columns, so that no field bears a lineage column's name."""
    own = lineage_count(table)
    if not own:
        return table
    fields = table.column_names[:table.num_columns - own]
    names = [mapped_name(name) if _MAPPED.search(name) else name for name in fields]
    if names == fields:
        return table
    return table.rename_columns([*names, *table.column_names[len(fields):]])


def buffer_conformed(buffer: list[pa.Table], table: pa.Table, columns: dict[str, ColumnType],
                     keys: list[str], naming: Naming) -> None:
    """Fit ``table`` to ``columns`` (adding its new ones, JSON held as text), append its good rows
    to ``buffer``, and raise :class:`SinkRecordError` for the rest: the write of a sink that
    commits its buffer at flush (Delta Lake, Iceberg)."""
    conformed = conform(table, columns, keys, naming)
    columns.update({name: pa.string() if kind == JSON else kind
                    for name, kind in conformed.new_columns.items()})
    rows = conformed.good_rows()
    if rows.num_rows:
        buffer.append(rows.drop_columns([conformed.sequence]))
    conformed.raise_failures()


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


def cast_values(column: pa.ChunkedArray, target: pa.DataType, name: str,
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


def _fail_values(column: pa.ChunkedArray, error: BaseException,
                 failures: dict[int, BaseException]) -> None:
    """Fail every row that has a value in ``column``."""
    for index in np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False)):
        failures.setdefault(int(index), error)


def conform(table: pa.Table, columns: dict[str, ColumnType], keys: list[str],
            naming: Naming | None = None, room: int | None = None) -> Conformed:
    """Fit ``table`` to a table whose existing ``columns`` have the given types.

    With ``naming``, fields are renamed to their columns, and a field whose column differs only
    in case from another one fails its rows that have a value. Columns the table lacks are
    listed in ``new_columns`` (all-null ones are left out: their type is unknown); with
    ``room``, at most that many, in field order, and the rows with a value in a field beyond
    them fail. Rows without a value for one of ``keys`` (column names) fail.
    """
    fields = dict(zip(table.column_names, table.column_names, strict=True))
    if naming is not None:
        own = table.num_columns - lineage_count(table)  # lineage columns keep their names
        fields = {naming.column(name) if index < own else name: name
                  for index, name in enumerate(table.column_names)}
        table = table.rename_columns(list(fields))
    fold = naming.fold if naming is not None else None
    owners = {fold(name): name for name in columns} if fold is not None else {}
    result = Conformed(table)
    names, arrays = [], []
    for name in table.column_names:
        column = table.column(name)
        if name in columns:
            target = columns[name]
        elif pa.types.is_null(column.type):
            continue
        else:
            if fold is not None and (owner := owners.setdefault(fold(name), name)) != name:
                assert naming is not None
                _fail_values(column, ColumnNameError(
                    f"field {fields[name]!r} has no column: {naming.database} ignores the case of "
                    f"column names, and column {owner!r} holds another field"), result.failures)
                continue
            if room is not None and len(result.new_columns) >= room:
                _fail_values(column, ColumnLimitError(
                    f"field {fields[name]!r} has no column: the table has as many columns as "
                    f"{naming.database if naming else 'the database'} allows"), result.failures)
                continue
            target = result.new_columns[name] = new_column_type(column.type)
        if target == JSON:
            column = pa.chunked_array([json_text(column)])
        elif target is None:  # converted by the database
            column = (pa.chunked_array([json_text(column)]) if is_nested(column.type)
                      else pc.cast(column, pa.string()))
        else:
            column = cast_values(column, target, fields[name], result.failures)
        names.append(name)
        arrays.append(column)
    if not names:  # nothing but empty or all-null fields: no row to insert
        for row in range(table.num_rows):
            result.failures.setdefault(
                row, ColumnTypeError("the record has no field with a value to write"))
        return result
    result.table = pa.table(arrays, names=names)
    for key in keys:
        missing = (np.ones(table.num_rows, dtype=bool) if key not in result.table.column_names
                   else result.table.column(key).is_null().to_numpy(zero_copy_only=False))
        for index in np.flatnonzero(missing):
            result.failures.setdefault(int(index), MissingKeyError(f"key field {key!r} is missing"))
    return result
