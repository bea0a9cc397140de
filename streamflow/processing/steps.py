"""Built-in processor steps: declared-schema checks and DuckDB SQL, on Arrow micro-batches."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from streamflow.plugins import ComponentContext, Processor, StepResult
from streamflow.processing.arrow_sql import ArrowProjection, compiled
from streamflow.processing.schema_memo import PerSchema

if TYPE_CHECKING:
    import duckdb

TIMESTAMP = pa.timestamp("us", tz="UTC")
ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": TIMESTAMP,
}
HIDDEN_PREFIX = "_sf_"
EPOCH_MICROS = {"s": 1_000_000, "ms": 1_000}
Scalar = str | int | float | bool


class FieldSpec(BaseModel):
    """One field of a declared record schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "int", "float", "bool", "timestamp"] = Field(
        description="numeric strings become int/float; timestamps take ISO-8601 text (with an "
        "offset, or UTC) or epoch numbers and become UTC"
    )
    required: bool = Field(
        False, description="a record without a value (after default) fails; for a float, NaN and "
        "±Infinity are no value unless allow_nan"
    )
    allow_nan: bool = Field(
        False, description="float only: NaN and ±Infinity count as values for required"
    )
    default: Scalar | None = Field(None, description="value for a missing or null field")
    enum: list[Scalar] | None = Field(
        None, min_length=1, description="allowed values; any other value fails the record"
    )
    unit: Literal["s", "ms"] = Field("ms", description="timestamp: unit of epoch numbers")

    @model_validator(mode="after")
    def _values_take_the_type(self) -> FieldSpec:
        if self.allow_nan and self.type != "float":
            raise ValueError(f"allow_nan applies to type float only, not {self.type}")
        _typed(self, [self.default])
        if self.enum is not None:
            _typed(self, self.enum)
        return self


def _typed(spec: FieldSpec, values: list[Scalar | None]) -> pa.Array:
    """Configured values (``default``, ``enum``) as the field's type, or a ValueError."""
    failures: dict[int, BaseException] = {}
    try:
        column = coerce(pa.chunked_array([pa.array(values)]), spec, "default/enum", failures)
    except (pa.ArrowException, OverflowError) as exc:
        raise ValueError(f"{values} do not all take the type {spec.type}: {exc}") from None
    if failures:
        raise ValueError(str(failures[min(failures)]))
    return column.combine_chunks()


class SchemaConfig(RootModel[dict[str, FieldSpec]]):
    """``{field: {type: ..., required: ..., default: ..., enum: [...], unit: ...}}``, in output
    order."""


class SqlConfig(RootModel[str]):
    """A DuckDB statement over the table ``batch``."""


class SchemaViolation(ValueError):
    """A record does not match the declared schema."""


def hidden_columns(table: pa.Table) -> list[str]:
    """The runtime's own columns (``_sf_row``, ``_sf_topic``), which every step carries along."""
    return hidden_names(table.schema)


def hidden_names(schema: pa.Schema) -> list[str]:
    """:func:`hidden_columns` of a table of ``schema``."""
    return [name for name in schema.names if name.startswith(HIDDEN_PREFIX)]


def arrow_schema(fields: dict[str, FieldSpec]) -> pa.Schema:
    """The Arrow schema of declared fields, in declaration order."""
    return pa.schema([pa.field(name, ARROW_TYPES[spec.type]) for name, spec in fields.items()])


def _input_type(spec: FieldSpec) -> pa.DataType:
    """The type the JSON reader tries first: epoch numbers when a unit is given, else the
    declared type."""
    if spec.type == "timestamp" and "unit" in spec.model_fields_set:
        return pa.float64()
    return ARROW_TYPES[spec.type]


def coerce(
    column: pa.ChunkedArray, spec: FieldSpec, name: str, failures: dict[int, BaseException]
) -> pa.ChunkedArray:
    """``column`` as the declared type; rows whose value cannot take it go to ``failures``."""
    target = ARROW_TYPES[spec.type]
    if column.type == target:
        return column
    if pa.types.is_null(column.type):
        return pa.chunked_array([pa.nulls(len(column), target)])
    if spec.type == "timestamp":
        return _timestamps(column, spec, name, failures)
    try:
        return pc.cast(column, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values = []
    for row, value in enumerate(column.to_pylist()):
        try:
            values.append(pc.cast(pa.array([value]), target)[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            failures.setdefault(
                row, SchemaViolation(f"field {name!r}: {value!r} is not a valid {spec.type}")
            )
            values.append(None)
    return pa.chunked_array([pa.array(values, target)])


_EPOCH_TEXT = re.compile(r"^\s*-?\d+(\.\d*)?\s*$")


def _timestamps(
    column: pa.ChunkedArray, spec: FieldSpec, name: str, failures: dict[int, BaseException]
) -> pa.ChunkedArray:
    """Timestamps, epoch numbers or ISO-8601 text as UTC timestamps."""
    scale = EPOCH_MICROS[spec.unit]
    try:
        if pa.types.is_timestamp(column.type):
            if column.type.tz is None:  # naive: taken as UTC
                return pc.cast(pc.cast(column, pa.timestamp("us")), TIMESTAMP)
            return pc.cast(column, TIMESTAMP)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            micros = pc.round(pc.multiply_checked(pc.cast(column, pa.float64()), scale))
            return pc.cast(pc.cast(micros, pa.int64()), TIMESTAMP)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return pc.cast(column, TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values: list[datetime | None] = []
    for row, value in enumerate(column.to_pylist()):
        try:
            values.append(_timestamp(value, scale))
        except (ValueError, TypeError, OverflowError):
            failures.setdefault(row, SchemaViolation(
                f"field {name!r}: {value!r} is not an ISO-8601 timestamp or epoch {spec.unit}"))
            values.append(None)
    return pa.chunked_array([pa.array(values, TIMESTAMP)])


def _timestamp(value: object, scale: int) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and not _EPOCH_TEXT.match(value):
        parsed = datetime.fromisoformat(value.strip())
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{type(value).__name__} is not a time")
    micros = round(float(value) * scale)
    return EPOCH + timedelta(microseconds=micros)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SchemaCheck(Processor[SchemaConfig]):
    """Keeps exactly the declared fields, typed (coercing text, numbers and timestamps); rows
    with a missing required field (or, unless ``allow_nan``, a NaN or infinite required float), a
    value that cannot take the declared type or a value outside ``enum`` fail."""

    name = "schema"
    config_model = SchemaConfig

    def __init__(self, config: SchemaConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.fields = config.root
        self.schema = arrow_schema(self.fields)
        self._declared = [(field.name, field.type, self.fields[field.name]) for field in self.schema]
        self._hidden = PerSchema(hidden_names)
        self.input_schema = pa.schema(
            [pa.field(name, _input_type(spec)) for name, spec in self.fields.items()]
        )
        self.defaults = {name: _typed(spec, [spec.default])[0]
                         for name, spec in self.fields.items() if spec.default is not None}
        self.allowed = {name: _typed(spec, spec.enum)
                        for name, spec in self.fields.items() if spec.enum is not None}

    def process(self, table: pa.Table) -> StepResult:
        failures: dict[int, BaseException] = {}
        columns: dict[str, pa.ChunkedArray] = {}
        present = table.schema.names
        for name, kind, spec in self._declared:
            if name in present:
                column = coerce(table.column(name), spec, name, failures)
            else:
                column = pa.chunked_array([pa.nulls(table.num_rows, kind)])
            if name in self.defaults:
                column = pc.fill_null(column, self.defaults[name])
            columns[name] = column
            if spec.required:
                # Most batches break no rule: the null count and two kernels tell.
                rows = pc.indices_nonzero(pc.is_null(column)).to_pylist() if column.null_count else []
                for row in rows:
                    failures.setdefault(
                        row, SchemaViolation(f"required field {name!r} is missing or null")
                    )
                if spec.type == "float" and not spec.allow_nan and not _all_finite(column):
                    infinite = pc.invert(pc.fill_null(pc.is_finite(column), True))
                    for row in pc.indices_nonzero(infinite).to_pylist():
                        failures.setdefault(row, SchemaViolation(
                            f"required field {name!r} is {column[row].as_py()}, not a "
                            "finite number (allow_nan: true accepts it)"))
            if name in self.allowed:
                allowed = self.allowed[name]
                outside = pc.invert(pc.fill_null(pc.is_in(column, value_set=allowed), True))
                for row in pc.indices_nonzero(outside).to_pylist():
                    failures.setdefault(row, SchemaViolation(
                        f"field {name!r}: {column[row].as_py()!r} is not one of {spec.enum}"))
        for name in self._hidden(table.schema):
            columns[name] = table.column(name)
        typed = pa.table(columns)
        if failures:
            keep = np.ones(table.num_rows, dtype=bool)
            keep[list(failures)] = False
            typed = typed.filter(pa.array(keep))
        return StepResult(typed, sorted(failures.items()))


def _all_finite(column: pa.ChunkedArray) -> bool:
    """Whether every value of a double column that is not null is finite: one NumPy call when
    none is null (two kernel calls cost a small batch more)."""
    if not column.null_count:
        return bool(np.isfinite(column.to_numpy()).all())
    return bool(pc.all(pc.is_finite(column)).as_py())


SQL_MAX_DEPTH = 63  # levels of a column's type DuckDB takes from Arrow: 62 lists or structs around a value


class NestingError(ValueError):
    """A record's value nests deeper than DuckDB takes from Arrow, so no SQL can see it."""


def type_depth(kind: pa.DataType, list_levels: int = 1) -> int:
    """Levels of an Arrow type: 1 for a value, one more for each struct around it and
    ``list_levels`` more for each list or map (Parquet counts 2: the group and its repeated one)."""
    if pa.types.is_struct(kind):
        return 1 + max((type_depth(child.type, list_levels) for child in kind), default=0)
    if pa.types.is_map(kind):
        return list_levels + max(type_depth(child, list_levels) for child in (kind.key_type, kind.item_type))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return list_levels + type_depth(kind.value_type, list_levels)
    return 1


class SqlTransform(Processor[SqlConfig]):
    """Runs a DuckDB statement over the batch, registered as the table ``batch``.

    ``SELECT *`` carries the ``_sf_row`` column along, tying each output row to its input
    record; a statement that drops it breaks the processor contract and fails its batch.
    """

    name = "sql"
    config_model = SqlConfig

    def __init__(self, config: SqlConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.query = BatchQuery(config.root)
        self.projection = compiled(ArrowProjection, config.root)  # DuckDB's result, in Arrow

    def process(self, table: pa.Table) -> StepResult:
        fitting, failures = self.query.fit(table)
        derived = self.projection.apply(fitting) if self.projection else None
        return StepResult(self.query.run(fitting) if derived is None else derived, failures)


_thread_connections = threading.local()


def thread_connection(external_access: bool) -> duckdb.DuckDBPyConnection:
    """This thread's DuckDB connection, with or without external access: the statements of the
    steps a stage runs on its thread share it (the first connection costs about 25 MB, each
    further one 3), and it goes with the thread. DuckDB (20 MB) is imported by the first: a
    process whose stages run no statement, such as a model stage's, does without it."""
    import duckdb

    name = "external" if external_access else "closed"
    connection: duckdb.DuckDBPyConnection | None = getattr(_thread_connections, name, None)
    if connection is None:
        connection = duckdb.connect(config={"preserve_insertion_order": True,
                                            "enable_external_access": external_access})
        # Results must not depend on the host's zone; and the schema step's timestamps are UTC.
        connection.execute("SET TimeZone = 'UTC'")
        setattr(_thread_connections, name, connection)
    return connection


class BatchQuery:
    """A DuckDB statement run over each micro-batch, registered as the table ``batch``; without
    ``external_access`` it can read or write no file and reach no URL (``validate`` runs it so).
    It runs on the calling thread's connection (see :func:`thread_connection`)."""

    def __init__(self, statement: str, external_access: bool = True) -> None:
        self.statement = statement
        self._external_access = external_access
        self._too_deep = PerSchema(lambda schema: [
            column.name for column in schema if type_depth(column.type) > SQL_MAX_DEPTH])

    def fit(self, table: pa.Table) -> tuple[pa.Table, list[tuple[int, BaseException]]]:
        """``table`` as DuckDB takes it, and the rows it cannot: a column typed deeper than
        :data:`SQL_MAX_DEPTH` is left out, and each row with a value in one fails (a
        :class:`NestingError`) instead of its whole batch."""
        deep = self._too_deep(table.schema)
        if not deep:
            return table, []
        failures: dict[int, BaseException] = {}
        for name in deep:
            for row in pc.indices_nonzero(pc.is_valid(table.column(name))).to_pylist():
                failures.setdefault(row, NestingError(
                    f"field {name!r} nests deeper than SQL takes ({SQL_MAX_DEPTH - 1} lists and objects)"))
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(failures)] = False
        return table.drop_columns(deep).filter(pa.array(keep)), sorted(failures.items())

    def run(self, table: pa.Table) -> pa.Table:
        connection = thread_connection(self._external_access)
        if self._external_access:
            # DuckDB reads the table ``batch`` from this local of the calling frame (a
            # replacement scan): a third cheaper per batch than registering it and back.
            batch = table  # noqa: F841
            return connection.sql(self.statement).to_arrow_table()
        connection.register("batch", table)  # no replacement scan without external access
        try:
            return connection.sql(self.statement).to_arrow_table()
        finally:
            connection.unregister("batch")
