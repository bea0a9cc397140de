"""Row-level lineage on a real broker: file → raw → processor → clean → Parquet and DuckDB sinks
with lineage columns and manifests. The manifests cover exactly the offsets of the rows written,
``lineage show`` prints them, and ``lineage trace`` walks a row back to the source record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from streamflow.cli import main
from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner, config_hash
from streamflow.runtime.row_lineage import CONFIG_HASH, OFFSET, ORIGIN_HEADER, PARTITION
from streamflow.transport import create_transport, read_until
from tests.sink_tables import unique

# A field named like the offset lineage column is data, and survives under its mapped column.
RECORDS = [{"id": i, "reading": i * 1.5, "noise": "x", OFFSET: f"mine-{i}"} for i in range(30)]


def pipeline_file(directory: Path, bootstrap: str, name: str) -> Path:
    data = directory / "records.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    file = directory / "pipeline.yaml"
    file.write_text(f"""
pipeline: {name}
kafka:
  bootstrap: {bootstrap}
  config: {{session.timeout.ms: 2000, heartbeat.interval.ms: 500}}
topics:
  - {{name: {name}.raw, partitions: 2}}
  - {{name: {name}.clean, partitions: 2}}
sources:
  - {{name: src, type: file, topic: {name}.raw, path: "{data}", key_field: id}}
processors:
  - name: clean
    input: {name}.raw
    output: {name}.clean
    steps:
      - drop: [noise]
sinks:
  - {{name: lake, type: parquet, input: {name}.clean, path: "{directory / 'lake'}",
      lineage_columns: true, lineage_manifest: true}}
  - {{name: wh, type: duckdb, input: {name}.clean, path: "{directory / 'wh.duckdb'}",
      table: events, lineage_columns: true, lineage_manifest: true}}
metrics: {{port: 0}}
runtime: {{commit_interval_s: 0.2}}
""")
    return file


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def check_manifests(manifests: list[dict[str, Any]], rows: list[tuple[int, int]]) -> None:
    """Each written row in exactly one manifest entry's range, and the counts agree."""
    assert sum(manifest["rows"] for manifest in manifests) == len(rows) == len(RECORDS)
    covered = []
    for manifest in manifests:
        for entry in manifest["offsets"]:
            inside = [row for row in rows if row[0] == entry["partition"]
                      and entry["first_offset"] is not None
                      and entry["first_offset"] <= row[1] <= entry["last_offset"]]
            assert len(inside) == entry["rows"], (entry, inside)
            covered += inside
    assert sorted(covered) == sorted(rows)


def test_manifests_show_and_trace_on_a_real_broker(
    bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("lineage")
    file = pipeline_file(tmp_path, bootstrap, name)
    config = load_pipeline(str(file))
    result = PipelineRunner(config, until_idle_s=1.5, metrics_port=0).run()
    assert result.exit_code == 0, result.errors

    # What the stage wrote to the sinks' input topic: every record, each with its origin.
    transport = create_transport("confluent", bootstrap)
    clean = [(partition, offset, dict(headers or []))
             for batch in read_until(transport, {(f"{name}.clean", 0): None,
                                                 (f"{name}.clean", 1): None})
             for partition, offset, headers in zip(batch.partitions, batch.offsets,
                                                   batch.headers, strict=True)]
    assert len(clean) == len(RECORDS)
    assert all(headers[ORIGIN_HEADER].startswith(f"{name}.raw/".encode())
               for _p, _o, headers in clean)
    offsets = sorted((partition, offset) for partition, offset, _headers in clean)

    lake = pq.read_table(tmp_path / "lake")
    assert sorted(zip(lake.column(PARTITION).to_pylist(), lake.column(OFFSET).to_pylist(),
                      strict=True)) == offsets
    assert set(lake.column(CONFIG_HASH).to_pylist()) == {config_hash(config)}
    assert "noise" not in lake.column_names
    mapped = next(column for column in lake.column_names
                  if column.startswith(OFFSET) and column != OFFSET)
    assert sorted(lake.column(mapped).to_pylist()) == sorted(r[OFFSET] for r in RECORDS)
    with duckdb.connect(str(tmp_path / "wh.duckdb"), read_only=True) as connection:
        table_rows = connection.execute(
            f'SELECT "{PARTITION}", "{OFFSET}" FROM events').fetchall()
    assert sorted(table_rows) == offsets

    code, lake_manifests = cli_json(capsys, "lineage", "show", str(file), "--sink", "lake",
                                    "--json")
    assert code == 0
    check_manifests(lake_manifests, offsets)
    code, table_manifests = cli_json(capsys, "lineage", "show", str(file), "--sink", "wh",
                                     "--json")
    assert code == 0
    check_manifests(table_manifests, offsets)
    assert {m["config_hash"] for m in [*lake_manifests, *table_manifests]} == {config_hash(config)}
    assert main(["lineage", "show", str(tmp_path / "wh.duckdb"), "--table", "events"]) == 0
    assert "commits with a manifest, 30 rows" in capsys.readouterr().out

    code, traced = cli_json(capsys, "lineage", "trace", str(file), "--sink", "wh", "--row", "7",
                            "--json")
    assert code == 0
    row, hops = traced["row"], traced["trace"]
    assert (row["partition"], row["offset"]) == offsets[7]
    assert [(hop["topic"], hop["retained"]) for hop in hops] == [
        (f"{name}.clean", True), (f"{name}.raw", True)]
    assert hops[0]["written_by"] == ["processor clean"]
    assert hops[1]["written_by"] == ["source src"] and ORIGIN_HEADER not in hops[1]["headers"]
    source = json.loads(hops[1]["value"])
    assert source == RECORDS[source["id"]]  # the record as the source read it, noise included
    assert json.loads(hops[0]["value"]) == {k: v for k, v in source.items() if k != "noise"}
    assert main(["lineage", "trace", str(file), "--sink", "lake", "--row", "0"]) == 0
    assert "the source record" in capsys.readouterr().out
