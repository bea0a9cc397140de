"""The file source's CSV handling, as docs/sources.md describes it: a header per file, cells
typed int, float or text, and rows that are not UTF-8 passed on unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from connectors.sources.file import FileConfig, FileSource
from streamflow.plugins import ComponentContext
from streamflow.processing.codec import decode_json


def read_all(path: str) -> list[bytes]:
    source = FileSource(FileConfig(path=path, format="csv"), ComponentContext("p", "s"))
    source.open(None)
    values: list[bytes] = []
    while (batch := source.poll(100, 0.01)) is not None:
        values += batch.values
    return values


def test_csv_rows_become_typed_json_objects_by_each_files_header(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(
        b'id,x,name,flag,dup,dup\n\n007,2.5,"a,b",true,1,2\n"42",nan,  Ann ,,3\n8,1e3\n')
    (tmp_path / "b.csv").write_bytes(b"other,\xffname\n1,ok\n2,\xff\xfe\n")
    values = read_all(str(tmp_path / "*.csv"))
    first, second, third = (json.loads(value) for value in values[:3])
    assert first == {"id": 7, "x": 2.5, "name": "a,b", "flag": "true", "dup": 2}
    nan = second.pop("x")
    assert nan != nan and second == {"id": 42, "name": "  Ann ", "flag": "", "dup": 3}
    assert third == {"id": 8, "x": 1000.0}
    assert json.loads(values[3]) == {"other": 1, "\ufffdname": "ok"}
    assert values[4] == b"2,\xff\xfe"  # not UTF-8: on as it is, for a stage to dead-letter
    table, failures = decode_json(values)
    assert [row for row, _error in failures] == [4] and "not UTF-8" in str(failures[0][1])
    assert table.num_rows == 4
