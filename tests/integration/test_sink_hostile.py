"""Sinks fed hostile records through real pipelines: field names no column can have, partition
values no directory can have, and type conflicts. The stage never stops, and every record is,
exactly once, either written or dead-lettered with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.sinks.delta import NAMING as DELTA
from connectors.sinks.duckdb import NAMING as DUCKDB
from connectors.sinks.postgres import NAMING as POSTGRES
from connectors.sinks.warehouse import Naming
from tests.helpers import read_topic
from tests.sink_tables import (
    RunningPipeline,
    delta_rows,
    duckdb_rows,
    postgres_names,
    postgres_rows,
)

LONG = "n" * 63

# Fed one list at a time: each reaches the sink in batches of its own.
NAMED = [
    [{"id": 0, "": "empty"}, {"id": 1, LONG + "x": "x", LONG + "y": "y"},
     {"id": 2, "a\x00b": "nul"}, {"id": 3, "_sf_seq": 7, "_sf_row": 8}, {"id": 4, "Val": 1}],
    # ``val`` beside ``Val``: one column or two, depending on the database.
    [{"id": 5, "val": 2}, {"id": 6, "Val": 3, "val": 4}, {"id": 7, "val": None}],
]


def letters(bootstrap: str, pipeline: str) -> dict[int, dict[str, bytes]]:
    """The dead-lettered records by id, with their headers."""
    dead = read_topic(bootstrap, f"{pipeline}.dlq")
    found = [(json.loads(value)["id"], dict(headers or []))
             for value, headers in zip(dead.values, dead.headers, strict=True)]
    by_id = dict(found)
    assert len(by_id) == len(found), "a record was dead-lettered twice"
    return by_id


def feed_all(running: RunningPipeline, feeds: list[list[dict[str, Any]]]) -> None:
    for records in feeds:
        running.feed(records)
    result = running.stop()
    assert result.exit_code == 0, result.errors
    counts = running.counts()
    total = sum(map(len, feeds))
    assert counts["in"] == total == counts["out"] + counts["dead_lettered"], counts


def check_named(rows: pa.Table, naming: Naming, dead: dict[int, dict[str, bytes]]) -> None:
    """Each record's values in its fields' columns; with case ignored, ``val`` beside ``Val``
    dead-letters the records that have a value for it (ids 5 and 6), and only those."""
    by_id = {row["id"]: row for row in rows.to_pylist()}
    written = set(range(8)) - ({5, 6} if naming.fold is not None else set())
    assert set(by_id) == written and rows.num_rows == len(written), "lost or duplicated"
    assert set(dead) == {5, 6} - written
    for letter in dead.values():
        assert letter["streamflow.step"] == b"sink"
        assert letter["streamflow.error.class"] == b"ColumnNameError"
        assert b"'val'" in letter["streamflow.error.message"]
    expected = {0: {"": "empty"}, 1: {LONG + "x": "x", LONG + "y": "y"}, 2: {"a\x00b": "nul"},
                3: {"_sf_seq": 7, "_sf_row": 8}, 4: {"Val": 1}, 5: {"val": 2},
                6: {"Val": 3, "val": 4}, 7: {}}
    for record_id in written:
        for field, value in expected[record_id].items():
            assert by_id[record_id][naming.column(field)] == value, (record_id, field)
    assert len({naming.column(LONG + "x"), naming.column(LONG + "y")}) == 2


def test_postgres_maps_every_field_name_to_a_column_of_its_own(
    fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    with postgres_names(postgres_dsn) as (pipeline, table):
        with RunningPipeline(fresh_broker, tmp_path, "postgres", pipeline, dsn=postgres_dsn,
                             table=table) as running:
            feed_all(running, NAMED)
        check_named(postgres_rows(postgres_dsn, table), POSTGRES, letters(fresh_broker, pipeline))


def test_postgres_dead_letters_the_fields_beyond_its_column_limit_and_rows_too_big(
    fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    """PostgreSQL allows 1,600 columns a table and about 8 kB of fixed-size values a row: the
    records whose fields need a column beyond them, or whose row is too big, are dead-lettered,
    and the stage goes on (it failed on every restart, found by the 100,000-record run)."""
    wide = [{"id": n, **{f"f{n}_{i}": i for i in range(300)}} for n in range(5)]  # 1,501 columns
    big_row = {"id": 5, **{f"f{n}_{i}": i for n in range(4) for i in range(300)}}  # over 8 kB
    later = {"id": 6, "f0_1": 1}
    # Record 7 goes first, on its own: records of different partitions reach the sink in no set order.
    fills = [{"id": 7, **{f"g{i}": i for i in range(100)}}]
    beyond = [{"id": 8, "h": "x"}, {"id": 9}]
    with postgres_names(postgres_dsn) as (pipeline, table):
        with RunningPipeline(fresh_broker, tmp_path, "postgres", pipeline, dsn=postgres_dsn,
                             table=table) as running:
            feed_all(running, [wide, [big_row, later], fills, beyond])
        rows = postgres_rows(postgres_dsn, table)
        dead = letters(fresh_broker, pipeline)
    assert sorted(rows.column("id").to_pylist()) == [0, 1, 2, 3, 4, 6, 9]
    assert rows.num_columns == 1600  # 99 of record 7's fields got one
    assert {n: letter["streamflow.error.class"] for n, letter in dead.items()} == {
        5: b"ValueError", 7: b"ColumnLimitError", 8: b"ColumnLimitError"}
    assert b"row is too big" in dead[5]["streamflow.error.message"]


def test_duckdb_maps_field_names_and_dead_letters_case_collisions(
    fresh_broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "warehouse.duckdb"
    with RunningPipeline(fresh_broker, tmp_path, "duckdb", path=str(path),
                         table="named") as running:
        feed_all(running, NAMED)
    check_named(duckdb_rows(path, "named"), DUCKDB, letters(fresh_broker, running.pipeline))


def test_delta_maps_field_names_and_dead_letters_case_collisions(
    fresh_broker: str, tmp_path: Path
) -> None:
    path = tmp_path / "named"
    with RunningPipeline(fresh_broker, tmp_path, "delta", path=str(path)) as running:
        feed_all(running, NAMED)
    check_named(delta_rows(path), DELTA, letters(fresh_broker, running.pipeline))


@pytest.mark.parametrize("sink_type", ["postgres", "duckdb"])
def test_upserts_keep_a_field_named_like_the_row_order_column(
    sink_type: str, fresh_broker: str, tmp_path: Path, postgres_dsn: str
) -> None:
    """Upserts order a batch's rows by an internal column; a field ``_sf_seq`` (here counting
    down, against the record order) neither replaces it nor gets lost."""
    versions = [{"id": i % 3, "_sf_seq": 100 - i, "version": i} for i in range(12)]
    with postgres_names(postgres_dsn) as (pipeline, table):
        settings = ({"dsn": postgres_dsn, "table": table} if sink_type == "postgres"
                    else {"path": str(tmp_path / "w.duckdb"), "table": table})
        with RunningPipeline(fresh_broker, tmp_path, sink_type, pipeline, mode="upsert",
                             keys=["id"], **settings) as running:
            feed_all(running, [versions])
        rows = (postgres_rows(postgres_dsn, table) if sink_type == "postgres"
                else duckdb_rows(tmp_path / "w.duckdb", table))
    latest = {row["id"]: (row["version"], row["_sf_seq"]) for row in rows.to_pylist()}
    assert latest == {key: (max(i for i in range(12) if i % 3 == key),
                            100 - max(i for i in range(12) if i % 3 == key)) for key in range(3)}


# Values that shared a directory (and so a file: the second replaced the first) or stopped the
# stage, then values no directory can have, each in a feed of its own.
PARTITIONS = [None, "__HIVE_DEFAULT_PARTITION__", "", "__EMPTY__", "\u2014", " 14", "%2014",
              "x" * 10_000, "x" * 9_999 + "y", 1.5]
UNPLACEABLE = [{"a": 1}, [1, 2]]


def test_parquet_partitions_are_one_to_one_and_objects_are_dead_lettered(
    fresh_broker: str, tmp_path: Path
) -> None:
    feeds = [[{"id": i, "day": day} for i, day in enumerate(PARTITIONS[:-1])],
             *([{"id": 100 + i, "day": value}] for i, value in enumerate(UNPLACEABLE)),
             [{"id": 9, "day": PARTITIONS[-1]}]]
    out = tmp_path / "lake"
    with RunningPipeline(fresh_broker, tmp_path, "parquet", path=str(out),
                         partition_by=["day"]) as running:
        feed_all(running, feeds)
    values: dict[Path, set[Any]] = {}
    ids = []
    for path in out.rglob("*.parquet"):
        for row in pq.read_table(path).to_pylist():
            ids.append(row["id"])
            values.setdefault(path.parent, set()).add(row["day"])
    assert sorted(ids) == list(range(len(PARTITIONS))), "lost or duplicated"
    assert all(len(found) == 1 for found in values.values()), "two values share a directory"
    assert len(values) == len(PARTITIONS)
    dead = letters(fresh_broker, running.pipeline)
    assert set(dead) == {100, 101}
    for letter in dead.values():
        assert letter["streamflow.error.class"] == b"PartitionValueError"
        assert b"'day'" in letter["streamflow.error.message"]


def test_a_type_conflict_dead_letters_only_its_own_record(fresh_broker: str, tmp_path: Path) -> None:
    """One key, so one Kafka partition: the records reach the sink in file order. The first
    record makes ``a`` a number; the text and the object after it conflict, and only they are
    dead-lettered, not the records after them, with or without ``a``."""
    records = [{"id": 0, "n": 0, "a": 1}, {"id": 0, "n": 1, "a": "x"},
               *({"id": 0, "n": n, "b": n} for n in range(2, 12)),
               {"id": 0, "n": 12, "a": {"k": 1}}, {"id": 0, "n": 13, "a": 2.5},
               *({"id": 0, "n": n, "a": n} for n in range(14, 20))]
    path = tmp_path / "w.duckdb"
    with RunningPipeline(fresh_broker, tmp_path, "duckdb", path=str(path),
                         table="mixed") as running:
        feed_all(running, [records])
    written = {row["n"]: row["a"] for row in duckdb_rows(path, "mixed").to_pylist()}
    assert sorted(written) == [n for n in range(20) if n not in (1, 12)]
    assert written[0] == 1 and written[13] == 2.5 and written[5] is None
    dead = read_topic(fresh_broker, f"{running.pipeline}.dlq")
    assert sorted(json.loads(value)["n"] for value in dead.values) == [1, 12]
    for headers in dead.headers:  # by the decoder, or the sink if a batch began with them
        message = dict(headers or [])["streamflow.error.message"]
        assert b"Field a has incompatible types" in message or b"field 'a'" in message, message
