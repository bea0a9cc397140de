"""Feature rows for river, and the column-wise pickle that must load as the same rows."""

from __future__ import annotations

import math
import pickle
import sys
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from streamflow.ml.features import _fixed_size_pickle, feature_rows, pickled_feature_rows


def test_feature_rows_are_the_rows_python_values_without_nulls() -> None:
    table = pa.table({"a": [1, 2, None], "b": [0.5, 1.5, 2.5], "c": ["x", None, "z"]})
    rows = feature_rows(table)
    assert rows == [{"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "b": 1.5}, {"b": 2.5, "c": "z"}]
    assert type(feature_rows(table.select(["b"]))[0]["b"]) is float
    assert type(feature_rows(pa.table({"n": [3]}))[0]["n"]) is int  # not numpy's int64
    assert feature_rows(table.select([])) == [{}, {}, {}]


def same_rows(loaded: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    """Equal keys in order, and values equal with equal types (1 == 1.0, but not for river's
    one-hot encoders); NaN matches NaN, and -0.0 only -0.0."""
    def same(a: Any, b: Any) -> bool:
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            if math.isnan(a) or math.isnan(b):
                return math.isnan(a) and math.isnan(b)
            return a == b and math.copysign(1, a) == math.copysign(1, b)
        return bool(a == b)

    return len(loaded) == len(expected) and all(
        list(got) == list(want) and all(same(got[k], want[k]) for k in want)
        for got, want in zip(loaded, expected, strict=True)
    )


names = st.text(min_size=1, max_size=300)  # over 255 UTF-8 bytes takes the long string opcode
dense_types = st.sampled_from([pa.float64(), pa.int64(), pa.int32()])
any_types = dense_types | st.sampled_from([pa.uint64(), pa.bool_(), pa.string()])


@st.composite
def tables(draw: st.DrawFn, dense: bool = False) -> pa.Table:
    """Tables of feature columns; ``dense`` ones (numbers in 32 bits, no nulls) take the
    column-wise pickle."""
    rows = draw(st.integers(1 if dense else 0, 6))
    fields = draw(st.lists(st.tuples(names, dense_types if dense else any_types),
                           min_size=1 if dense else 0, max_size=6, unique_by=lambda f: f[0]))
    data = {}
    for name, kind in fields:
        nullable = not dense and draw(st.booleans())
        if pa.types.is_floating(kind):
            values = st.floats()
        elif pa.types.is_boolean(kind):
            values = st.booleans()
        elif pa.types.is_string(kind):
            values = st.text(max_size=5)
        else:
            bits = kind.bit_width
            low, high = (0, 2**bits - 1) if pa.types.is_unsigned_integer(kind) else (
                -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            narrow = st.integers(max(low, -(2**31)), min(high, 2**31 - 1))
            values = narrow if dense else narrow | st.integers(low, high)
        data[name] = pa.array(draw(st.lists(st.none() | values if nullable else values,
                                            min_size=rows, max_size=rows)), kind)
    return pa.table(data) if data else pa.table({"x": pa.array([0.0] * rows)}).select([])


@settings(max_examples=300, deadline=None)
@given(tables())
def test_the_pickle_loads_as_the_feature_rows(table: pa.Table) -> None:
    assert same_rows(pickle.loads(pickled_feature_rows(table)), feature_rows(table))


@settings(max_examples=300, deadline=None)
@given(tables(dense=True))
def test_the_column_wise_pickle_loads_as_the_feature_rows(table: pa.Table) -> None:
    pickled = _fixed_size_pickle(table)
    assert pickled is not None
    assert same_rows(pickle.loads(pickled), feature_rows(table))


def test_the_pickle_of_many_float_columns_uses_long_memo_references() -> None:
    table = pa.table({f"f{i}": [float(i), -0.0, math.inf] for i in range(300)})
    pickled = _fixed_size_pickle(table)
    assert pickled is not None
    assert same_rows(pickle.loads(pickled), feature_rows(table))


@settings(max_examples=200, deadline=None)
@given(tables() | tables(dense=True))
def test_the_loaded_keys_are_interned(table: pa.Table) -> None:
    """So that river's per-feature dicts, keyed by the first rows' names, match later rows'
    keys by identity."""
    first, second = (pickle.loads(pickled_feature_rows(table)) for _ in range(2))
    for row, again in zip(first, second, strict=True):
        assert all(key is sys.intern(key) for key in row)
        assert [id(key) for key in row] == [id(key) for key in again]
