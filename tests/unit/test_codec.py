"""JSON ↔ Arrow: arbitrary input never crashes decoding, and every record is accounted for."""

from __future__ import annotations

import json

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from streamflow.plugins import ROW_ID
from streamflow.processing.codec import decode_json, encode_json

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.float64()), ("n", pa.int64()), ("ok", pa.bool_())])

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(
    allow_nan=False, allow_infinity=False
) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                      max_size=3),
    max_leaves=8,
)


def accounted(values: list[bytes | None], schema: pa.Schema | None) -> None:
    table, failures = decode_json(values, schema)
    decoded_rows = table[ROW_ID].to_pylist()
    failed_rows = [row for row, _error in failures]
    assert sorted(decoded_rows + failed_rows) == list(range(len(values)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=40) | st.none(), max_size=20))
def test_arbitrary_bytes_never_crash_and_are_accounted_for(values: list[bytes | None]) -> None:
    accounted(values, None)
    accounted(values, SCHEMA)


@settings(max_examples=150, deadline=None)
@given(st.lists(json_values, max_size=20))
def test_arbitrary_json_never_crashes_and_is_accounted_for(documents: list[object]) -> None:
    values = [json.dumps(document).encode() for document in documents]
    accounted(values, None)
    accounted(values, SCHEMA)


records = st.fixed_dictionaries({
    "id": st.text(max_size=30),
    "x": st.floats(allow_nan=False, allow_infinity=False, width=64),
    "n": st.integers(-(2**62), 2**62),
    "ok": st.booleans() | st.none(),
})


@settings(max_examples=200, deadline=None)
@given(st.lists(records, min_size=1, max_size=30))
def test_encode_then_decode_round_trips(rows: list[dict[str, object]]) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    encoded = encode_json(table)
    assert [json.loads(value) for value in encoded] == rows
    decoded, failures = decode_json(encoded, SCHEMA)
    assert not failures
    assert decoded.drop_columns([ROW_ID]).to_pylist() == rows


def test_bad_records_are_isolated_from_good_ones() -> None:
    values = [
        b'{"id":"a","x":1.5}',
        b"{not json",
        b'{"id":"b","x":"hot"}',
        b"[1,2]",
        b"",
        b'{"id":"c",\n"x":2}',
    ]
    table, failures = decode_json(values, SCHEMA)
    assert table[ROW_ID].to_pylist() == [0, 5]
    assert table["x"].to_pylist() == [1.5, 2.0]
    assert [row for row, _ in failures] == [1, 2, 3, 4]
    assert "invalid JSON" in str(failures[0][1])
    assert "expected a JSON object" in str(failures[2][1])


def test_encoding_escapes_strings_and_keeps_floats_floats() -> None:
    table = pa.table({"s": ['quote " and \\ and \n and é', None], "f": [21.0, float("nan")]})
    encoded = encode_json(table)
    assert json.loads(encoded[0]) == {"s": 'quote " and \\ and \n and é', "f": 21.0}
    assert b'"f":21.0' in encoded[0]
    assert json.loads(encoded[1]) == {"s": None, "f": None}



def test_encoding_reads_sliced_and_chunked_columns_and_whole_floats() -> None:
    whole = pa.table({"s": ["plain", 'a "quote"', "back\\slash", "é", "", "tab\there"],
                      "f": [21.0, 1e21, -0.0, 0.5, 1e-7, 3.0]})
    table = pa.concat_tables([whole.slice(1, 2), whole.slice(4)])  # offsets into shared buffers
    assert encode_json(table) == [
        b'{"s":"a \\"quote\\"","f":1e+21}',
        b'{"s":"back\\\\slash","f":-0.0}',
        b'{"s":"","f":1e-7}',
        b'{"s":"tab\\there","f":3.0}',
    ]


float_values = st.none() | st.floats(width=64) | st.sampled_from([21.0, -0.0, 1e21, 1e-7, 3.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(float_values, float_values, float_values, float_values), max_size=12),
       st.integers(0, 12))
def test_a_float_column_is_written_as_it_would_be_alone(
        rows: list[tuple[float | None, ...]], cut: int) -> None:
    """Float columns of one type are formatted together: each one's text is the same as when
    it is the table's only column, whatever its chunks."""
    columns = {
        "a": pa.array([row[0] for row in rows], pa.float64()),
        "s": pa.array([str(row[1]) for row in rows]),
        "b": pa.array([row[1] for row in rows], pa.float64()),
        "h": pa.array([row[2] for row in rows], pa.float32()),
        "c": pa.array([row[3] for row in rows], pa.float64()),
    }
    table = pa.table(columns)
    table = pa.concat_tables([table.slice(0, cut), table.slice(cut)])
    alone = [encode_json(table.select([name])) for name in table.column_names]
    expected = [b"{" + b",".join(texts[row][1:-1] for texts in alone) + b"}"
                for row in range(table.num_rows)]
    assert encode_json(table) == expected
