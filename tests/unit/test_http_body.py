"""The http source's body parser: objects, arrays and NDJSON round-trip; anything else is a
BodyError with a reason, never another exception."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from connectors.sources.http import BodyError, parse_body

scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
objects = st.dictionaries(st.text(max_size=8), scalars | st.lists(scalars, max_size=3), max_size=5)


@given(st.lists(objects, max_size=6))
def test_arrays_and_ndjson_round_trip(documents: list[dict[str, object]]) -> None:
    assert parse_body(json.dumps(documents).encode()) == documents
    if len(documents) >= 2:
        assert parse_body("\n".join(json.dumps(d) for d in documents).encode()) == documents


@given(st.binary(max_size=60))
def test_arbitrary_bytes_parse_or_fail_with_a_reason(body: bytes) -> None:
    try:
        documents = parse_body(body)
    except BodyError as exc:
        assert str(exc)
    else:
        assert all(isinstance(document, dict) for document in documents)
