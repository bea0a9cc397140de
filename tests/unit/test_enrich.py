"""The enrich step from CSV, Parquet and the local PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamflow.plugins import ROW_ID, TransientError
from streamflow.processing.enrich import EnrichMissError
from tests.tables import step, with_rows


@pytest.fixture
def devices_csv(tmp_path: Path) -> Path:
    path = tmp_path / "devices.csv"
    path.write_text("device,site,floor\nd1,paris,1\nd2,oslo,2\n")
    return path


def test_csv_lookup_joins_fields_by_key(devices_csv: Path) -> None:
    enrich = step("enrich", {"source": "csv", "path": str(devices_csv), "key": "id",
                             "lookup_key": "device", "on_miss": "null"})
    result = enrich.process(with_rows({"id": ["d2", "zz", "d1"], "site": ["old", "old", "old"]}))
    assert result.table.drop_columns([ROW_ID]).to_pylist() == [
        {"id": "d2", "site": "oslo", "floor": 2},
        {"id": "zz", "site": None, "floor": None},
        {"id": "d1", "site": "paris", "floor": 1},
    ]


def test_on_miss_keep_and_fail(devices_csv: Path) -> None:
    table = with_rows({"device": ["zz", "d1"], "site": ["own", "own"]})
    keep = step("enrich", {"source": "csv", "path": str(devices_csv), "key": "device",
                           "fields": ["site"], "on_miss": "keep"})
    assert keep.process(table).table["site"].to_pylist() == ["own", "paris"]
    fail = step("enrich", {"source": "csv", "path": str(devices_csv), "key": "device", "on_miss": "fail"})
    result = fail.process(table)
    assert result.table[ROW_ID].to_pylist() == [1]
    assert [(row, type(error)) for row, error in result.failures] == [(0, EnrichMissError)]
    assert "'zz'" in str(result.failures[0][1])


def test_parquet_lookup_casts_keys_and_refreshes(tmp_path: Path) -> None:
    path = tmp_path / "lookup.parquet"
    pq.write_table(pa.table({"id": [1, 2], "label": ["one", "two"]}), path)
    enrich = step("enrich", {"source": "parquet", "path": str(path), "key": "id", "refresh_s": 0.05})
    assert enrich.process(with_rows({"id": ["2"]})).table["label"].to_pylist() == ["two"]
    pq.write_table(pa.table({"id": [2], "label": ["deux"]}), path)
    time.sleep(0.06)
    assert enrich.process(with_rows({"id": [2]})).table["label"].to_pylist() == ["deux"]


@pytest.fixture
def postgres_table(postgres_dsn: str) -> Iterator[str]:
    name = f"devices_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {name} (device text PRIMARY KEY, site text, floor int)")
        connection.execute(f"INSERT INTO {name} VALUES ('d1', 'paris', 1), ('d2', 'oslo', 2)")
        yield name
        connection.execute(f"DROP TABLE {name}")


def test_postgres_lookup_and_refresh(postgres_dsn: str, postgres_table: str) -> None:
    enrich = step("enrich", {"source": "postgres", "dsn": postgres_dsn, "key": "device",
                             "refresh_s": 0.05,
                             "query": f"SELECT device, site, floor FROM {postgres_table}"})
    table = with_rows({"device": ["d1", "d3"]})
    assert enrich.process(table).table.drop_columns([ROW_ID]).to_pylist() == [
        {"device": "d1", "site": "paris", "floor": 1}, {"device": "d3", "site": None, "floor": None}]
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute(f"INSERT INTO {postgres_table} VALUES ('d3', 'rome', 3)")
    time.sleep(0.06)
    assert enrich.process(table).table["site"].to_pylist() == ["paris", "rome"]


def test_unreachable_postgres_names_the_service_and_address() -> None:
    with pytest.raises(TransientError, match=r"PostgreSQL at 127\.0\.0\.1:1 is unreachable"):
        step("enrich", {"source": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/test",
                        "query": "SELECT 1 AS device", "key": "device"})


def test_a_lookup_table_without_the_key_column_is_reported(devices_csv: Path) -> None:
    with pytest.raises(ValueError, match="no key column 'id'"):
        step("enrich", {"source": "csv", "path": str(devices_csv), "key": "id"})
