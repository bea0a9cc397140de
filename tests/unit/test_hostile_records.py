"""The fuzz harness of issue 13, in process: hostile records (tests/hostile.py) through each
decoder (JSON in every mode, CSV, Avro) and a processor stage with typical steps. Every record
is, exactly once, in the output (traced by its ``id`` and position) or a failure; a record that
must not decode never comes out; a good record is never failed by its neighbours."""

from __future__ import annotations

import functools
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from connectors.sinks.parquet import ParquetConfig, ParquetSink
from streamflow.plugins import ROW_ID, ComponentContext, SinkRecordError
from streamflow.processing.codec import decode_json, user_fields
from streamflow.runtime.stages import StepRunner, decode_input, output_batches, run_steps
from tests.hostile import (
    AVRO_SCHEMA,
    BAD,
    CSV_COLUMNS,
    FAMILIES,
    GOOD,
    ODD,
    STAGE_STEPS,
    Hostile,
    Tally,
    avro_batches,
    csv_batches,
    filtered_by_stage,
    generate,
    hostile_batches,
    nested,
)
from tests.tables import step

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
SCHEMA = pa.schema([("id", pa.int64()), ("x", pa.float64()), ("name", pa.string())])

def tally(stage: str, records: list[Hostile], out_rows: list[int], failed_rows: list[int],
          filtered: int = 0) -> Tally:
    """A tally of a batch whose records are traced by their position."""
    return Tally(stage, {record.n: record for record in records}, [records[row].n for row in out_rows],
                 [records[row].n for row in failed_rows], filtered)


def ids_match(table: pa.Table, records: list[Hostile], as_text: bool = False) -> None:
    """Each output row's ``id`` field is the trace number of the record it came from."""
    ids = user_fields(table).column("id").to_pylist()
    expected = [records[row].n for row in table[ROW_ID].to_pylist()]
    assert ids == ([str(n) for n in expected] if as_text else expected), "a row taken for another record"


def check_json(records: list[Hostile], schema: pa.Schema | None, lenient: bool) -> None:
    if schema is not None:  # the overflowing number is in a field the schema drops unread
        records = [replace(record, kind=ODD) if record.family == "overflow" else record for record in records]
    table, failures = decode_json([record.value for record in records], schema, lenient=lenient)
    table.validate(full=True)
    failed = [row for row, _error in failures]
    # Strict decoding without a schema types a field by the first record that has it, so a
    # good record after a type mix may fail: only lenient or schema'd decoding spares it.
    tally(f"decode_json(schema={schema is not None}, lenient={lenient})", records,
          table[ROW_ID].to_pylist(), failed).check(good_passes=lenient)
    if table.num_rows and "id" in user_fields(table).column_names:
        ids_match(table, records)


@FUZZ
@given(hostile_batches())
def test_json_decoder_partitions_hostile_records(records: list[Hostile]) -> None:
    for schema in (None, SCHEMA):
        for lenient in (False, True):
            check_json(records, schema, lenient)


@functools.cache
def stage_steps() -> list[StepRunner]:
    """The stage's steps, made once (each SQL step opens a DuckDB connection)."""
    return [StepRunner(step(kind, options)) for kind, options in STAGE_STEPS]


def through_stage(records: list[Hostile]) -> dict[str, int]:
    """The processor stage's decode and steps, then its output records as produced; returns
    the tally's counts."""
    runners = stage_steps()
    values = [record.value for record in records]
    table, failures = decode_input(values, runners)
    out = run_steps(runners, table, failures)
    rows = out[ROW_ID].to_pylist()
    missing = len(records) - len(rows) - len(failures)
    counts = tally("processor", records, rows, [failure.row for failure in failures], missing).check(
        filtered_ok=filtered_by_stage)
    for failure in failures:
        if records[failure.row].kind == BAD:
            assert failure.step == "parse", (failure, records[failure.row])
    keys = [record.key for record in records]
    produced = output_batches(out, "out", keys, [None] * len(records))
    assert [batch.topic for batch in produced] in ([], ["out"]), "a record field chose the topic"
    for batch in produced:
        for key, value in zip(batch.keys, batch.values, strict=True):
            document = json.loads(value)
            assert document["id"] == int(key) and document["twice"] == 2 * int(key)
    # What a stage produces, the next stage (a sink) decodes: every output record.
    outputs = [value for batch in produced for value in batch.values]
    _table, refused = decode_json(outputs, lenient=True)
    assert not refused, [(outputs[row][:200], str(error)) for row, error in refused]
    return counts


@FUZZ
@given(hostile_batches())
def test_processor_stage_partitions_hostile_records(records: list[Hostile]) -> None:
    through_stage(records)


def test_every_family_through_the_stage_in_one_batch() -> None:
    """Each family many times over in one batch of 600 (seeded): the counts add up, and bad
    records are all dead-lettered by the parse step."""
    records = list(generate(600, seed=1, huge_every=150))
    assert set(FAMILIES) <= {record.family for record in records}
    counts = through_stage(records)
    bad = sum(record.kind == BAD for record in records)
    assert counts["dead_lettered"] >= bad and counts["lost"] == counts["duplicated"] == 0
    assert counts["out"] + counts["filtered"] + counts["dead_lettered"] == len(records)


def parse_step(options: dict[str, Any]) -> StepRunner:
    return StepRunner(step("parse", options))


def check_parse(records: list[Hostile], options: dict[str, Any]) -> None:
    runner = parse_step(options)
    table, failures = decode_input([record.value for record in records], [runner])
    out = run_steps([runner], table, failures)
    out.validate(full=True)
    tally(f"parse {options['format']}", records, out[ROW_ID].to_pylist(),
          [failure.row for failure in failures]).check()
    if out.num_rows:
        ids_match(out, records, as_text=options["format"] == "csv")


@FUZZ
@given(csv_batches())
def test_csv_decoder_partitions_hostile_lines(records: list[Hostile]) -> None:
    check_parse(records, {"format": "csv", "columns": CSV_COLUMNS})


@FUZZ
@given(avro_batches())
def test_avro_decoder_partitions_hostile_values(records: list[Hostile]) -> None:
    check_parse(records, {"format": "avro", "schema": AVRO_SCHEMA})
    framed = [Hostile(r.n, r.kind, r.family, None if r.value is None else b"\x00\x00\x00\x00\x01" + r.value)
              for r in records]
    check_parse(framed, {"format": "avro", "schema": AVRO_SCHEMA, "confluent_framing": True})


def test_the_generator_is_deterministic_and_traceable() -> None:
    first, again = list(generate(3_000, seed=5)), list(generate(3_000, seed=5))
    assert first == again and [record.n for record in first] == list(range(3_000))
    assert first != list(generate(3_000, seed=6))
    kinds = {record.kind for record in first}
    assert kinds == {GOOD, "odd", BAD}
    for record in first:
        if record.kind == GOOD:
            assert json.loads(record.value or b"")["id"] == record.n
    rng = random.Random(0)
    assert all(FAMILIES[name][1](7, rng) is not None or name == "empty" for name in FAMILIES)


# Regression tests for what the harness found.

def test_a_number_just_over_the_largest_double_fails_alone_in_a_fast_path_batch() -> None:
    """Arrow's reader takes 2e308 as infinity (and refuses 1e400), so such a record passed on
    the fast path as inf, then was written as null, but failed in a batch on the slow path."""
    values = [b'{"id":0,"v":{"a":[2E+308]}}', b'{"id":1,"v":{"a":[1.5]}}', b'{"id":2,"w":-1.8e308}',
              b'{"id":3,"w":Infinity}', b'{"id":4,"w":1.5}']
    nested_v = pa.struct([("a", pa.list_(pa.float64()))])
    for schema in (None, pa.schema([("id", pa.int64()), ("v", nested_v), ("w", pa.float64())])):
        for lenient in (False, True):
            table, failures = decode_json(values, schema, lenient=lenient)
            assert table[ROW_ID].to_pylist() == [1, 3, 4]
            assert [(row, "too large for a double" in str(error)) for row, error in failures] == [
                (0, True), (2, True)]


SQL_STEPS: list[tuple[str, Any]] = [("sql", "SELECT * FROM batch"), ("filter", "id >= 0"),
                                    ("route", {"routes": [{"when": "id % 2 = 0", "topic": "even"}]})]


def test_a_record_nesting_deeper_than_sql_takes_fails_alone_in_sql_steps() -> None:
    """DuckDB takes at most 62 levels of lists and structs from Arrow; a record nesting deeper
    (but within the decoder's limit) failed the whole batch of every SQL step ("Recursion level
    in ArrowSchema struct exceeded"), so its good neighbours were dead-lettered with it."""
    for depth in range(58, 70):
        for kind in ("arrays", "objects"):
            values = [b'{"id":0,"x":1.5}', b'{"id":1,"v":' + nested(depth, kind) + b"}", b'{"id":2,"x":2.5}']
            for step_kind, options in SQL_STEPS:
                runners = [StepRunner(step("parse", {"format": "json"})),
                           StepRunner(step(step_kind, options))]
                table, failures = decode_input(values, runners)
                out = run_steps(runners, table, failures)
                if failures:
                    assert [(f.row, f.step, type(f.error).__name__) for f in failures] == [
                        (1, step_kind, "NestingError")], (depth, kind, step_kind, failures)
                    assert depth > 60
                    assert out[ROW_ID].to_pylist() == [0, 2]
                else:
                    assert depth < 64
                    assert out[ROW_ID].to_pylist() == [0, 1, 2]


def test_a_text_value_among_numbers_fails_min_max_alone() -> None:
    """The parse step reads a field as text when one record's value is text; min/max then
    failed the whole batch ("rules do not apply to its type"), good records included."""
    values = [b'{"id":0,"x":1.5}', b'{"id":1,"x":"a"}', b'{"id":2,"x":"20"}', b'{"id":3}',
              b'{"id":4,"x":[1]}']
    runners = [StepRunner(step("parse", {"format": "json"})),
               StepRunner(step("validate", {"x": {"min": -10, "max": 10}}))]
    table, failures = decode_input(values, runners)
    out = run_steps(runners, table, failures)
    assert out[ROW_ID].to_pylist() == [0, 3]
    assert [(f.row, str(f.error)) for f in failures] == [
        (1, "field 'x' breaks rule min -10: value 'a' is not a number"),
        (2, "field 'x' breaks rule max 10: value 20.0"),
        (4, "field 'x' breaks rule min -10: value '[1]' is not a number")]


def test_records_parquet_cannot_hold_fail_alone(tmp_path: Path) -> None:
    """The Parquet sink wrote a record nesting 50 lists (or 99 objects) into a file that no
    reader with default settings opens ("Parquet schema too deeply nested"), so every record
    in that file was as good as lost; an empty object (``{"o":{}}``) failed the flush, and so the
    stage, again on every restart. Now such a record fails alone."""
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), ComponentContext("p", "lake"))
    sink.open()
    lists = {depth: b"[" * depth + b"1" + b"]" * depth for depth in (49, 50)}
    objects = {depth: b'{"a":' * depth + b"1" + b"}" * depth for depth in (98, 99)}
    for number, (depth, text) in enumerate([*lists.items(), *objects.items()]):
        table, failures = decode_json([b'{"id":0}', b'{"id":1,"v":' + text + b"}", b'{"id":2}'])
        assert not failures
        try:
            sink.write(user_fields(table), ("t", number), 0)
            failed = []
        except SinkRecordError as exc:
            failed = [(row, type(error).__name__) for row, error in zip(exc.rows, exc.errors, strict=True)]
        assert failed == ([] if depth in (49, 98) else [(1, "NestingTooDeepError")])
    empty = [b'{"id":5}', b'{"id":3,"o":{"p":[{}]}}', b'{"id":6,"o":null}']
    table, _failures = decode_json(empty)
    with pytest.raises(SinkRecordError) as refused:
        sink.write(user_fields(table), ("t", 0), 0)
    errors = zip(refused.value.rows, refused.value.errors, strict=True)
    assert [(row, type(error).__name__) for row, error in errors] == [(1, "EmptyObjectError")]
    sink.flush({}, "cluster")
    files = sorted(tmp_path.rglob("*.parquet"))
    ids = sorted(i for path in files for i in pq.read_table(path).column("id").to_pylist())
    assert ids == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 5, 6]


def test_one_odd_type_first_in_a_batch_fails_alone() -> None:
    values = [b'{"id":0,"x":"a"}', b'{"id":1,"x":1.5}', b'{"id":2,"x":2.5}', b'{"id":3,"x":3.5}']
    table, failures = decode_json(values)
    assert table[ROW_ID].to_pylist() == [1, 2, 3]
    assert [row for row, _error in failures] == [0]


def test_records_disagreeing_with_most_on_a_field_fail_and_the_rest_keep_their_order() -> None:
    values = [b'{"x":"a","y":1}', b'{"x":1,"y":true}', b'{"y":2}', b'{"x":2,"y":3}',
              b'{"x":3}', b'{"x":[4]}']
    table, failures = decode_json(values)
    assert table[ROW_ID].to_pylist() == [2, 3, 4]
    assert table["x"].to_pylist() == [None, 2, 3]
    assert [row for row, _error in failures] == [0, 1, 5]


def test_a_cast_the_schemas_allow_but_a_value_refuses_fails_its_record_alone() -> None:
    """The slow path merges its pieces once at the end; when that merge refuses a value (an
    integer beyond 2**53 joining doubles), it merges piece by piece, as before, so that only
    that record fails."""
    values = [b'{"a":1.5}', b"[1]", b'{"a":9007199254740993}', b'{"a":"x"}']
    table, failures = decode_json(values)
    assert table[ROW_ID].to_pylist() == [0] and table["a"].to_pylist() == [1.5]
    assert [(row, str(error)[:40]) for row, error in failures] == [
        (1, "expected a JSON object, got list"), (2, "field types conflict: Integer value 9007"),
        (3, "field types conflict: Unable to merge: F")]
