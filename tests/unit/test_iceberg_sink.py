"""The iceberg sink on a SQLite catalog and a local warehouse: append, new columns, partition
spec, upsert, offsets in snapshot summaries, dead letters; read back by pyiceberg and DuckDB."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from connectors.sinks.iceberg import IcebergConfig, IcebergSink
from streamflow.plugins import ComponentContext, SinkRecordError

TABLE = "lake.events"
PARTITION = ("raw", 0)


def catalog_properties(tmp_path: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"file://{tmp_path}/warehouse"}


def open_sink(tmp_path: Path, **settings: Any) -> IcebergSink:
    config = IcebergConfig.model_validate(
        {"catalog": {"name": "test", "properties": catalog_properties(tmp_path)}, "table": TABLE,
         **settings})
    sink = IcebergSink(config, ComponentContext("p", "lake"))
    sink.open()
    return sink


def rows(tmp_path: Path) -> pa.Table:
    """The table as pyiceberg reads it, ordered by id."""
    table = load_catalog("test", **catalog_properties(tmp_path)).load_table(TABLE)
    return table.scan().to_arrow().sort_by("id")


def duckdb_rows(tmp_path: Path) -> pa.Table:
    """The table read by DuckDB: ``read_parquet`` over the data files of pyiceberg's scan plan
    (DuckDB's iceberg extension would have to be downloaded)."""
    table = load_catalog("test", **catalog_properties(tmp_path)).load_table(TABLE)
    files = [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]
    return duckdb.sql(f"SELECT * FROM read_parquet({files!r}, union_by_name = true) ORDER BY id"
                      ).to_arrow_table()


def test_appends_and_adds_a_column_for_a_new_field(tmp_path: Path) -> None:
    sink = open_sink(tmp_path)
    sink.write(pa.table({"id": [1, 2], "value": [0.5, 1.5]}), PARTITION, 0)
    sink.flush({PARTITION: 2}, "c")
    sink.write(pa.table({"id": [3], "value": [2.5], "site": ["north"]}), PARTITION, 2)
    sink.flush({PARTITION: 3}, "c")
    sink.close()
    expected = {"id": [1, 2, 3], "value": [0.5, 1.5, 2.5], "site": [None, None, "north"]}
    assert rows(tmp_path).to_pydict() == expected
    assert duckdb_rows(tmp_path).select(["id", "value", "site"]).to_pydict() == expected


def test_the_partition_spec_is_applied(tmp_path: Path) -> None:
    sink = open_sink(tmp_path, partition_by=[{"field": "ts", "transform": "day"},
                                             {"field": "id", "transform": "bucket[4]"}])
    days = [datetime(2024, 1, 1, 5, tzinfo=UTC), datetime(2024, 1, 2, 5, tzinfo=UTC)]
    sink.write(pa.table({"id": [1, 2], "ts": pa.array(days, pa.timestamp("us", "UTC"))}),
               PARTITION, 0)
    sink.flush({PARTITION: 2}, "c")
    table = load_catalog("test", **catalog_properties(tmp_path)).load_table(TABLE)
    assert [(field.name, str(field.transform)) for field in table.spec().fields] == [
        ("ts_day", "day"), ("id_bucket_4", "bucket[4]")]
    assert len(list(table.scan().plan_files())) == 2  # one data file per day
    assert rows(tmp_path).column("id").to_pylist() == [1, 2]


def test_an_unknown_transform_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transform"):
        open_sink(tmp_path, partition_by=[{"field": "id", "transform": "fortnight"}])


def test_a_transform_the_fields_type_cannot_take_names_the_field_and_the_fix(tmp_path: Path) -> None:
    sink = open_sink(tmp_path, partition_by=[{"field": "ts", "transform": "day"}])
    sink.write(pa.table({"id": [1], "ts": ["2024-01-01T05:00:00Z"]}), PARTITION, 0)
    with pytest.raises(ValueError, match=r"partition_by field 'ts' has type string .* transform "
                                         r"day cannot take; cast .* identity, bucket\[N\], truncate"):
        sink.flush({PARTITION: 1}, "c")


def test_upsert_replaces_the_row_with_the_same_key(tmp_path: Path) -> None:
    sink = open_sink(tmp_path, mode="upsert", keys=["id"])
    sink.write(pa.table({"id": [1, 2], "value": [1.0, 2.0]}), PARTITION, 0)
    sink.flush({PARTITION: 2}, "c")
    sink.write(pa.table({"id": [2, 3, 2], "value": [20.0, 30.0, 21.0]}), PARTITION, 2)
    sink.flush({PARTITION: 5}, "c")
    assert rows(tmp_path).to_pydict() == {"id": [1, 2, 3], "value": [1.0, 21.0, 30.0]}
    with pytest.raises(SinkRecordError) as missing_key:
        sink.write(pa.table({"id": [None, 4], "value": [1.0, 4.0]}), PARTITION, 5)
    assert missing_key.value.rows == [0]


def test_an_upsert_takes_fields_named_like_its_own_columns(tmp_path: Path) -> None:
    """The last row of each key is found under names of the sink's own: fields named _sf_index
    or index_max, or a key named index, are data (a field _sf_index failed every flush)."""
    sink = open_sink(tmp_path, mode="upsert", keys=["index"])
    sink.write(pa.table({"index": [1, 1, 2], "_sf_index": [7, 8, 9], "index_max": [0, 1, 2],
                         "id": [10, 11, 12]}), PARTITION, 0)
    sink.flush({PARTITION: 3}, "c")
    assert rows(tmp_path).to_pydict() == {
        "index": [1, 2], "_sf_index": [8, 9], "index_max": [1, 2], "id": [11, 12]}


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_a_fresh_sink_resumes_from_the_offsets_in_the_snapshots(tmp_path: Path, mode: str) -> None:
    settings: dict[str, Any] = {"mode": mode, "keys": ["id"] if mode == "upsert" else []}
    sink = open_sink(tmp_path, **settings)
    sink.write(pa.table({"id": [1, 2]}), ("raw", 0), 0)
    sink.flush({("raw", 0): 2}, "c")
    sink.write(pa.table({"id": [3]}), ("raw", 1), 0)
    sink.flush({("raw", 1): 1}, "c")
    sink.close()
    fresh = open_sink(tmp_path, **settings)
    partitions = [("raw", 0), ("raw", 1), ("raw", 2)]
    assert fresh.resume_offsets(partitions, "c") == {("raw", 0): 2, ("raw", 1): 1}
    assert fresh.resume_offsets(partitions, "another-cluster") == {}
    # The Kafka commit was lost: the runtime replays from the resumed offsets only.
    fresh.write(pa.table({"id": [4]}), ("raw", 0), 2)
    fresh.flush({("raw", 0): 3}, "c")
    assert fresh.resume_offsets(partitions, "c") == {("raw", 0): 3, ("raw", 1): 1}
    assert rows(tmp_path).column("id").to_pylist() == [1, 2, 3, 4]


def test_replayed_rows_that_change_nothing_still_record_the_offsets(tmp_path: Path) -> None:
    sink = open_sink(tmp_path, mode="upsert", keys=["id"])
    sink.write(pa.table({"id": [1]}), PARTITION, 0)
    sink.flush({PARTITION: 1}, "c")
    sink.write(pa.table({"id": [1]}), PARTITION, 1)
    sink.flush({PARTITION: 2}, "c")
    assert sink.resume_offsets([PARTITION], "c") == {PARTITION: 2}
    assert rows(tmp_path).column("id").to_pylist() == [1]


def test_fields_the_table_cannot_take_are_dead_lettered(tmp_path: Path) -> None:
    sink = open_sink(tmp_path)
    sink.write(pa.table({"id": [1], "Val": [1]}), PARTITION, 0)
    with pytest.raises(SinkRecordError) as clash:  # val differs from column Val only in case
        sink.write(pa.table({"id": [2, 3, 4], "val": [None, 5, None],
                             "Val": ["2", None, "many"]}), PARTITION, 1)
    assert clash.value.rows == [1, 2]
    assert "case" in str(clash.value.errors[0]) and "fit" in str(clash.value.errors[1])
    sink.flush({PARTITION: 4}, "c")
    assert rows(tmp_path).to_pydict() == {"id": [1, 2], "Val": [1, 2]}


def test_offsets_of_a_flush_whose_rows_were_all_dead_lettered_are_recorded(tmp_path: Path) -> None:
    sink = open_sink(tmp_path)
    sink.write(pa.table({"id": [1]}), PARTITION, 0)
    sink.flush({PARTITION: 1}, "c")
    with pytest.raises(SinkRecordError):
        sink.write(pa.table({"id": ["one"]}), PARTITION, 1)
    sink.flush({PARTITION: 2}, "c")
    assert sink.resume_offsets([PARTITION], "c") == {PARTITION: 2}
    assert rows(tmp_path).column("id").to_pylist() == [1]
