"""Field steps: select, rename, drop, fill_null, normalize."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from streamflow.config.loader import step_settings
from streamflow.config.models import StepConfig
from streamflow.plugins import ROW_ID
from tests.tables import step, with_rows

TOPIC = "_sf_topic"


def test_select_keeps_listed_fields_in_order_and_the_hidden_columns() -> None:
    table = with_rows({"a": [1, 2], "b": ["x", "y"], "c": [0.5, 1.5]}, [4, 5])
    table = table.append_column(TOPIC, pa.array(["t1", None]))
    result = step("select", ["c", "a", "missing"]).process(table).table
    assert result.column_names == ["c", "a", "missing", ROW_ID, TOPIC]
    assert result["missing"].null_count == 2
    assert result[ROW_ID].to_pylist() == [4, 5]


def test_rename_replaces_an_existing_field_and_skips_absent_ones() -> None:
    table = with_rows({"t": [1], "temperature": [9], "z": [0]})
    result = step("rename", {"t": "temperature", "absent": "q"}).process(table).table
    assert result.column_names == ["temperature", "z", ROW_ID]
    assert result["temperature"].to_pylist() == [1]


def test_drop_removes_fields() -> None:
    result = step("drop", ["a", "nope"]).process(with_rows({"a": [1], "b": [2]})).table
    assert result.column_names == ["b", ROW_ID]


def test_fill_null_fills_nulls_and_absent_fields() -> None:
    table = with_rows({"x": [1.0, None], "site": [None, "b"], "empty": pa.nulls(2)})
    result = step("fill_null", {"x": 0, "site": "unknown", "empty": 7, "new": True}).process(table).table
    assert result.drop_columns([ROW_ID]).to_pylist() == [
        {"x": 1.0, "site": "unknown", "empty": 7, "new": True},
        {"x": 0.0, "site": "b", "empty": 7, "new": True},
    ]


def test_fill_null_with_a_value_of_the_wrong_type_names_the_field() -> None:
    with pytest.raises(TypeError, match="'x'"):
        step("fill_null", {"x": "zero"}).process(with_rows({"x": [1, None]}))


def test_normalize_trims_changes_case_and_composes_unicode() -> None:
    table = with_rows({"name": ["  Cafe\u0301 ", None], "code": ["ab", "Cd"], "n": [1, 2]})
    result = step("normalize", {"name": ["trim", "lower", "nfc"], "code": ["upper"]}).process(table).table
    assert result["name"].to_pylist() == ["caf\u00e9", None]
    assert result["code"].to_pylist() == ["AB", "CD"]
    with pytest.raises(TypeError, match="'n'"):
        step("normalize", {"n": ["trim"]}).process(table)


@pytest.mark.parametrize("kind,settings", [
    ("select", []),
    ("select", ["_sf_row"]),
    ("rename", {"a": "c", "b": "c"}),
    ("normalize", {"a": ["lower", "upper"]}),
    ("normalize", {"a": ["titlecase"]}),
])
def test_bad_settings_are_config_errors(kind: str, settings: object) -> None:
    with pytest.raises(ValidationError):
        step_settings(StepConfig.model_validate({kind: settings}))
