"""The Arrow evaluation of simple filters and derived fields gives DuckDB's result bit for bit,
and hands DuckDB whatever it cannot: checked against DuckDB on generated statements and data."""

from __future__ import annotations

import math
import struct
from datetime import datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamflow.plugins import ComponentContext
from streamflow.processing import arrow_sql
from streamflow.processing.arrow_sql import ArrowPredicate, ArrowProjection, compiled
from streamflow.processing.steps import BatchQuery, SqlConfig, SqlTransform, thread_connection
from streamflow.processing.validation import FilterConfig, FilterStep

COLUMNS = ["a", "b", "c"]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 980.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
LITERALS = ["0", "1", "32", "100", "980", "1.8", "0.5", ".5", "5.", "0.0", "2e0", "0e0", "1e-3",
            "1E+2", "123456789012345", "0.000000000000001", "99999.9999"]

values = st.one_of(st.none(), st.sampled_from(SPECIAL), st.floats(allow_nan=False, width=64))
literal = st.one_of(st.sampled_from(LITERALS), st.integers(0, 10**6).map(str),
                    st.floats(0, 1e6, allow_nan=False).map(lambda value: repr(round(value, 6))))


def signed(text: str, minus: bool) -> Any:
    return ("literal", f"- {text}" if minus else text)


literals = st.builds(signed, literal, st.booleans())
column = st.builds(lambda name, spelling: ("column", spelling(name)), st.sampled_from(COLUMNS),
                   st.sampled_from([str, str.upper, lambda name: f'"{name}"']))


def number_nodes(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    operators = st.sampled_from(["+", "-", "*", "/"])
    return st.one_of(
        st.tuples(st.just("neg"), inner),
        st.tuples(operators, inner, st.one_of(inner, literals)),
        st.tuples(operators, literals, inner),
    )


numbers = st.recursive(column, number_nodes, max_leaves=6)
comparison = st.sampled_from(["=", "==", "!=", "<>", "<", "<=", ">", ">="])
predicates = st.recursive(
    st.one_of(st.tuples(comparison, numbers, st.one_of(numbers, literals)),
              st.tuples(comparison, literals, numbers)),
    lambda inner: st.one_of(st.tuples(st.just("NOT"), inner),
                            st.tuples(st.sampled_from(["AND", "and", "OR", "Or"]), inner, inner)),
    max_leaves=4,
)


def render(node: Any, parenthesize: st.DataObject | None) -> str:
    """SQL for ``node``, every subexpression in parentheses, or (with ``parenthesize``) those
    hypothesis picks: the string then means what DuckDB's precedence says."""
    kind = node[0]
    if kind in ("column", "literal"):
        return node[1]
    parts = [render(child, parenthesize) for child in node[1:]]
    parts = [f"({part})" if parenthesize is None or parenthesize.draw(st.booleans()) else part
             for part in parts]
    if kind == "neg":
        return f"- {parts[0]}"
    if kind == "NOT":
        return f"NOT {parts[0]}"
    return f"{parts[0]} {kind} {parts[1]}"


def batch(rows: list[tuple[float | None, ...]]) -> pa.Table:
    columns = {name: pa.array([row[index] for row in rows], pa.float64())
               for index, name in enumerate(COLUMNS)}
    return pa.table({**columns, "_sf_row": pa.array(range(len(rows)), pa.int64())})


tables = st.lists(st.tuples(values, values, values), max_size=12).map(batch)


def bits(value: object) -> object:
    """A double by its bits (one NaN for all: its payload and sign are the CPU's), else as is."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else struct.pack("<d", value)
    return value


def assert_same(ours: pa.Table | pa.ChunkedArray, duckdb: pa.Table | pa.ChunkedArray) -> None:
    if isinstance(ours, pa.Table):
        assert ours.schema.equals(duckdb.schema, check_metadata=True)
        for name in ours.column_names:
            assert_same(ours.column(name), duckdb.column(name))
        return
    assert ours.type == duckdb.type
    assert [bits(value) for value in ours.to_pylist()] == [bits(v) for v in duckdb.to_pylist()]


def duckdb_keep(predicate: str, table: pa.Table) -> pa.ChunkedArray:
    return BatchQuery(f"SELECT CAST(({predicate}) AS BOOLEAN) AS keep FROM batch").run(table).column(0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(predicates, tables, st.data())
def test_predicates_keep_what_duckdb_keeps(tree: Any, table: pa.Table, data: st.DataObject) -> None:
    full = render(tree, None)
    predicate = compiled(ArrowPredicate, full)
    assert predicate is not None, full  # the grammar takes every fully parenthesized tree
    keep = predicate.keep(table)
    if keep is not None:  # None: a NaN compared, which the steps hand to DuckDB
        assert_same(keep, duckdb_keep(full, table))
    loose = render(tree, data)
    predicate = compiled(ArrowPredicate, loose)
    keep = predicate.keep(table) if predicate else None
    if keep is not None:
        assert_same(keep, duckdb_keep(loose, table))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(numbers, predicates), min_size=1, max_size=3), tables, st.data())
def test_derived_fields_are_duckdbs(trees: list[Any], table: pa.Table, data: st.DataObject) -> None:
    for parenthesize in (None, data):
        fields = ", ".join(f"{render(tree, parenthesize)} AS derived_{index}"
                           for index, tree in enumerate(trees))
        statement = f"SELECT *, {fields} FROM batch"
        projection = compiled(ArrowProjection, statement)
        if parenthesize is None:
            assert projection is not None, statement
        derived = projection.apply(table) if projection else None
        if derived is not None:
            assert_same(derived, BatchQuery(statement).run(table))


TOKENS = ["a", "B", '"c"', "x", "true", "null", "current_date", "value", "abs", "(", ")", "+", "-",
          "*", "/", "//", "%", "^", "<", ">", "=", "<=", "!=", "<>", "==", "!", "~", "@", "AND",
          "OR", "NOT", "IS", "IN", "BETWEEN", "::", "'1'", "1", "1.5", "1e3", ".5", ",", "--",
          "->", "a1", "_b", "\u00a0", "\t", "\u0661"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(TOKENS), st.sampled_from(["", " "])), min_size=1,
                max_size=8), tables)
def test_any_text_the_grammar_takes_means_what_it_means_to_duckdb(
        tokens: list[tuple[str, str]], table: pa.Table) -> None:
    """Token soup, tokens apart or run together: whatever compiles evaluates as in DuckDB, and
    DuckDB takes it."""
    text = "".join(token + separator for token, separator in tokens)
    predicate = compiled(ArrowPredicate, text)
    keep = predicate.keep(table) if predicate else None
    if keep is not None:
        assert_same(keep, duckdb_keep(text, table))
    statement = f"SELECT *, {text} AS derived FROM batch"
    projection = compiled(ArrowProjection, statement)
    derived = projection.apply(table) if projection else None
    if derived is not None:
        assert_same(derived, BatchQuery(statement).run(table))


def test_the_grammar_knows_every_duckdb_keyword_that_is_not_a_plain_column() -> None:
    words = thread_connection(False).sql(
        "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category <> 'unreserved'").fetchall()
    assert {word for (word,) in words} <= arrow_sql.KEYWORDS


@pytest.mark.parametrize("kind", sorted(arrow_sql._KEPT_TYPES, key=str))
def test_duckdb_returns_each_kept_column_type_unchanged(kind: pa.DataType) -> None:
    samples = {pa.bool_(): True, pa.string(): "x", pa.binary(): b"x",
               pa.date32(): datetime(2026, 12, 1).date()}
    if pa.types.is_timestamp(kind):
        value: object = datetime(2026, 12, 1, 17, 30)
    else:
        value = samples.get(kind, None if kind == pa.null() else 1)
    table = pa.table({"kept": pa.array([value, None], kind), "a": pa.array([1.5, None])})
    statement = "SELECT *, a * 2 AS twice FROM batch"
    derived = ArrowProjection(statement).apply(table)
    assert derived is not None
    assert_same(derived, BatchQuery(statement).run(table))


@pytest.mark.parametrize(("statement", "table"), [
    ("SELECT *, a + 1 AS b FROM batch", pa.table({"a": [1.0], "b": [2.0]})),  # alias is a column
    ("SELECT *, a + 1 AS d FROM batch", pa.table({"a": pa.array([1], pa.int64())})),  # not double
    ("SELECT *, a + 1 AS d FROM batch", pa.table({"a": [1.0], "A": [2.0]})),  # named twice
    ("SELECT *, a + 1 AS d FROM batch",  # a type DuckDB's SELECT * changes
     pa.table({"a": [1.0], "l": pa.array([["x"]], pa.large_list(pa.string()))})),
])
def test_batches_the_kernels_cannot_match_go_to_duckdb(statement: str, table: pa.Table) -> None:
    projection = ArrowProjection(statement)
    assert projection.apply(table) is None


def test_the_steps_hand_a_nan_comparison_to_duckdb_and_keep_what_it_keeps() -> None:
    """DuckDB orders NaN above every number: ``a > 1`` keeps a NaN, which Arrow would drop."""
    context = ComponentContext("p", "test")
    step = FilterStep(FilterConfig("a > 1"), context)
    assert step.predicate is not None
    table = batch([(math.nan, 0.0, 0.0), (2.0, 0.0, 0.0), (0.5, 0.0, 0.0), (None, 0.0, 0.0)])
    assert step.process(table).table.column("_sf_row").to_pylist() == [0, 1]
    sql = SqlTransform(SqlConfig("SELECT *, a * 1.8 + 32 AS f FROM batch"), context)
    assert sql.projection is not None
    derived = sql.process(table).table.column("f").to_pylist()
    assert math.isnan(derived[0]) and derived[1:] == [35.6, 32.9, None]


@pytest.mark.parametrize("text", [
    "abs(a) > 1", "a > '1'", "a > 1 -- comment", "1 > 0", "a", "a > 1 > 2", "NOT a", "a IS NULL",
    "true AND a > 1", "a > 1e400", "a > 1234567890123456", "a::DOUBLE > 1", "a % 2 = 0", "é > 1",
    "a !=-1", "a >\u00a01", "a > \u0661",
])
def test_the_grammar_leaves_the_rest_to_duckdb(text: str) -> None:
    assert compiled(ArrowPredicate, text) is None


def with_column(name: str, values: pa.Array) -> pa.Table:
    return pa.Table.from_arrays([pa.array([1.5, -2.0, None]), values], names=["a", name])


@pytest.mark.parametrize("table", [
    pa.Table.from_arrays([pa.array([1.0, -2.0]), pa.array([1.0, -2.0])],
                         names=["a", "\u212a"]),  # the Kelvin sign: "k" to Python, not to DuckDB
    with_column("", pa.array([1.0, 2.0, 3.0])),  # DuckDB's SELECT * calls it "v1"
    with_column("a\x00", pa.array([1.0, 2.0, 3.0])),  # "a" to DuckDB, which ends names at NUL
    with_column("h", pa.array([1, 2, 3], pa.float16())),
    with_column("d", pa.array([1, 2, 3], pa.decimal256(40, 2))),
    with_column("u", pa.UnionArray.from_dense(pa.array([0, 0, 0], pa.int8()),
                                              pa.array([0, 1, 2], pa.int32()),
                                              [pa.array([1, 2, 3])])),
], ids=["kelvin", "empty", "nul", "float16", "decimal256", "union"])
def test_tables_duckdb_reads_otherwise_or_not_at_all_go_to_duckdb(table: pa.Table) -> None:
    names_k = "k" in [name.lower() for name in table.column_names]
    assert ArrowPredicate("k > 0" if names_k else "a > 0").keep(table) is None
    assert ArrowProjection("SELECT *, a * 2 AS r FROM batch").apply(table) is None


@pytest.mark.parametrize("values", [
    pa.array(["x", None, "y"], pa.large_string()),
    pa.array([b"x", None, b""], pa.large_binary()),
    pa.array([0, None, 2**40], pa.timestamp("ns", tz="Europe/Paris")),
    pa.array([0, None, 1], pa.timestamp("s")),
    pa.array([1, None, 3], pa.decimal128(38, 4)),
    pa.array([[1.0, None], None, []], pa.large_list(pa.float64())),
    pa.array([{"k": [1], "s": "x"}, None, {"k": None, "s": None}]),
    pa.array([[("a", 1)], None, []], pa.map_(pa.string(), pa.int64())),
], ids=str)
def test_filters_read_past_the_columns_they_do_not_name(values: pa.Array) -> None:
    """A predicate over doubles is Arrow's to evaluate beside columns of any type DuckDB reads."""
    table = with_column("other", values)
    keep = ArrowPredicate("a > 0").keep(table)
    assert keep is not None
    assert_same(keep, duckdb_keep("a > 0", table))


@pytest.mark.parametrize("text", [
    "(" * 130 + "a" + ")" * 130 + " > 0",  # DuckDB takes 400 levels
    " AND ".join(["a > 0"] * 1200),
    "- " * 500 + "a > 0",
    'a > 0 AND "x\x00y" > 0',
])
def test_large_or_odd_statements_are_duckdbs(text: str) -> None:
    assert compiled(ArrowPredicate, text) is None
    assert compiled(ArrowProjection, f"SELECT *, ({text}) AS r FROM batch") is None
    assert compiled(ArrowProjection, 'SELECT *, a * 2 AS "r\x00s" FROM batch') is None
