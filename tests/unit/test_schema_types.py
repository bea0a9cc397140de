"""The schema step's coercions, defaults, enums and timestamps, and JSON decoding into it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from streamflow.plugins import ROW_ID
from streamflow.processing.steps import SchemaConfig, SchemaViolation
from streamflow.runtime.stages import StepRunner, decode_input, run_steps
from tests.tables import step, with_rows

UTC_NOON = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def test_numeric_strings_defaults_and_enums() -> None:
    schema = step("schema", {
        "n": {"type": "int", "default": 0},
        "x": {"type": "float", "required": True},
        "unit": {"type": "string", "enum": ["C", "F"]},
    })
    result = schema.process(with_rows({
        "n": ["5", None, "7", "1.5"], "x": ["2.5", "3", None, "1"], "unit": ["C", "K", "F", None],
    }))
    assert result.table.drop_columns([ROW_ID]).to_pylist() == [{"n": 5, "x": 2.5, "unit": "C"}]
    assert [(row, str(error)) for row, error in result.failures] == [
        (1, "field 'unit': 'K' is not one of ['C', 'F']"),
        (2, "required field 'x' is missing or null"),
        (3, "field 'n': '1.5' is not a valid int"),
    ]
    assert all(isinstance(error, SchemaViolation) for _, error in result.failures)


def test_timestamps_from_iso_text_with_offsets_and_epochs_become_utc() -> None:
    seconds = step("schema", {"ts": {"type": "timestamp", "unit": "s"}})
    values = ["2024-01-01T14:00:00+02:00", "2024-01-01T12:00:00Z", "2024-01-01T12:00:00",
              "1704110400", "yesterday"]
    result = seconds.process(with_rows({"ts": values}))
    assert result.table["ts"].to_pylist() == [UTC_NOON] * 4
    assert [row for row, _ in result.failures] == [4]
    millis = step("schema", {"ts": {"type": "timestamp"}})
    assert millis.process(with_rows({"ts": [1704110400000]})).table["ts"].to_pylist() == [UTC_NOON]


@pytest.mark.parametrize("spec", [
    {"type": "int", "default": "x"},
    {"type": "int", "enum": [1, "two"]},
    {"type": "timestamp", "default": "not a time"},
    {"type": "decimal"},
])
def test_defaults_and_enums_must_take_the_type(spec: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SchemaConfig.model_validate({"f": spec})


def test_json_decoding_into_a_schema_step_still_coerces_mismatched_batches() -> None:
    steps = [StepRunner(step("schema", {"n": {"type": "int", "required": True},
                                        "ts": {"type": "timestamp", "unit": "s"}}))]
    values = [b'{"n": 1, "ts": 1704110400}', b'{"n": "2", "ts": "2024-01-01T12:00:00Z"}',
              b'{"n": "x"}', b"garbage"]
    table, failures = decode_input(values, steps)
    out = run_steps(steps, table, failures)
    assert out.drop_columns([ROW_ID]).to_pylist() == [{"n": 1, "ts": UTC_NOON}, {"n": 2, "ts": UTC_NOON}]
    assert sorted((f.row, f.step) for f in failures) == [(2, "schema"), (3, "parse")]
