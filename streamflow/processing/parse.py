"""The ``parse`` step: record values (JSON, CSV or Avro) into typed columns.

As the first step of a stage it receives the raw record values (a binary ``value`` column), so
that records it cannot decode become its own per-record failures; later in a stage it parses
any text or binary column of the batch (``field``).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamflow.plugins import ROW_ID, ComponentContext, Processor, StepResult
from streamflow.processing.codec import DecodeError, Failures, decode_json, with_row_ids

RAW_VALUE = "value"


def raw_table(values: Sequence[bytes | None]) -> pa.Table:
    """Record values as a binary ``value`` column with their ``_sf_row`` ids."""
    return pa.table({
        RAW_VALUE: pa.array(values, pa.binary()),
        ROW_ID: pa.array(np.arange(len(values), dtype=np.int64)),
    })


class ParseConfig(BaseModel):
    """Settings of a ``parse`` step."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "csv", "avro"] = Field(description="encoding of the values")
    field: str = Field(RAW_VALUE, description="column holding the values (the record value first)")
    columns: list[str] | None = Field(
        None, min_length=1, description="csv: names of the columns of each one-line value"
    )
    header: bool = Field(
        False, description="csv: each value is a document whose first line names the columns; "
        "every further line becomes a record"
    )
    delimiter: str = Field(",", min_length=1, max_length=1, description="csv: field separator")
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="avro: the writer's record schema (JSON form)"
    )
    confluent_framing: bool = Field(
        False, description="avro: values start with the 5-byte Confluent schema-registry header"
    )

    @model_validator(mode="after")
    def _format_settings(self) -> ParseConfig:
        if self.format == "csv" and (self.columns is None) == (not self.header):
            raise ValueError("csv needs exactly one of 'columns: [name, ...]' or 'header: true'")
        if self.format == "avro" and self.schema_ is None:
            raise ValueError("avro needs 'schema:' (the record schema the values were written with)")
        if self.format != "csv" and (self.columns or self.header):
            raise ValueError("'columns' and 'header' apply to format: csv only")
        return self


class ParseStep(Processor[ParseConfig]):
    """Decodes one column of values into records; a value that does not decode is a failure.

    JSON fields whose records disagree on the type are read as text (a ``schema`` step types
    them); CSV values are read as text (follow with a ``schema`` step to type them); Avro values take
    the types of the Avro schema.
    """

    name = "parse"
    config_model = ParseConfig
    reads_raw_records = True  # as the first step; the value column's name is RAW_VALUE

    def __init__(self, config: ParseConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._avro_schema = (
            fastavro.parse_schema(config.schema_) if config.schema_ is not None else None
        )

    def process(self, table: pa.Table) -> StepResult:
        if self.config.field not in table.column_names:
            raise DecodeError(f"parse: the batch has no column {self.config.field!r}")
        values = [_as_bytes(value) for value in table.column(self.config.field).to_pylist()]
        if self.config.format == "json":
            parsed, failures = decode_json(values, lenient=True)
        elif self.config.format == "avro":
            parsed, failures = self._avro(values)
        elif self.config.header:
            parsed, failures = self._csv_documents(values)
        else:
            parsed, failures = self._csv_lines(values)
        origin = parsed.column(ROW_ID)
        parsed = parsed.set_column(
            parsed.schema.get_field_index(ROW_ID), ROW_ID, table.column(ROW_ID).take(origin)
        )
        return StepResult(parsed, failures)

    def _avro(self, values: list[bytes | None]) -> tuple[pa.Table, Failures]:
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        failures: Failures = []
        skip = 5 if self.config.confluent_framing else 0
        for row, value in enumerate(values):
            try:
                if value is None:
                    raise DecodeError("empty record value")
                record = fastavro.schemaless_reader(io.BytesIO(value[skip:]), self._avro_schema)
                if not isinstance(record, dict):
                    raise DecodeError(f"expected an Avro record, got {type(record).__name__}")
            except Exception as exc:  # fastavro raises many kinds on corrupt input
                failures.append((row, exc if isinstance(exc, DecodeError) else
                                 DecodeError(f"invalid Avro ({type(exc).__name__}: {exc})")))
                continue
            records.append(record)
            rows.append(row)
        return _records_table(records, rows), failures

    def _csv_lines(self, values: list[bytes | None]) -> tuple[pa.Table, Failures]:
        columns = self.config.columns or []
        if all(value and b"\n" not in value and b"\r" not in value for value in values):
            try:
                table = pa_csv.read_csv(
                    pa.BufferReader(b"\n".join(values)),  # type: ignore[arg-type]
                    read_options=pa_csv.ReadOptions(column_names=columns, use_threads=False),
                    parse_options=pa_csv.ParseOptions(delimiter=self.config.delimiter),
                    convert_options=pa_csv.ConvertOptions(
                        column_types=dict.fromkeys(columns, pa.string()),
                        strings_can_be_null=False, quoted_strings_can_be_null=False,
                    ),
                )
                if table.num_rows == len(values):
                    return with_row_ids(table, range(len(values))), []
            except pa.ArrowInvalid:
                pass
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        failures: Failures = []
        for row, value in enumerate(values):
            try:
                lines = list(csv.reader(io.StringIO(_text(value)), delimiter=self.config.delimiter))
                if len(lines) != 1 or len(lines[0]) != len(columns):
                    found = f"{len(lines)} lines" if len(lines) != 1 else f"{len(lines[0])} fields"
                    raise DecodeError(f"expected one CSV line of {len(columns)} fields, got {found}")
            except (DecodeError, csv.Error) as exc:
                failures.append((row, exc if isinstance(exc, DecodeError) else DecodeError(str(exc))))
                continue
            records.append(dict(zip(columns, lines[0], strict=True)))
            rows.append(row)
        return _records_table(records, rows, pa.schema([(name, pa.string()) for name in columns])), failures

    def _csv_documents(self, values: list[bytes | None]) -> tuple[pa.Table, Failures]:
        records: list[dict[str, Any]] = []
        rows: list[int] = []
        failures: Failures = []
        for row, value in enumerate(values):
            try:
                reader = csv.DictReader(io.StringIO(_text(value)), delimiter=self.config.delimiter)
                document = list(reader)
                if reader.fieldnames is None:
                    raise DecodeError("the CSV document has no header line")
                for line in document:
                    if None in line or None in line.values():
                        raise DecodeError(f"line {reader.line_num}: field count differs from the header")
            except (DecodeError, csv.Error) as exc:
                failures.append((row, exc if isinstance(exc, DecodeError) else DecodeError(str(exc))))
                continue
            records += document
            rows += [row] * len(document)
        return _records_table(records, rows), failures


def _as_bytes(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _text(value: bytes | None) -> str:
    if not value:
        raise DecodeError("empty record value")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8 text: {exc}") from None


def _records_table(
    records: list[dict[str, Any]], rows: list[int], schema: pa.Schema | None = None
) -> pa.Table:
    """Python records (one per entry of ``rows``) as a table with their row ids; a field whose
    records disagree on its type (see :func:`_column`) is read as text."""
    if schema is None:
        names = list(dict.fromkeys(name for record in records for name in record))
        table = pa.table({name: _column([record.get(name) for record in records]) for name in names})
    else:
        table = pa.Table.from_pylist(records, schema=schema)
    if table.num_columns == 0:
        return pa.table({ROW_ID: pa.array(np.asarray(rows, dtype=np.int64))})
    return with_row_ids(table, rows)


def _column(values: list[Any]) -> pa.Array:
    """``values`` as one Arrow column, typed by pyarrow; where they do not fit one type (an Avro
    union such as ``["int", "string"]``, or of records and non-records, holding both in one
    batch), as text: strings as they are, anything else as its JSON (bytes as base64, times
    ISO 8601, decimals and UUIDs as strings), as the JSON decoder does for fields whose records
    disagree. A following ``schema`` step types the column and fails only the values that do
    not convert, each in its own record."""
    try:
        return pa.array(values)
    except (pa.ArrowException, OverflowError):
        return pa.array([value if value is None or isinstance(value, str) else
                         json.dumps(value, default=_json_default, ensure_ascii=False)
                         for value in values], pa.string())


def _json_default(value: Any) -> Any:
    """What JSON cannot hold as it is, as JSON: bytes in base64, anything else (datetime, date,
    time, Decimal, UUID) as its ISO or plain text."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
