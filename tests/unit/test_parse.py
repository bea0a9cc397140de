"""The parse step: JSON, CSV and Avro values into records; bad values fail one by one."""

from __future__ import annotations

import io
import json

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streamflow.plugins import ROW_ID
from streamflow.processing.codec import DecodeError
from streamflow.processing.parse import ParseConfig, raw_table
from tests.tables import step, with_rows

AVRO_SCHEMA = {
    "type": "record", "name": "Reading",
    "fields": [{"name": "id", "type": "string"}, {"name": "x", "type": "double"},
               {"name": "n", "type": ["null", "long"], "default": None}],
}


def avro(record: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(AVRO_SCHEMA), record)
    return buffer.getvalue()


def test_json_values_are_parsed_and_bad_ones_fail() -> None:
    result = step("parse", {"format": "json"}).process(
        raw_table([b'{"a": 1}', b"nope", None, b'{"a": 2}']))
    assert result.table.column("a").to_pylist() == [1, 2]
    assert result.table[ROW_ID].to_pylist() == [0, 3]
    assert [(row, type(error)) for row, error in result.failures] == [(1, DecodeError), (2, DecodeError)]


def test_csv_with_column_names_reads_text_fast_and_isolates_bad_lines() -> None:
    parse = step("parse", {"format": "csv", "columns": ["id", "x"]})
    good = parse.process(raw_table([b"a,1", b'"b,c",2']))
    assert good.table.drop_columns([ROW_ID]).to_pylist() == [{"id": "a", "x": "1"}, {"id": "b,c", "x": "2"}]
    mixed = parse.process(raw_table([b"a,1", b"only-one", b"x,2,3", b"c,3", b"\xff\xfe,1", b""]))
    assert mixed.table["id"].to_pylist() == ["a", "c"]
    assert mixed.table[ROW_ID].to_pylist() == [0, 3]
    assert [row for row, _ in mixed.failures] == [1, 2, 4, 5]
    assert "expected one CSV line of 2 fields" in str(mixed.failures[0][1])


def test_csv_documents_with_a_header_become_one_record_per_line() -> None:
    parse = step("parse", {"format": "csv", "header": True, "delimiter": ";"})
    result = parse.process(raw_table([b"id;x\na;1\nb;2", b"id;x\nc;1;9", b"id;x\nd;4"]))
    assert result.table.drop_columns([ROW_ID]).to_pylist() == [
        {"id": "a", "x": "1"}, {"id": "b", "x": "2"}, {"id": "d", "x": "4"}]
    assert result.table[ROW_ID].to_pylist() == [0, 0, 2]
    assert [row for row, _ in result.failures] == [1]


def test_avro_values_take_the_schema_types() -> None:
    parse = step("parse", {"format": "avro", "schema": AVRO_SCHEMA})
    values = [avro({"id": "a", "x": 1.5, "n": 3}), b"\x02", avro({"id": "b", "x": 2.0})]
    result = parse.process(raw_table(values))
    assert result.table.drop_columns([ROW_ID]).to_pylist() == [
        {"id": "a", "x": 1.5, "n": 3}, {"id": "b", "x": 2.0, "n": None}]
    assert [row for row, _ in result.failures] == [1]
    assert "invalid Avro" in str(result.failures[0][1])


UNION_SCHEMA = {
    "type": "record", "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "v", "type": ["null", "long", "string", "bytes", {
            "type": "record", "name": "Inner", "fields": [{"name": "a", "type": "long"}]}]},
    ],
}


def union_avro(record: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(UNION_SCHEMA), record)
    return buffer.getvalue()


def test_avro_union_values_of_different_types_in_one_batch_fail_no_record() -> None:
    parse = step("parse", {"format": "avro", "schema": UNION_SCHEMA})
    values = [union_avro({"id": 0, "v": 1}), union_avro({"id": 1, "v": "x"}), b"\x02",
              union_avro({"id": 3, "v": None}), union_avro({"id": 4, "v": {"a": 5}}),
              union_avro({"id": 5, "v": b"\x00\xff"})]
    result = parse.process(raw_table(values))  # raised ArrowInvalid for the whole batch before
    assert result.table.drop_columns([ROW_ID]).to_pylist() == [
        {"id": 0, "v": "1"}, {"id": 1, "v": "x"}, {"id": 3, "v": None}, {"id": 4, "v": '{"a": 5}'},
        {"id": 5, "v": '"AP8="'}]  # read as text where the records disagree, bytes in base64
    assert result.table[ROW_ID].to_pylist() == [0, 1, 3, 4, 5]
    assert [row for row, _ in result.failures] == [2]  # only the corrupt value


def test_avro_union_conflicts_then_fail_in_the_schema_step_record_by_record() -> None:
    parse = step("parse", {"format": "avro", "schema": UNION_SCHEMA})
    parsed = parse.process(raw_table([union_avro({"id": n, "v": v})
                                      for n, v in enumerate([1, "x", 2, {"a": 1}, 3])]))
    typed = step("schema", {"id": {"type": "int"}, "v": {"type": "int"}}).process(parsed.table)
    assert typed.table.drop_columns([ROW_ID]).to_pylist() == [
        {"id": 0, "v": 1}, {"id": 2, "v": 2}, {"id": 4, "v": 3}]
    assert [row for row, _ in typed.failures] == [1, 3]


def test_avro_records_of_a_union_of_record_types_share_one_struct_column() -> None:
    schema = {"type": "record", "name": "Envelope", "fields": [{"name": "body", "type": [
        {"type": "record", "name": "Click", "fields": [{"name": "x", "type": "long"}]},
        {"type": "record", "name": "View", "fields": [{"name": "page", "type": "string"}]},
    ]}]}

    def encode(record: dict[str, object]) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
        return buffer.getvalue()

    result = step("parse", {"format": "avro", "schema": schema}).process(
        raw_table([encode({"body": {"x": 1}}), encode({"body": {"page": "home"}})]))
    assert result.table["body"].to_pylist() == [{"x": 1, "page": None}, {"x": None, "page": "home"}]
    assert result.failures == []


def test_avro_confluent_framing_skips_the_registry_header() -> None:
    parse = step("parse", {"format": "avro", "schema": AVRO_SCHEMA, "confluent_framing": True})
    result = parse.process(raw_table([b"\x00\x00\x00\x00\x07" + avro({"id": "a", "x": 1.0})]))
    assert result.table["id"].to_pylist() == ["a"]


def test_a_later_parse_step_reads_a_text_field_and_keeps_row_ids() -> None:
    result = step("parse", {"format": "json", "field": "payload"}).process(
        with_rows({"payload": ['{"a": 1}', "[]"]}, [7, 9]))
    assert result.table.to_pylist() == [{"a": 1, ROW_ID: 7}]
    assert [row for row, _ in result.failures] == [1]


@pytest.mark.parametrize("settings", [
    {"format": "csv"},
    {"format": "csv", "columns": ["a"], "header": True},
    {"format": "avro"},
    {"format": "json", "columns": ["a"]},
])
def test_incomplete_format_settings_are_config_errors(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ParseConfig.model_validate(settings)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=30) | st.none(), max_size=15),
       st.sampled_from(["json", "csv", "csv-header", "avro"]))
def test_arbitrary_bytes_never_raise_and_every_value_is_accounted_for(
    values: list[bytes | None], kind: str
) -> None:
    settings: dict[str, object] = {
        "json": {"format": "json"},
        "csv": {"format": "csv", "columns": ["a", "b"]},
        "csv-header": {"format": "csv", "header": True},
        "avro": {"format": "avro", "schema": AVRO_SCHEMA},
    }[kind]
    result = step("parse", settings).process(raw_table(values))
    failed = {row for row, _ in result.failures}
    parsed = set(result.table[ROW_ID].to_pylist())
    assert not failed & parsed
    if kind != "csv-header":  # a header-only document yields no record and no failure
        assert failed | parsed == set(range(len(values)))
    assert json.dumps([str(error) for _, error in result.failures])
