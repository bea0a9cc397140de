"""JSON ↔ Arrow: arbitrary input never crashes decoding, every record is accounted for, and small
batches are read and written exactly as the Arrow reader and kernels read and write them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamflow.plugins import ROW_ID
from streamflow.processing import codec
from streamflow.processing.codec import _double_json, decode_json, encode_json

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


@contextmanager
def arrow_only() -> Iterator[None]:
    """No batch is small: the Arrow reader and kernels take every one."""
    small, codec.SMALL_READ, codec.SMALL_WRITE = (codec.SMALL_READ, codec.SMALL_WRITE), 0, 0
    try:
        yield
    finally:
        codec.SMALL_READ, codec.SMALL_WRITE = small


def by_kernels(table: pa.Table) -> list[bytes]:
    """encode_json's text for ``table`` as its Arrow kernels write a batch of any size."""
    with arrow_only():
        return encode_json(table)


EDGE_DOUBLES = [0.0, -0.0, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 1e-6,
                9.99999e-7, 1e-7, 1.25e-5, 999999999.5, 1e9, 1e10, 1.5e10, 9999999999.0, 1e15,
                1e16, 1e21, 1e22, 2.0**53, 123456.789, float("nan"), float("inf"), float("-inf")]
plain_columns = st.sampled_from([
    (pa.float64(), st.floats() | st.sampled_from(EDGE_DOUBLES)
     | st.integers(-2000, 2000).map(lambda power: 10.0**(power / 100))),
    (pa.string(), st.text(max_size=8)), (pa.large_string(), st.text(max_size=4)),
    (pa.int64(), st.integers(-(2**63), 2**63 - 1)), (pa.uint64(), st.integers(0, 2**64 - 1)),
    (pa.int8(), st.integers(-128, 127)), (pa.bool_(), st.booleans()),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=4), plain_columns), min_size=1, max_size=5),
       st.integers(1, codec.SMALL_WRITE), st.data())
def test_small_batches_are_written_value_by_value_as_the_kernels_write_them(
        columns: list[tuple[str, tuple[pa.DataType, st.SearchStrategy[object]]]], rows: int,
        data: st.DataObject) -> None:
    arrays = [pa.array(data.draw(st.lists(st.none() | values, min_size=rows, max_size=rows)), kind)
              for _name, (kind, values) in columns]
    table = pa.Table.from_arrays(arrays, names=[name for name, _column in columns])
    cut = data.draw(st.integers(0, rows))
    for chunked in (table, pa.concat_tables([table.slice(0, cut), table.slice(cut)])):
        assert encode_json(chunked) == by_kernels(chunked)


def test_a_double_is_written_as_the_kernels_write_it() -> None:
    rng = np.random.default_rng(7)
    doubles = [*EDGE_DOUBLES, *rng.integers(0, 2**64, 20_000, dtype=np.uint64).view(np.float64).tolist(),
               *(10.0 ** rng.uniform(-12, 25, 20_000) * rng.choice([-1, 1], 20_000)).tolist()]
    written = [_double_json(value) for value in doubles]
    kernels = [text[len(b'{"x":'):-1].decode() for text in by_kernels(pa.table({"x": doubles}))]
    assert written == kernels


# JSON texts of SCHEMA's fields: mostly of the field's own kind, sometimes odd in some way.
ODD_TEXTS = [
    "-0", "-0.0", "-0e0", "9007199254740993", "-9007199254740993", "9223372036854775808",
    "-9223372036854775809", "1e400", "2e308", "1.5E+300", "1e-400", "4.9e-324", "NaN", "Infinity",
    "-Infinity", "1" + "0" * 400, "1" + "0" * 400 + ".5", '"\\u00e9"', '"é"', '"\\ud800"', '"1.5"',
    "[1e400]", '{"q":NaN}', '{"q":1,"q":2}', "[[[[[]]]]]", "1.0", "true", '"a"', "null",
]
odd_texts = st.sampled_from(ODD_TEXTS) | st.builds(
    json.dumps, st.floats() | st.integers(-(2**65), 2**65) | st.text(max_size=6))
own_texts = {
    "id": st.builds(json.dumps, st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6)),
    "x": st.builds(json.dumps, st.floats(allow_nan=False, allow_infinity=False)
                   | st.integers(-(2**53), 2**53)),
    "n": st.builds(json.dumps, st.integers(-(2**63), 2**63 - 1)),
    "ok": st.sampled_from(["true", "false"]),
    "other": st.sampled_from(["[]", "[1,2.5]", '{"q":[null]}', '"a"', "3"]),
}


@st.composite
def small_batches(draw: st.DrawFn) -> list[bytes]:
    """JSON objects of SCHEMA's fields (and one more), each field of its own kind but, in some
    batches, one: odd in some way or named twice."""
    records = [list(fields.items()) for fields in draw(st.lists(
        st.fixed_dictionaries({}, optional=own_texts), min_size=1, max_size=12))]
    if draw(st.booleans()):
        fields = draw(st.sampled_from(records))
        odd = (draw(st.sampled_from(sorted(own_texts))), draw(odd_texts))
        if fields and draw(st.booleans()):
            fields[draw(st.integers(0, len(fields) - 1))] = odd
        else:
            fields.append(odd)  # perhaps a field named twice
    spaced = draw(st.booleans())
    return [("{" + (", " if spaced else ",").join(
        f'"{name}":{" " if spaced else ""}{text}' for name, text in fields) + "}").encode()
        for fields in records]


def assert_read_as_by_the_reader(values: list[bytes], lenient: bool) -> None:
    by_record = decode_json(values, SCHEMA, lenient=lenient)
    with arrow_only():
        by_reader = decode_json(values, SCHEMA, lenient=lenient)
    assert by_record[0].schema == by_reader[0].schema
    assert repr(by_record[0].to_pylist()) == repr(by_reader[0].to_pylist())  # -0.0 is not 0.0
    assert [(row, repr(error)) for row, error in by_record[1]] == [
        (row, repr(error)) for row, error in by_reader[1]]


@settings(max_examples=400, deadline=None)
@given(small_batches(), st.booleans())
def test_small_batches_read_record_by_record_as_the_arrow_reader_reads_them(
        values: list[bytes], lenient: bool) -> None:
    assert_read_as_by_the_reader(values, lenient)


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("name", sorted(own_texts))
def test_each_odd_value_reads_as_the_arrow_reader_reads_it(name: str, lenient: bool) -> None:
    plain = b'{"id":"a","x":1.5,"n":2,"ok":false}'
    for text in ODD_TEXTS:
        assert_read_as_by_the_reader([plain, f'{{"{name}":{text}}}'.encode()], lenient)
        assert_read_as_by_the_reader([plain, f'{{"{name}":{text},"{name}":null}}'.encode()], lenient)
    for text in (b'"\xed\xa0\x80"', b'"\xff"', b'"\xc3\xa9"', b'1}\r', b'1\r}'):
        assert_read_as_by_the_reader([plain, b'{"%s":%s}' % (name.encode(), text)], lenient)


@pytest.mark.parametrize("lenient", [False, True])
def test_records_that_are_not_exactly_one_object_read_as_by_the_reader(lenient: bool) -> None:
    plain = b'{"id":"a","x":1.5,"n":2,"ok":false}'
    for odd in ([b'{"id":"b"} ', b'{"id":"c"}\t'], [b'{"id":"b"},{"id":"c"}'], [b'{"id":"b"} 5'],
                [b'{"id":"', b'{"n":"}', b'{},{}'], [b'{"id":"b"', b'}']):
        assert_read_as_by_the_reader([plain, *odd], lenient)


def test_a_small_plain_batch_needs_no_arrow_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_args: object) -> pa.Table:
        raise AssertionError("the Arrow reader was called")

    monkeypatch.setattr(codec, "_read", refused)
    values = [b'{"id":"a","x":-2,"n":3,"ok":true,"other":[1,{"q":null}]}', b'{"x":0.5,"n":null}']
    table, failures = decode_json(values, SCHEMA)
    assert failures == []
    assert table.drop_columns([ROW_ID]).to_pylist() == [
        {"id": "a", "x": -2.0, "n": 3, "ok": True}, {"id": None, "x": 0.5, "n": None, "ok": None}]
