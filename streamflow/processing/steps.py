"""Built-in processor steps: declared-schema checks and DuckDB SQL, on Arrow micro-batches."""

from __future__ import annotations

from typing import Literal

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, RootModel

from streamflow.plugins import ROW_ID, ComponentContext, Processor, StepResult

ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
}


class FieldSpec(BaseModel):
    """One field of a declared record schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "int", "float", "bool"]
    required: bool = False


class SchemaConfig(RootModel[dict[str, FieldSpec]]):
    """``{field: {type: ..., required: ...}}``, in output order."""


class SqlConfig(RootModel[str]):
    """A DuckDB statement over the table ``batch``."""


class SchemaViolation(ValueError):
    """A record does not match the declared schema."""


def arrow_schema(fields: dict[str, FieldSpec]) -> pa.Schema:
    """The Arrow schema of declared fields, in declaration order."""
    return pa.schema([pa.field(name, ARROW_TYPES[spec.type]) for name, spec in fields.items()])


class SchemaCheck(Processor[SchemaConfig]):
    """Keeps exactly the declared fields, typed; rows with a missing required field or a value
    that cannot take the declared type fail."""

    name = "schema"
    config_model = SchemaConfig

    def __init__(self, config: SchemaConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.fields = config.root
        self.schema = self.input_schema = arrow_schema(self.fields)

    def process(self, table: pa.Table) -> StepResult:
        failures: dict[int, BaseException] = {}
        columns: dict[str, pa.ChunkedArray] = {}
        for field in self.schema:
            if field.name not in table.column_names:
                columns[field.name] = pa.chunked_array([pa.nulls(table.num_rows, field.type)])
                continue
            column = table.column(field.name)
            if column.type != field.type:
                column = self._cast(column, field.type, field.name, failures)
            columns[field.name] = column
        for name, spec in self.fields.items():
            if spec.required:
                for row in pc.indices_nonzero(pc.is_null(columns[name])).to_pylist():
                    failures.setdefault(
                        row, SchemaViolation(f"required field {name!r} is missing or null")
                    )
        columns[ROW_ID] = table.column(ROW_ID)
        typed = pa.table(columns)
        if failures:
            keep = pa.array([row not in failures for row in range(table.num_rows)])
            typed = typed.filter(keep)
        return StepResult(typed, sorted(failures.items()))

    @staticmethod
    def _cast(
        column: pa.ChunkedArray,
        target: pa.DataType,
        name: str,
        failures: dict[int, BaseException],
    ) -> pa.ChunkedArray:
        try:
            return pc.cast(column, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        values = []
        for row, value in enumerate(column.to_pylist()):
            try:
                values.append(pc.cast(pa.array([value]), target)[0].as_py())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                failures.setdefault(
                    row, SchemaViolation(f"field {name!r}: {value!r} is not a valid {target}")
                )
                values.append(None)
        return pa.chunked_array([pa.array(values, target)])


class SqlTransform(Processor[SqlConfig]):
    """Runs a DuckDB statement over the batch, registered as the table ``batch``.

    ``SELECT *`` carries the ``_sf_row`` column along, tying each output row to its input
    record; a statement that drops it breaks the processor contract and fails its batch.
    """

    name = "sql"
    config_model = SqlConfig

    def __init__(self, config: SqlConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.statement = config.root
        self._connection = duckdb.connect(config={"preserve_insertion_order": True})

    def process(self, table: pa.Table) -> StepResult:
        self._connection.register("batch", table)
        try:
            result = self._connection.sql(self.statement).to_arrow_table()
        finally:
            self._connection.unregister("batch")
        return StepResult(result)
