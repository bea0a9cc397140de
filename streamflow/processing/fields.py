"""Field steps: ``select``, ``rename``, ``drop``, ``fill_null`` and ``normalize``.

Each works on whole columns; the runtime's hidden columns (``_sf_row``, ``_sf_topic``) always
go along.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, RootModel, field_validator

from streamflow.plugins import Processor, StepResult
from streamflow.processing.steps import HIDDEN_PREFIX, Scalar, hidden_columns


def _visible(names: list[str]) -> list[str]:
    for name in names:
        if name.startswith(HIDDEN_PREFIX):
            raise ValueError(f"{name!r}: fields starting with {HIDDEN_PREFIX!r} belong to the runtime")
    return names


class SelectConfig(RootModel[list[str]]):
    """The fields to keep, in output order; a field absent from a batch comes out null."""

    root: list[str] = Field(min_length=1)

    @field_validator("root")
    @classmethod
    def _check(cls, names: list[str]) -> list[str]:
        return _visible(names)


class SelectStep(Processor[SelectConfig]):
    """Keeps only the listed fields, in the listed order."""

    name = "select"
    config_model = SelectConfig

    def process(self, table: pa.Table) -> StepResult:
        columns = {
            name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows)
            for name in self.config.root
        }
        columns.update({name: table.column(name) for name in hidden_columns(table)})
        return StepResult(pa.table(columns))


class RenameConfig(RootModel[dict[str, str]]):
    """``{old_name: new_name}``; a field absent from a batch is skipped."""

    root: dict[str, str] = Field(min_length=1)

    @field_validator("root")
    @classmethod
    def _check(cls, names: dict[str, str]) -> dict[str, str]:
        _visible([*names, *names.values()])
        if len(set(names.values())) != len(names):
            raise ValueError("two fields are renamed to the same name")
        return names


class RenameStep(Processor[RenameConfig]):
    """Renames fields; a new name replaces a field that already has it."""

    name = "rename"
    config_model = RenameConfig

    def process(self, table: pa.Table) -> StepResult:
        mapping = {old: new for old, new in self.config.root.items() if old in table.column_names}
        replaced = [name for name in mapping.values()
                    if name in table.column_names and name not in mapping]
        table = table.drop_columns(replaced)
        return StepResult(table.rename_columns([mapping.get(name, name) for name in table.column_names]))


class DropConfig(RootModel[list[str]]):
    """The fields to remove; a field absent from a batch is skipped."""

    root: list[str] = Field(min_length=1)

    @field_validator("root")
    @classmethod
    def _check(cls, names: list[str]) -> list[str]:
        return _visible(names)


class DropStep(Processor[DropConfig]):
    """Removes the listed fields."""

    name = "drop"
    config_model = DropConfig

    def process(self, table: pa.Table) -> StepResult:
        return StepResult(table.drop_columns([n for n in self.config.root if n in table.column_names]))


class FillNullConfig(RootModel[dict[str, Scalar]]):
    """``{field: value}``: nulls (and absent fields) take the value."""

    root: dict[str, Scalar] = Field(min_length=1)

    @field_validator("root")
    @classmethod
    def _check(cls, values: dict[str, Scalar]) -> dict[str, Scalar]:
        _visible(list(values))
        return values


class FillNullStep(Processor[FillNullConfig]):
    """Replaces nulls by per-field constants; a constant that does not fit the field's type fails
    the batch (the error names the field)."""

    name = "fill_null"
    config_model = FillNullConfig

    def process(self, table: pa.Table) -> StepResult:
        for name, value in self.config.root.items():
            if name not in table.column_names:
                table = table.append_column(name, pa.array([value] * table.num_rows))
                continue
            column = table.column(name)
            if pa.types.is_null(column.type):
                filled = pa.array([value] * table.num_rows)
            else:
                try:
                    filled = pc.fill_null(column, pa.scalar(value).cast(column.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise TypeError(f"fill_null: {value!r} does not fit field {name!r} of type "
                                    f"{column.type}: {exc}") from None
            table = table.set_column(table.schema.get_field_index(name), name, filled)
        return StepResult(table)


Operation = Literal["trim", "lower", "upper", "nfc"]
OPERATIONS = {
    "trim": pc.utf8_trim_whitespace,
    "lower": pc.utf8_lower,
    "upper": pc.utf8_upper,
    "nfc": lambda column: pc.utf8_normalize(column, "NFC"),
}


class NormalizeConfig(RootModel[dict[str, list[Operation]]]):
    """``{field: [trim, lower | upper, nfc]}``, applied in the listed order."""

    root: dict[str, list[Operation]] = Field(min_length=1)

    @field_validator("root")
    @classmethod
    def _check(cls, fields: dict[str, list[Operation]]) -> dict[str, list[Operation]]:
        _visible(list(fields))
        for name, operations in fields.items():
            if {"lower", "upper"} <= set(operations):
                raise ValueError(f"{name}: choose one of lower and upper")
        return fields


class NormalizeStep(Processor[NormalizeConfig]):
    """Normalises text fields: trims whitespace, changes case, composes Unicode (NFC). A field
    that is not text fails the batch; an absent or all-null one is skipped."""

    name = "normalize"
    config_model = NormalizeConfig

    def process(self, table: pa.Table) -> StepResult:
        for name, operations in self.config.root.items():
            if name not in table.column_names or pa.types.is_null(table.column(name).type):
                continue
            column = table.column(name)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise TypeError(f"normalize: field {name!r} is {column.type}, not text")
            for operation in operations:
                column = OPERATIONS[operation](column)
            table = table.set_column(table.schema.get_field_index(name), name, column)
        return StepResult(table)
