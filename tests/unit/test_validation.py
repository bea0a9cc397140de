"""validate and filter steps."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streamflow.plugins import ROW_ID
from streamflow.processing.validation import (
    Rules,
    ValidateConfig,
    _broken_rows,
    _kernel_violations,
    _numeric_violations,
)
from tests.tables import step, with_rows


def test_records_breaking_a_rule_fail_with_the_field_and_rule_named() -> None:
    validate = step("validate", {
        "t": {"min": -50, "max": 60},
        "id": {"not_null": True, "regex": "s-[0-9]+"},
        "unit": {"allowed": ["C", "F"]},
    })
    table = with_rows({
        "t": [20.0, -80.0, 70.0, 1.0, 2.0, None],
        "id": ["s-1", "s-2", "s-3", None, "x-5s-5", "s-6"],
        "unit": ["C", "C", "C", "F", "C", "K"],
    }, [10, 11, 12, 13, 14, 15])
    result = validate.process(table)
    assert result.table[ROW_ID].to_pylist() == [10]
    messages = {row: str(error) for row, error in result.failures}
    assert messages == {
        1: "field 't' breaks rule min -50: value -80.0",
        2: "field 't' breaks rule max 60: value 70.0",
        3: "field 'id' breaks rule not_null: value None",
        4: "field 'id' breaks rule regex 's-[0-9]+': value 'x-5s-5'",
        5: "field 'unit' breaks rule allowed ['C', 'F']: value 'K'",
    }


def test_an_absent_field_is_null() -> None:
    result = step("validate", {"id": {"not_null": True}, "t": {"min": 0}}).process(with_rows({"x": [1]}))
    assert [str(error) for _, error in result.failures] == ["field 'id' breaks rule not_null: value None"]


@pytest.mark.parametrize("values", [[2**60, 5, None], [2**60, 5, 9]])
def test_integers_beyond_doubles_are_compared_as_doubles_not_failing_the_batch(
        values: list[int | None]) -> None:
    result = step("validate", {"n": {"min": 0, "max": 2**59}}).process(
        with_rows({"n": pa.array(values, pa.int64())}))
    assert result.table[ROW_ID].to_pylist() == [1, 2]
    assert [(row, str(error)) for row, error in result.failures] == [
        (0, f"field 'n' breaks rule max {2.0**59:g}: value {2**60}")]


def test_rules_that_do_not_fit_the_type_fail_the_batch_naming_the_field() -> None:
    with pytest.raises(TypeError, match="'name'"):
        step("validate", {"name": {"min": 1}}).process(with_rows({"name": ["a"]}))


@pytest.mark.parametrize("rules", [{"x": {}}, {"x": {"min": 2, "max": 1}}, {"x": {"regex": "("}},
                                   {"x": {"maximum": 1}}])
def test_bad_rules_are_config_errors(rules: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ValidateConfig.model_validate(rules)


def test_filter_keeps_matching_rows_and_filters_false_and_null() -> None:
    result = step("filter", "x > 1 AND tag <> 'skip'").process(
        with_rows({"x": [1, 2, 3, None, 5], "tag": ["a", "a", "skip", "a", None]}, [0, 1, 2, 3, 4]))
    assert result.table[ROW_ID].to_pylist() == [1]
    assert not result.failures


numeric_columns = st.sampled_from([
    (pa.float64(), st.floats() | st.sampled_from([0.0, -0.0, 1e-300, 2.0**53 + 1])),
    (pa.float32(), st.floats(width=32)),
    (pa.int64(), st.integers(-(2**63), 2**63 - 1) | st.sampled_from([2**53 + 1, -(2**53) - 1])),
    (pa.uint64(), st.integers(0, 2**64 - 1)), (pa.int8(), st.integers(-128, 127)),
])
bounds = st.none() | st.floats(allow_nan=False) | st.sampled_from([0.0, 2.0**53, -(2.0**53)])


@settings(max_examples=300, deadline=None)
@given(numeric_columns.flatmap(lambda column: st.tuples(st.just(column[0]), st.lists(
    column[1], min_size=1, max_size=20))), st.booleans(), bounds, bounds, st.booleans(),
    st.integers(0, 20))
def test_numbers_without_nulls_break_the_rules_the_kernels_find_broken(
        column: tuple[pa.DataType, list[float]], not_null: bool, low: float | None,
        high: float | None, allow_nan: bool, cut: int) -> None:
    kind, values = column
    array = pa.array(values, kind)
    chunked = pa.chunked_array([array.slice(0, cut), array.slice(cut)], kind)
    assume(low is None or high is None or low <= high)
    rules = Rules(not_null=not_null, min=low, max=high, allow_nan=allow_nan)
    by_numpy = [(rule, _broken_rows(broken)) for rule, broken in _numeric_violations(chunked, rules)]
    by_kernels = [(rule, _broken_rows(broken))
                  for rule, broken in _kernel_violations("x", chunked, rules)]
    assert by_numpy == by_kernels
