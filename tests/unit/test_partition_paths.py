"""Parquet partition directories: one value, one directory, whatever the value; values that
cannot name a directory are dead-lettered without harming their neighbours."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.sinks.parquet import (
    EMPTY_DIRECTORY,
    NULL_DIRECTORY,
    ParquetConfig,
    ParquetSink,
    PartitionValueError,
    directory_name,
)
from streamflow.plugins import ComponentContext, SinkRecordError

CONTEXT = ComponentContext("p", "lake")
# Values that shared a directory before: reserved names, escapes that read alike, long runs.
HOSTILE = [None, NULL_DIRECTORY, "", EMPTY_DIRECTORY, "\u2014", " 14", "%2014", "%20", "a/b",
           "a%2Fb", "..", ".", "~", "x" * 10_000, "x" * 9_999 + "y", "\x00"]


def test_values_that_shared_a_directory_get_their_own() -> None:
    names = [directory_name(value) for value in HOSTILE]
    assert len(set(names)) == len(HOSTILE)
    assert directory_name(None) == NULL_DIRECTORY and directory_name("") == EMPTY_DIRECTORY
    assert directory_name(NULL_DIRECTORY) == "%5F" + NULL_DIRECTORY[1:]
    assert directory_name("\u2014") == "%E2%80%94" and directory_name(" 14") == "%2014"
    assert directory_name("2024-01-01") == "2024-01-01"
    long = directory_name("x" * 10_000)
    assert len(long.encode()) <= 128 and long.startswith("x" * 95 + "~")


# Text of every kind, with the characters that matter to the encoding well represented.
VALUES = st.one_of(
    st.none(),
    st.text(),
    st.text(alphabet=st.sampled_from("_%~/.aA0 \u2014\x00\ud800"), max_size=12),
    st.sampled_from([NULL_DIRECTORY, EMPTY_DIRECTORY]),
    st.builds(lambda text, n: text * n, st.text(min_size=1, max_size=3), st.integers(40, 200)),
)


@given(st.lists(VALUES, unique=True, max_size=20))
def test_directory_names_are_one_to_one(values: list[str | None]) -> None:
    names = [directory_name(value) for value in values]
    assert len(set(names)) == len(values)
    for name in names:
        assert name and "/" not in name and "\x00" not in name  # "." is fine after "<field>="
        assert len(name.encode()) <= 128


@given(st.text())
def test_short_directory_names_decode_back_to_their_value(value: str) -> None:
    name = directory_name(value)
    if "~" not in name and name != EMPTY_DIRECTORY:
        assert unquote(name, errors="surrogatepass") == value


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def test_every_value_lands_in_a_directory_of_its_own(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path), partition_by=["day"]), CONTEXT)
    sink.open()
    sink.write(pa.table({"day": HOSTILE, "id": range(len(HOSTILE))}), ("t", 0), 0)
    sink.flush({("t", 0): len(HOSTILE)}, "cluster")
    written = files(tmp_path)
    assert len(written) == len(HOSTILE) == len({path.parent for path in written})
    rows = [pq.read_table(path).to_pylist() for path in written]
    assert sorted(row["id"] for piece in rows for row in piece) == list(range(len(HOSTILE)))
    for [row] in rows:
        assert row["day"] == HOSTILE[row["id"]]


def test_objects_and_arrays_are_dead_lettered_alone(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path), partition_by=["day"]), CONTEXT)
    sink.open()
    with pytest.raises(SinkRecordError) as rejected:
        sink.write(pa.table({"day": [{"a": 1}, None], "id": [0, 1]}), ("t", 0), 0)
    assert rejected.value.rows == [0]
    assert isinstance(rejected.value.errors[0], PartitionValueError)
    assert '{"a": 1}' in str(rejected.value.errors[0])
    with pytest.raises(SinkRecordError) as rejected:
        sink.write(pa.table({"day": [[1, 2], None], "id": [2, 3]}), ("t", 0), 2)
    assert rejected.value.rows == [0]
    # Text values after them are written as usual: the rejected column left nothing behind.
    sink.write(pa.table({"day": ["2024-01-01", "2024-01-02"], "id": [4, 5]}), ("t", 0), 4)
    sink.flush({("t", 0): 6}, "cluster")
    found = {path.parent.name: pq.read_table(path)["id"].to_pylist() for path in files(tmp_path)}
    assert found == {f"day={NULL_DIRECTORY}": [1, 3], "day=2024-01-01": [4], "day=2024-01-02": [5]}


def test_event_times_that_are_no_time_are_dead_lettered_alone(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path), roll_interval_s=3600, time_field="ts"),
                       CONTEXT)
    sink.open()
    with pytest.raises(SinkRecordError) as rejected:
        sink.write(pa.table({"ts": ["5", "soon", None, "NaN"], "id": [0, 1, 2, 3]}), ("t", 0), 0)
    assert rejected.value.rows == [1, 3]
    sink.flush({("t", 0): 4}, "cluster")
    assert {path.name: pq.read_table(path)["id"].to_pylist() for path in files(tmp_path)} == {
        f"t+0000+{0:020d}+{-1:015d}+cluster.parquet": [2],
        f"t+0000+{0:020d}+{0:015d}+cluster.parquet": [0]}
