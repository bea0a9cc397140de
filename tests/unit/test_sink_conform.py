"""Fitting decoded batches to existing table columns (shared by the postgres and duckdb sinks)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from connectors.sinks.warehouse import (
    JSON,
    SEQUENCE_COLUMN,
    ColumnTypeError,
    MissingKeyError,
    WarehouseConfig,
    conform,
)


def test_new_columns_take_the_batch_types_and_nested_values_become_json() -> None:
    table = pa.table({"id": [1, 2], "tags": [{"a": 1}, None], "gone": pa.nulls(2),
                      "at": pa.array([0, 1], pa.timestamp("s"))})
    result = conform(table, {}, [])
    assert result.new_columns == {"id": pa.int64(), "tags": JSON, "at": pa.timestamp("us")}
    assert result.table.column("tags").to_pylist() == ['{"a": 1}', None]
    assert "gone" not in result.table.column_names  # type unknown until a value shows up
    assert not result.failures


def test_values_are_cast_to_existing_columns_and_misfits_fail_alone() -> None:
    table = pa.table({"id": [1, 2, 3], "amount": ["1.5", "lots", None]})
    result = conform(table, {"id": pa.float64(), "amount": pa.float64()}, [])
    assert result.table.column("id").type == pa.float64()
    assert list(result.failures) == [1]
    assert isinstance(result.failures[1], ColumnTypeError)
    assert "'amount'" in str(result.failures[1]) and "lots" in str(result.failures[1])
    good = result.good_rows()
    assert good.column(SEQUENCE_COLUMN).to_pylist() == [0, 2]
    assert good.column("amount").to_pylist() == [1.5, None]


def test_json_and_unknown_columns_get_text() -> None:
    table = pa.table({"doc": ["x", None], "price": [1.25, 2.0]})
    result = conform(table, {"doc": JSON, "price": None}, [])
    assert result.table.column("doc").to_pylist() == [json.dumps("x"), None]
    assert result.table.column("price").to_pylist() == ["1.25", "2"]


def test_rows_without_a_key_fail() -> None:
    result = conform(pa.table({"id": [1, None], "v": [1, 2]}), {}, ["id"])
    assert list(result.failures) == [1] and isinstance(result.failures[1], MissingKeyError)
    result = conform(pa.table({"v": [1]}), {}, ["id"])
    assert list(result.failures) == [0]


def test_records_with_no_value_at_all_fail() -> None:
    result = conform(pa.table({"gone": pa.nulls(2)}), {}, [])
    assert sorted(result.failures) == [0, 1]


def test_upsert_needs_keys_and_append_takes_none() -> None:
    with pytest.raises(ValidationError, match="needs keys"):
        WarehouseConfig(table="t", mode="upsert")
    with pytest.raises(ValidationError, match="only to mode 'upsert'"):
        WarehouseConfig(table="t", keys=["id"])


@given(st.one_of(
    st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=30),
    st.lists(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
             min_size=1, max_size=30),
))
def test_every_value_is_either_written_exactly_or_fails(values: list[Any]) -> None:
    column = pa.array(values, pa.float64() if any(isinstance(v, float) for v in values) else None)
    result = conform(pa.table({"n": column}), {"n": pa.int64()}, [])
    written = result.table.column("n").to_pylist()
    for row, original in enumerate(column.to_pylist()):
        if row in result.failures:
            assert original is not None
            assert original != int(original) or not -(2**63) <= original < 2**63
        else:
            assert written[row] == original
