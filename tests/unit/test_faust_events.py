"""Parsing records for Faust agents: JSON objects pass, anything else is a DecodeError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamflow.processing.codec import DecodeError
from streamflow.runtime.faust_stage import parse_event

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), JSON_VALUES))
def test_json_objects_parse_to_themselves(document: dict[str, object]) -> None:
    assert parse_event(json.dumps(document).encode()) == document


@given(st.binary())
def test_any_bytes_parse_to_an_object_or_a_decode_error(value: bytes) -> None:
    try:
        parsed = parse_event(value)
    except DecodeError:
        return
    assert isinstance(parsed, dict)


@pytest.mark.parametrize(("value", "message"), [
    (b"", "empty record value"),
    (None, "empty record value"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"{not json", "invalid JSON"),
    (b"\xff\xfe", "invalid JSON"),
])
def test_decode_errors_say_why(value: bytes | None, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        parse_event(value)
