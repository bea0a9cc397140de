"""Property tests: a stage's decode and steps never raise on arbitrary input, and every record
is passed on, filtered or dead-lettered exactly once."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streamflow.plugins import ROW_ID
from streamflow.runtime.dead_letters import Failure
from streamflow.runtime.stages import StepRunner, decode_input, run_steps
from tests.tables import step
from tests.unit.test_codec import json_values

JSON_STEPS: list[tuple[str, Any]] = [
    ("schema", {"id": {"type": "string", "default": "none"}, "x": {"type": "float"},
                "n": {"type": "int", "enum": [1, 2, 3]}, "ts": {"type": "timestamp", "unit": "s"}}),
    ("normalize", {"id": ["trim", "lower", "nfc"]}),
    ("fill_null", {"x": 0.0}),
    ("validate", {"x": {"min": -1000, "max": 1000}, "id": {"regex": "[a-z]*"}}),
    ("filter", "n IS NULL OR n < 3"),
    ("dedupe", {"key": ["id", "n"], "window_s": 60}),
    ("route", {"routes": [{"when": "x > 0", "topic": "positive"}]}),
    ("rename", {"x": "value"}),
    ("select", ["id", "value", "n", "ts"]),
    ("python", {"function": "tests.step_functions:double_x", "mode": "record"}),
]
RAW_STEPS: list[tuple[str, Any]] = [
    ("parse", {"format": "csv", "columns": ["id", "x"]}),
    ("schema", {"id": {"type": "string", "required": True}, "x": {"type": "int"}}),
    ("drop", ["id"]),
]


def reconcile(values: list[bytes | None], kinds: list[tuple[str, Any]]) -> None:
    steps = [StepRunner(step(kind, settings)) for kind, settings in kinds]
    failures: list[Failure] = []
    table, failures = decode_input(values, steps)
    out = run_steps(steps, table, failures)
    passed = set(out[ROW_ID].to_pylist())
    failed = [failure.row for failure in failures]
    assert len(failed) == len(set(failed)), "a record was dead-lettered twice"
    assert not passed & set(failed), "a record was both passed on and dead-lettered"
    assert passed | set(failed) <= set(range(len(values)))
    filtered = len(values) - len(passed) - len(failed)
    assert filtered >= 0


@settings(max_examples=60, deadline=None)
@given(st.lists(json_values, max_size=15))
def test_arbitrary_json_through_many_steps_reconciles(documents: list[object]) -> None:
    reconcile([json.dumps(document).encode() for document in documents], JSON_STEPS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40) | st.none(), max_size=15))
def test_arbitrary_bytes_through_json_and_parse_stages_reconcile(values: list[bytes | None]) -> None:
    reconcile(values, JSON_STEPS)
    reconcile(values, RAW_STEPS)
