"""Column names of the table sinks: field names map one-to-one and deterministically, case
collisions fail only their own records, and the sinks' row-order column never takes a field's
name."""

from __future__ import annotations

import hashlib
import unicodedata

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from connectors.sinks.delta import NAMING as DELTA
from connectors.sinks.duckdb import NAMING as DUCKDB
from connectors.sinks.postgres import NAMING as POSTGRES
from connectors.sinks.warehouse import (
    SEQUENCE_COLUMN,
    ColumnNameError,
    Naming,
    conform,
    mapped_name,
)

LONG = "a" * 63


def valid(naming: Naming, column: str) -> bool:
    """Whether the database can hold a column of this name as it is."""
    controls = any(unicodedata.category(c) in ("Cc", "Cs") for c in column)  # NUL, surrogates
    return bool(column) and not controls and (
        naming.max_bytes is None or len(column.encode()) <= naming.max_bytes)


def test_names_that_can_be_columns_are_kept() -> None:
    for name in ("id", "Val", "val", "first name", "températures", "_sf_seq", "_sf_row", "a~b",
                 "x" * 63):
        assert POSTGRES.column(name) == name
    assert DUCKDB.column("x" * 1000) == "x" * 1000  # DuckDB has no length limit


def test_names_that_cannot_be_columns_get_a_digest() -> None:
    for name in ("", "a\x00b", "tab\there", "\x85", "\ud800", LONG + "x", "v~0123456789ABCDEF"):
        column = POSTGRES.column(name)
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        assert column.endswith("~" + digest), (name, column)
        assert valid(POSTGRES, column)
    assert POSTGRES.column("a\x00b") == "ab~" + hashlib.sha256(b"a\x00b").hexdigest()[:16]
    # Two names equal in their first 63 bytes (PostgreSQL would cut both to the same name).
    assert POSTGRES.column(LONG + "x") != POSTGRES.column(LONG + "y")
    assert POSTGRES.column(LONG + "x").startswith("a" * 46 + "~")
    # A name cut inside a multi-byte character drops that character.
    assert len(POSTGRES.column("é" * 40).encode()) == 46 + 17


# Names as JSON may hold them: any text, with control characters, surrogates, long runs and
# names that look mapped (``~`` and 16 hexadecimal digits) well represented.
NAMES = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.sampled_from("aAbB~\x00\n\x7f\ud800é"), max_size=8),
    st.builds(lambda base, tail: base + tail, st.sampled_from([LONG, "é" * 40, ""]),
              st.text(alphabet="xyzXYZ\x00", max_size=4)),
    st.builds(lambda base, digits: f"{base}~{digits}", st.text(max_size=5),
              st.text(alphabet="0123456789abcdefABCDEF", min_size=16, max_size=16)),
    st.builds(mapped_name, st.text(max_size=70)),
)


@given(st.lists(NAMES, unique=True, max_size=30))
def test_field_names_map_to_distinct_columns(names: list[str]) -> None:
    for naming in (POSTGRES, DUCKDB, DELTA):
        fold = naming.fold or str
        columns = {name: naming.column(name) for name in names}
        assert len(set(columns.values())) == len(names), "two fields share a column"
        assert all(valid(naming, column) for column in columns.values())
        # A mapped column differs, even in the database's eyes, from every other field's column
        # (fields whose kept names differ only in case are told apart when a batch is fitted).
        mapped = [fold(columns[name]) for name in names if not naming.keeps(name)]
        kept = {fold(name) for name in names if naming.keeps(name)}
        assert len(set(mapped)) == len(mapped) and not kept & set(mapped)


@given(NAMES)
def test_the_mapping_is_deterministic(name: str) -> None:
    again = Naming("PostgreSQL", max_bytes=63)
    assert POSTGRES.column(name) == again.column(name) == again.column(name)
    assert POSTGRES.column(name) == (name if POSTGRES.keeps(name) else mapped_name(name))


def test_a_field_differing_only_in_case_from_a_column_fails_its_own_records() -> None:
    table = pa.table({"id": [1, 2, 3], "val": [10, None, 30]})
    result = conform(table, {"id": pa.int64(), "Val": pa.int64()}, [], DUCKDB)
    assert sorted(result.failures) == [0, 2]
    assert all(isinstance(error, ColumnNameError) for error in result.failures.values())
    assert "'val'" in str(result.failures[0]) and "'Val'" in str(result.failures[0])
    assert result.table.column_names == ["id"] and not result.new_columns
    # Two new fields of one batch: the first one seen gets the column.
    both = conform(pa.table({"Val": [1, None], "val": [None, 2]}), {}, [], DELTA)
    assert both.new_columns == {"Val": pa.int64()} and list(both.failures) == [1]
    # PostgreSQL keeps the case of quoted names: no collision.
    assert not conform(table, {"id": pa.int64(), "Val": pa.int64()}, [], POSTGRES).failures


def test_fields_are_renamed_to_their_columns() -> None:
    result = conform(pa.table({"": [1], "a\x00b": ["x"]}), {}, [], POSTGRES)
    assert result.table.column_names == [POSTGRES.column(""), POSTGRES.column("a\x00b")]
    assert set(result.new_columns) == set(result.table.column_names)


def test_a_field_named_like_the_row_order_column_is_ordinary_data() -> None:
    table = pa.table({"id": [1, 2], SEQUENCE_COLUMN: [70, 80], "_SF_SEQ_": [1, 2]})
    result = conform(table, {}, [])
    assert result.sequence not in {name.lower() for name in table.column_names}
    rows = result.good_rows()
    assert rows.column(SEQUENCE_COLUMN).to_pylist() == [70, 80]
    assert rows.column(result.sequence).to_pylist() == [0, 1]
    assert rows.column_names[-1] == result.sequence
