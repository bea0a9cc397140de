"""The ``validate`` and ``filter`` steps: per-field rules whose violations fail records, and a
SQL predicate whose non-matching records are filtered out."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from streamflow.plugins import ComponentContext, Processor, StepResult
from streamflow.processing.arrow_sql import ArrowPredicate, compiled
from streamflow.processing.steps import BatchQuery, Scalar


class Rules(BaseModel):
    """The rules one field must satisfy; null values pass every rule but ``not_null``. Unless
    ``allow_nan``, NaN and ±Infinity break ``not_null`` and NaN breaks ``min`` and ``max``."""

    model_config = ConfigDict(extra="forbid")

    not_null: bool = Field(False, description="the field is present and not null")
    min: float | None = Field(None, description="smallest allowed value (inclusive)")
    max: float | None = Field(None, description="largest allowed value (inclusive)")
    regex: str | None = Field(None, description="the whole text value matches this RE2 pattern")
    allowed: list[Scalar] | None = Field(None, min_length=1, description="the only allowed values")
    allow_nan: bool = Field(
        False, description="NaN and ±Infinity pass not_null, and NaN passes min and max"
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _range(self) -> Rules:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if not self.model_fields_set - {"allow_nan"}:
            raise ValueError("no rule given: use not_null, min, max, regex or allowed")
        return self


class ValidateConfig(RootModel[dict[str, Rules]]):
    """``{field: {not_null: true, min: 0, max: 100, regex: '...', allowed: [...]}}``."""

    root: dict[str, Rules] = Field(min_length=1)


class ValidationError(ValueError):
    """A record breaks a validation rule."""


Broken = pa.ChunkedArray | pa.Array | np.ndarray  # per row, whether it breaks a rule


class ValidateStep(Processor[ValidateConfig]):
    """Fails every record that breaks a rule, naming the field and the first rule it breaks."""

    name = "validate"
    config_model = ValidateConfig

    def process(self, table: pa.Table) -> StepResult:
        failures: dict[int, BaseException] = {}
        present = table.schema.names
        for name, rules in self.config.root.items():
            column = table.column(name) if name in present else pa.nulls(table.num_rows)
            column, not_numbers = self._as_numbers(name, column, rules)
            for row, error in not_numbers:
                failures.setdefault(row, error)
            for rule, broken in self._violations(name, column, rules):
                for row in _broken_rows(broken):
                    failures.setdefault(row, ValidationError(
                        f"field {name!r} breaks rule {rule}: value {column[row].as_py()!r}"))
        if not failures:
            return StepResult(table)
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(failures)] = False
        return StepResult(table.filter(pa.array(keep)), sorted(failures.items()))

    @staticmethod
    def _as_numbers(
        name: str, column: pa.ChunkedArray | pa.Array, rules: Rules
    ) -> tuple[pa.ChunkedArray | pa.Array, list[tuple[int, BaseException]]]:
        """For ``min``/``max`` alone on text (a JSON field whose records disagree on its type is
        read as text): the values as numbers, and a failure for each value that is none. A
        column of which no value is a number is returned as it is (the rules do not fit it)."""
        if ((rules.min is None and rules.max is None) or rules.regex is not None or rules.allowed is not None
                or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type))):
            return column, []
        numbers: list[float | None] = []
        failures: list[tuple[int, BaseException]] = []
        for row, value in enumerate(column.to_pylist()):
            try:
                numbers.append(None if value is None else float(value))
            except ValueError:
                rule = f"min {rules.min:g}" if rules.min is not None else f"max {rules.max:g}"
                failures.append((row, ValidationError(
                    f"field {name!r} breaks rule {rule}: value {value!r} is not a number")))
                numbers.append(None)
        if failures and len(failures) == len(column) - column.null_count:
            return column, []
        return pa.array(numbers, pa.float64()), failures

    @staticmethod
    def _violations(
        name: str, column: pa.ChunkedArray | pa.Array, rules: Rules
    ) -> list[tuple[str, Broken]]:
        """(rule, rows breaking it) per rule of the field; null means not broken."""
        if (not column.null_count and rules.regex is None and rules.allowed is None
                and (pa.types.is_integer(column.type) or column.type in _NUMPY_FLOATS)):
            return _numeric_violations(column, rules)
        return _kernel_violations(name, column, rules)


def _kernel_violations(
    name: str, column: pa.ChunkedArray | pa.Array, rules: Rules
) -> list[tuple[str, Broken]]:
    """:meth:`ValidateStep._violations` by Arrow's kernels, for columns of any type."""
    floats = pa.types.is_floating(column.type) and not rules.allow_nan
    found: list[tuple[str, Broken]] = []
    if rules.not_null:
        absent = pc.is_null(column)
        if floats:
            absent = pc.or_kleene(absent, pc.invert(pc.is_finite(column)))
        found.append(("not_null", absent))
    if pa.types.is_null(column.type):
        return found
    nan = pc.is_nan(column) if floats else None
    # Integers are compared as doubles: the kernels' own cast refuses those beyond 2**53.
    numbers = (pc.cast(column, pa.float64(), safe=False) if pa.types.is_integer(column.type)
               and (rules.min is not None or rules.max is not None) else column)
    try:
        if rules.min is not None:
            below = pc.less(numbers, rules.min)
            found.append((f"min {rules.min:g}", below if nan is None else pc.or_(below, nan)))
        if rules.max is not None:
            above = pc.greater(numbers, rules.max)
            found.append((f"max {rules.max:g}", above if nan is None else pc.or_(above, nan)))
        if rules.regex is not None:
            matches = pc.match_substring_regex(column, f"^(?:{rules.regex})$")
            found.append((f"regex {rules.regex!r}", pc.invert(matches)))
        if rules.allowed is not None:
            allowed = pa.array(rules.allowed).cast(column.type)
            found.append((f"allowed {rules.allowed}", pc.invert(pc.is_in(column, allowed))))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise TypeError(f"validate: the rules of field {name!r} do not apply to its type "
                        f"{column.type}: {exc}") from None
    return found


_NUMPY_FLOATS = (pa.float32(), pa.float64())  # Arrow compares no float16


def _numeric_violations(column: pa.ChunkedArray | pa.Array, rules: Rules) -> list[tuple[str, Broken]]:
    """:func:`_kernel_violations` for numbers without nulls, found by NumPy (one call each, where
    a small batch spent most of its time calling Arrow's kernels), as doubles like the kernels'."""
    values = column.to_numpy().astype(np.float64, copy=False)
    floats = pa.types.is_floating(column.type) and not rules.allow_nan
    found: list[tuple[str, Broken]] = []
    nan = np.isnan(values) if floats else np.zeros(len(values), dtype=bool)
    if rules.not_null:
        found.append(("not_null", ~np.isfinite(values) if floats else nan))
    if rules.min is not None:
        found.append((f"min {rules.min:g}", (values < rules.min) | nan))
    if rules.max is not None:
        found.append((f"max {rules.max:g}", (values > rules.max) | nan))
    return found


def _broken_rows(broken: Broken) -> list[int]:
    """The rows that break a rule, in order."""
    if not isinstance(broken, np.ndarray):  # NumPy finds them faster than Arrow's kernels
        broken = (pc.fill_null(broken, False) if broken.null_count else broken).to_numpy(
            zero_copy_only=False)
    return np.flatnonzero(broken).tolist()


class FilterConfig(RootModel[str]):
    """A DuckDB boolean expression over the record's fields (a WHERE clause)."""

    root: str = Field(min_length=1)


class FilterStep(Processor[FilterConfig]):
    """Keeps the records for which the predicate is true; the others (false or null) are
    filtered."""

    name = "filter"
    config_model = FilterConfig

    def __init__(self, config: FilterConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        # DuckDB computes only the predicate, from the columns it names; the rows are kept by
        # Arrow, as they came (a third cheaper on small batches than selecting them in SQL).
        self.query = BatchQuery(f"SELECT CAST(({config.root}) AS BOOLEAN) AS keep FROM batch")
        self.predicate = compiled(ArrowPredicate, config.root)  # DuckDB's result, in Arrow

    def process(self, table: pa.Table) -> StepResult:
        fitting, failures = self.query.fit(table)
        keep = self.predicate.keep(fitting) if self.predicate else None
        if keep is None:
            keep = self.query.run(fitting).column(0)
        if not keep.null_count and keep.to_numpy().all():  # nothing filtered: no copy
            return StepResult(fitting, failures)
        return StepResult(fitting.filter(keep, null_selection_behavior="drop"), failures)
