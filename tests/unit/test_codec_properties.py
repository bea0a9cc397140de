"""Hostile record batches through the JSON decoder and a stage: every record is, exactly once,
in the output (by its ``_sf_row``) or a failure, and no record decides the fate of another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.sources.file import FileConfig, FileSource
from streamflow.plugins import ROW_ID, ComponentContext
from streamflow.processing.codec import MAX_DEPTH, DecodeError, decode_json, encode_json, user_fields
from streamflow.processing.steps import HIDDEN_PREFIX
from streamflow.runtime.dead_letters import Failure
from streamflow.runtime.stages import StepRunner, decode_input, output_batches, run_steps
from tests.tables import step

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.float64()), ("n", pa.int64()), ("ok", pa.bool_())])
MODES = [(None, False), (None, True), (SCHEMA, False), (SCHEMA, True)]
HOSTILE_SETTINGS = settings(max_examples=200, deadline=None)

# Field names that collide with the runtime's columns or its escape, and other odd ones.
names = st.sampled_from(["id", "x", "n", "ok", ROW_ID, "_sf_topic", "_sf~_sf_row", "_sf~", "", "é",
                         "a b", "\x00", "Id"]) | st.text(max_size=6)
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
documents = st.recursive(scalars, lambda children: st.lists(children, max_size=3)
                         | st.dictionaries(names, children, max_size=3), max_leaves=10)
objects = st.dictionaries(names, documents, max_size=5)
valid_objects = st.builds(lambda document, ascii_only: json.dumps(document, ensure_ascii=ascii_only).encode(),
                          objects, st.booleans())
type_mixes = st.sampled_from([1, 2.5, "a", "", [1], [1, "a"], {"y": 1}, None, True, 10**30]).map(
    lambda value: json.dumps({"x": value}).encode())
# Records that no mode decodes.
NEVER = [
    None, b"", b" ", b"[1,2]", b"[]", b"null", b"1", b'"text"', b"{", b"{not json", b'{"a":1,}',
    b'{"a":1} x', b'{"a":1}{"a":2}', b'{"a":1}\n{"a":2}', b'{"s":"\xff"}', b'{"\xc3":1}', b'{"a":1}\xff',
    b'{"s":"\xed\xa0\x80"}', b'{"s":"\\ud800"}', b'{"\\udfff":1}', b'{"s":["\\udc00"]}',
    b'{"x":1e400}', b'{"x":-1e400}', b'{"o":[1e999]}',
]


def nested(depth: int, kind: str) -> bytes:
    """A record nesting ``depth`` objects and arrays in all (``open``: arrays never closed)."""
    if kind == "objects":
        return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    if kind == "open":
        return b'{"a":' + b"[" * (depth - 1)
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


too_deep = st.integers(MAX_DEPTH + 1, MAX_DEPTH + 300) | st.sampled_from([10_000, 100_000])
deep_values = st.builds(nested, too_deep, st.sampled_from(["arrays", "objects", "open"]))
never = st.sampled_from(NEVER) | deep_values | st.binary(max_size=30).map(lambda garbage: b"\xff" + garbage)
odd = st.sampled_from([
    b'{"x":NaN}', b'{"x":Infinity}', b'{"x":-Infinity}', b'{"x":1e-400}', b'\xef\xbb\xbf{"x":1}',
    b'{"a":1,"a":2}', b'{"x":1,"x":2}', b'{"o":{"k":1,"k":2}}',
    b'{"a":\n1}', b'{\r\n"a":1}', b'{"s":"\\ud83d\\ude00"}', b'{"s":"' + b"[" * 1000 + b'"}',
]) | st.builds(nested, st.integers(1, MAX_DEPTH), st.sampled_from(["arrays", "objects"]))
hostile = st.lists(valid_objects | type_mixes | never | odd | st.binary(max_size=30), max_size=25)


def decoded(
    values: list[bytes | None], schema: pa.Schema | None, lenient: bool
) -> tuple[list[int], list[int]]:
    """The output rows and the failed rows, after checking that they partition the input."""
    table, failures = decode_json(values, schema, lenient=lenient)
    rows = table[ROW_ID].to_pylist()
    failed = [row for row, _error in failures]
    assert sorted(rows + failed) == list(range(len(values))), (rows, failed)
    assert all(isinstance(error, DecodeError) and str(error) for _row, error in failures)
    table.validate(full=True)  # valid UTF-8 in every string and name
    fields = user_fields(table)
    assert not [name for name in table.column_names if name.startswith(HIDDEN_PREFIX) and name != ROW_ID]
    for text in encode_json(fields):
        assert isinstance(json.loads(text.decode()), dict)
    return rows, failed


@HOSTILE_SETTINGS
@given(hostile)
def test_every_record_is_output_or_failed_exactly_once(values: list[bytes | None]) -> None:
    for schema, lenient in MODES:
        decoded(values, schema, lenient)


good_records = st.fixed_dictionaries({
    "id": st.text(max_size=10),
    "x": st.floats(allow_nan=False, allow_infinity=False),
    "n": st.integers(-(2**62), 2**62),
    "ok": st.booleans() | st.none(),
}).map(lambda record: json.dumps(record).encode())
conflicts = st.sampled_from([b'{"x":"hot"}', b'{"id":"c","x":[1]}', b'{"n":"many","ok":"yes"}'])
tagged = st.lists(st.tuples(st.just("good"), good_records) | st.tuples(st.just("never"), never)
                  | st.tuples(st.just("conflict"), conflicts), max_size=25)


@HOSTILE_SETTINGS
@given(tagged)
def test_a_record_fails_for_itself_only(entries: list[tuple[str, bytes | None]]) -> None:
    values = [value for _kind, value in entries]
    indices = {kind: [i for i, (tag, _value) in enumerate(entries) if tag == kind]
               for kind in ("good", "never", "conflict")}
    assert decoded(values, SCHEMA, True) == (sorted(indices["good"] + indices["conflict"]), indices["never"])
    assert decoded(values, SCHEMA, False) == (indices["good"], sorted(indices["never"] + indices["conflict"]))
    kept = [(kind, value) for kind, value in entries if kind != "conflict"]
    good = [i for i, (kind, _value) in enumerate(kept) if kind == "good"]
    for lenient in (False, True):
        assert decoded([value for _kind, value in kept], None, lenient)[0] == good


def through_stage(values: list[bytes | None], kinds: list[tuple[str, Any]]) -> tuple[pa.Table, list[Failure]]:
    """A stage's decode and steps; checks that each record is passed, filtered or failed once."""
    steps = [StepRunner(step(kind, settings)) for kind, settings in kinds]
    table, failures = decode_input(values, steps)
    out = run_steps(steps, table, failures)
    passed = out[ROW_ID].to_pylist()
    failed = [failure.row for failure in failures]
    assert len(set(passed)) == len(passed) and len(set(failed)) == len(failed)
    assert not set(passed) & set(failed)
    assert set(passed) | set(failed) <= set(range(len(values)))
    return out, failures


PYTHON_STEP = ("python", {"function": "tests.step_functions:double_x", "mode": "record"})
STAGES: list[list[tuple[str, Any]]] = [
    [("parse", {"format": "json"})],
    [("schema", {"id": {"type": "string"}, "x": {"type": "float"}, "n": {"type": "int"}})],
    [PYTHON_STEP],
]


@settings(max_examples=100, deadline=None)
@given(hostile)
def test_hostile_batches_through_stages_reconcile(values: list[bytes | None]) -> None:
    for kinds in STAGES:
        out, _failures = through_stage(values, kinds)
        for batch in output_batches(out, "out", [None] * len(values), [None] * len(values)):
            assert batch.topic == "out", "a record field chose the topic"
            for text in batch.values:
                json.loads(text.decode())


# Regression tests for the cases of issue 13.

def test_slow_path_failures_are_the_records_that_fail() -> None:
    values = [b'{"id":"a","x":1}', b"[1]", b'{"x":1} trailing', b'{"x":1}{"x":2}', b'{"id":"\xff"}',
              b'{"x":"hot"}', b'{"x":1,"x":2}', b'{"x":1e400}', b'{"id":"b","x":2}']
    for schema in (SCHEMA, None):
        table, failures = decode_json(values, schema, lenient=True)
        assert table[ROW_ID].to_pylist() == [0, 5, 6, 8]
        assert table["x"].to_pylist() == ["1", "hot", "2", "2"]  # as text: the records disagree
        assert [row for row, _ in failures] == [1, 2, 3, 4, 7]
    table, failures = decode_json(values, SCHEMA)
    assert table[ROW_ID].to_pylist() == [0, 8]
    assert [row for row, _ in failures] == [1, 2, 3, 4, 5, 6, 7]
    messages = [str(error) for _row, error in failures]
    assert "expected a JSON object" in messages[0] and "not UTF-8" in messages[3]
    assert "specified twice" in messages[5] and "too large for a double" in messages[6]


def test_a_type_conflict_fails_only_the_records_that_hold_it() -> None:
    table, failures = decode_json([b'{"x":1}', b'{"x":"a"}', b'{"y":2}', b'{"x":2,"y":3}'])
    assert table[ROW_ID].to_pylist() == [0, 2, 3]
    assert [row for row, _ in failures] == [1]
    assert "field types conflict" in str(failures[0][1])


def test_deep_nesting_fails_its_record_in_a_fast_path_batch() -> None:
    script = (
        "from streamflow.processing.codec import decode_json\n"
        "deep = b'{\"a\":' + b'[' * 100_000 + b']' * 100_000 + b'}'\n"
        "table, failures = decode_json([b'{\"a\":[1]}', deep, b'{\"a\":[2]}'])\n"
        "print(table['_sf_row'].to_pylist(), [(row, str(error)) for row, error in failures])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == f"[0, 2] [(1, 'nesting deeper than {MAX_DEPTH} arrays and objects')]"


def test_deep_nesting_in_a_parse_stage_is_dead_lettered_alone() -> None:
    values = [b'{"a":1}', nested(10_000, "arrays"), nested(MAX_DEPTH, "arrays"),
              nested(MAX_DEPTH + 1, "objects"), nested(MAX_DEPTH, "objects")]
    out, failures = through_stage(values, [("parse", {"format": "json"})])
    assert out[ROW_ID].to_pylist() == [0, 2, 4]
    assert [(f.row, str(f.error)) for f in failures] == [
        (1, f"nesting deeper than {MAX_DEPTH} arrays and objects"),
        (3, f"nesting deeper than {MAX_DEPTH} arrays and objects"),
    ]


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = "[{" * 50_000
    table, failures = decode_json([json.dumps({"s": text}).encode(), b'{"s":"b"}'])
    assert not failures
    assert table["s"].to_pylist() == [text, "b"]


@pytest.mark.parametrize("kinds", [[("schema", {"id": {"type": "string"}, "x": {"type": "float"}})],
                                   [("parse", {"format": "json"})]])
def test_a_lone_surrogate_beside_a_type_conflict_fails_alone(kinds: list[tuple[str, Any]]) -> None:
    values = [b'{"id":"a","x":1.5}', b'{"id":"\\ud800","x":2}', b'{"id":"b","x":"3"}', b'{"id":"c"}']
    out, failures = through_stage(values, kinds)
    assert out[ROW_ID].to_pylist() == [0, 2, 3]
    assert [f.row for f in failures] == [1]
    assert "unpaired surrogate" in str(failures[0].error)


@pytest.mark.parametrize("kinds", [[], [("sql", "SELECT * FROM batch")], [("parse", {"format": "json"})],
                                   [PYTHON_STEP],
                                   [("route", {"routes": [{"when": "x > 0", "topic": "positive"}]})]])
def test_fields_named_like_the_runtime_columns_are_data(kinds: list[tuple[str, Any]]) -> None:
    values = [b'{"x":1,"_sf_row":"mine","_sf_topic":"elsewhere","_sf~":0}', b'{"x":2,"_sf_row":"7"}']
    out, failures = through_stage(values, kinds)
    assert not failures
    assert out[ROW_ID].to_pylist() == [0, 1]
    produced = {batch.topic: [json.loads(value) for value in batch.values]
                for batch in output_batches(out, "out", [None, None], [None, None])}
    x = 2 if kinds and kinds[0][0] == "python" else 1
    topic = "positive" if kinds and kinds[0][0] == "route" else "out"
    assert produced == {topic: [{"x": x, "_sf_row": "mine", "_sf_topic": "elsewhere", "_sf~": 0},
                                {"x": 2 * x, "_sf_row": "7", "_sf_topic": None, "_sf~": None}]}


def test_csv_columns_named_like_the_runtime_columns_are_data() -> None:
    out, failures = through_stage([b"_sf_row,x\n5,a\n"], [("parse", {"format": "csv", "header": True})])
    assert not failures
    assert user_fields(out).to_pylist() == [{"_sf_row": "5", "x": "a"}]


def test_a_csv_line_that_is_not_utf8_is_dead_lettered_and_the_file_flows(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_bytes(b"id,t\xff\na,1\nb\xff\xfe,2\n\"c\rd\",3\ne\rf,4\ng,5\n")
    source = FileSource(FileConfig(path=str(tmp_path / "data.csv"), format="csv"), ComponentContext("p", "f"))
    source.open(None)
    values: list[bytes] = []
    while (batch := source.poll(100, 0.01)) is not None:
        values += batch.values
    assert values[1] == b"b\xff\xfe,2" and values[3] == b"e\rf,4"
    table, failures = decode_json(values)
    assert table[ROW_ID].to_pylist() == [0, 2, 4]
    assert [row for row, _ in failures] == [1, 3]
    assert user_fields(table).to_pylist() == [{"id": "a", "t\ufffd": 1}, {"id": "c\rd", "t\ufffd": 3},
                                             {"id": "g", "t\ufffd": 5}]


def test_lists_of_nulls_decode_to_valid_columns() -> None:
    table, failures = decode_json([b'{"a":[null,null],"b":{"c":[[null,null,null]]}}', b'{"a":[]}'])
    assert not failures
    table.validate(full=True)
    assert user_fields(table).to_pylist() == [{"a": [None, None], "b": {"c": [[None, None, None]]}},
                                              {"a": [], "b": None}]
