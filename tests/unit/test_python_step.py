"""The python step: record and batch modes, failures per record."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamflow.plugins import ROW_ID
from streamflow.processing.python_step import PythonConfig
from tests.tables import step, with_rows


def test_record_mode_maps_filters_explodes_and_fails_one_record() -> None:
    python = step("python", {"function": "tests.step_functions:double_x", "mode": "record"})
    table = with_rows({"x": [1, 0, None, 3], "parts": [None, None, None, ["p", "q"]]}, [5, 6, 7, 8])
    result = python.process(table)
    assert result.table.to_pylist() == [
        {"x": 2, "parts": None, "part": None, ROW_ID: 5},
        {"x": 3, "parts": None, "part": "p", ROW_ID: 8},
        {"x": 3, "parts": None, "part": "q", ROW_ID: 8},
    ]
    assert [(row, type(error).__name__) for row, error in result.failures] == [(2, "TypeError")]


def test_batch_mode_transforms_the_table() -> None:
    python = step("python", {"function": "tests.step_functions:add_one_batch", "mode": "batch"})
    assert python.process(with_rows({"x": [1, 2]})).table["x"].to_pylist() == [2, 3]
    bad = step("python", {"function": "tests.step_functions:not_a_table", "mode": "batch"})
    with pytest.raises(TypeError, match=r"not a pyarrow\.Table"):
        bad.process(with_rows({"x": [1]}))


@pytest.mark.parametrize("function", ["tests.step_functions:missing", "nowhere.module:f", "no colon"])
def test_functions_that_cannot_be_imported_are_config_errors(function: str) -> None:
    with pytest.raises(ValidationError):
        PythonConfig.model_validate({"function": function})
