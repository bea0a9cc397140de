"""validate and filter steps."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamflow.plugins import ROW_ID
from streamflow.processing.validation import ValidateConfig
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
