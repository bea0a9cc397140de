"""NaN and ±Infinity are no value for numeric ``required`` and ``not_null`` checks (nor within a
``min``/``max`` range, for NaN) unless the field says ``allow_nan: true``."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from streamflow.plugins import ROW_ID
from streamflow.processing.steps import SchemaViolation
from streamflow.processing.validation import ValidationError as RuleBroken
from streamflow.runtime.dead_letters import Failure
from streamflow.runtime.stages import StepRunner, decode_input, run_steps
from tests.tables import step, with_rows

# As JSON lines: NaN and Infinity literals (json.loads reads them), text the schema coerces to
# floats, a number and a missing value.
VALUES = [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}', b'{"x": "nan"}', b'{"x": "-inf"}',
          b'{"x": 1.5}', b'{"x": null}']


def run_stage(values: list[bytes], settings: dict[str, Any]) -> tuple[list[Any], dict[int, str]]:
    """The values through a stage whose first step is ``schema``: the output ``x`` values and
    the dead-lettered rows with their messages."""
    steps = [StepRunner(step("schema", settings))]
    table, decoding = decode_input(values, steps)
    failures: list[Failure] = list(decoding)
    table = run_steps(steps, table, failures)
    return table.column("x").to_pylist(), {failure.row: str(failure.error) for failure in failures}


def test_a_required_float_that_is_not_a_finite_number_fails() -> None:
    out, failed = run_stage(VALUES, {"x": {"type": "float", "required": True}})
    assert out == [1.5]
    assert sorted(failed) == [0, 1, 2, 3, 4, 6]
    assert "required field 'x' is nan" in failed[0] and "allow_nan" in failed[0]
    assert "is inf" in failed[1] and "is -inf" in failed[2]


def test_allow_nan_lets_them_through() -> None:
    out, failed = run_stage(VALUES, {"x": {"type": "float", "required": True, "allow_nan": True}})
    assert sorted(failed) == [6]
    assert math.isnan(out[0]) and out[1:] == [math.inf, -math.inf, out[3], -math.inf, 1.5]
    assert math.isnan(out[3])


def test_an_optional_float_keeps_them() -> None:
    out, failed = run_stage(VALUES, {"x": {"type": "float"}})
    assert not failed and len(out) == len(VALUES)


def test_allow_nan_is_for_floats_only() -> None:
    with pytest.raises(ValidationError, match="allow_nan applies to type float only"):
        step("schema", {"x": {"type": "int", "required": True, "allow_nan": True}})


def broken(rules: dict[str, Any], values: list[float | None]) -> dict[int, str]:
    result = step("validate", {"x": rules}).process(with_rows({"x": values}))
    assert all(isinstance(error, RuleBroken) for _, error in result.failures)
    return {row: str(error) for row, error in result.failures}


def test_not_null_min_and_max_reject_nan_unless_allowed() -> None:
    values = [math.nan, math.inf, -math.inf, 5.0, None]
    assert sorted(broken({"not_null": True}, values)) == [0, 1, 2, 4]
    assert sorted(broken({"min": 0}, values)) == [0, 2]
    assert sorted(broken({"max": 10}, values)) == [0, 1]
    assert sorted(broken({"not_null": True, "allow_nan": True}, values)) == [4]
    assert sorted(broken({"min": 0, "max": 10, "allow_nan": True}, values)) == [1, 2]
    assert "rule not_null: value nan" in broken({"not_null": True}, values)[0]


def test_allow_nan_alone_is_no_rule() -> None:
    with pytest.raises(ValidationError, match="no rule given"):
        step("validate", {"x": {"allow_nan": True}})


def test_the_schema_check_reports_schema_violations() -> None:
    result = step("schema", {"x": {"type": "float", "required": True}}).process(
        with_rows({"x": [math.nan, 2.0]}))
    assert [row for row, _ in result.failures] == [0]
    assert isinstance(result.failures[0][1], SchemaViolation)
    assert result.table.column(ROW_ID).to_pylist() == [1]
