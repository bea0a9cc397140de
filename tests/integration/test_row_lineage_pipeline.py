"""Row-level lineage on a real broker: file → raw → processor → clean → model → scored → Parquet
and DuckDB sinks with lineage columns and manifests. The manifests cover exactly the offsets of
the rows written, ``lineage show`` prints them, and ``lineage trace`` walks a row back through
both stages' topics to the source record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.sinks.postgres import PostgresConfig, PostgresSink
from streamflow.api import Pipeline
from streamflow.cli import main
from streamflow.config import load_pipeline
from streamflow.plugins import ComponentContext
from streamflow.runtime import lineage_cli
from streamflow.runtime.pipeline import PipelineRunner, config_hash
from streamflow.runtime.row_lineage import (
    CONFIG_HASH,
    MODEL_VERSION,
    OFFSET,
    ORIGIN_HEADER,
    PARTITION,
    LineageSink,
)
from streamflow.transport import ConsumedBatch, create_transport, read_until
from tests.sink_tables import postgres_names, unique

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
  - {{name: {name}.scored, partitions: 2}}
sources:
  - {{name: src, type: file, topic: {name}.raw, path: "{data}", key_field: id}}
processors:
  - name: clean
    input: {name}.raw
    output: {name}.clean
    steps:
      - drop: [noise]
models:
  - name: m
    input: {name}.clean
    output: {name}.scored
    target: reading
    features: [id]
    estimator: [{{linear_model.LinearRegression: {{}}}}]
    checkpoint: {{path: "{directory / 'checkpoints'}"}}
sinks:
  - {{name: lake, type: parquet, input: {name}.scored, path: "{directory / 'lake'}",
      lineage_columns: true, lineage_manifest: true}}
  - {{name: wh, type: duckdb, input: {name}.scored, path: "{directory / 'wh.duckdb'}",
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

    # What the stages wrote: every record, each with the origin of its input record.
    transport = create_transport("confluent", bootstrap)
    for topic, upstream in (("clean", "raw"), ("scored", "clean")):
        written = [(partition, offset, dict(headers or []))
                   for batch in read_until(transport, {(f"{name}.{topic}", 0): None,
                                                       (f"{name}.{topic}", 1): None})
                   for partition, offset, headers in zip(batch.partitions, batch.offsets,
                                                         batch.headers, strict=True)]
        assert len(written) == len(RECORDS)
        assert all(headers[ORIGIN_HEADER].startswith(f"{name}.{upstream}/".encode())
                   for _p, _o, headers in written)
    offsets = sorted((partition, offset) for partition, offset, _headers in written)

    lake = pq.read_table(tmp_path / "lake")
    assert sorted(zip(lake.column(PARTITION).to_pylist(), lake.column(OFFSET).to_pylist(),
                      strict=True)) == offsets
    assert set(lake.column(CONFIG_HASH).to_pylist()) == {config_hash(config)}
    assert lake.column(MODEL_VERSION).to_pylist() == lake.column("model_version").to_pylist()
    assert lake.column(MODEL_VERSION).null_count == 0
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
    versions = lake.column("model_version").to_pylist()
    assert min(m["model_version"]["min"] for m in lake_manifests) == min(versions)
    assert max(m["model_version"]["max"] for m in lake_manifests) == max(versions)
    assert main(["lineage", "show", str(tmp_path / "wh.duckdb"), "--table", "events"]) == 0
    assert "commits with a manifest, 30 rows" in capsys.readouterr().out

    code, traced = cli_json(capsys, "lineage", "trace", str(file), "--sink", "wh", "--row", "7",
                            "--json")
    assert code == 0
    row, hops = traced["row"], traced["trace"]
    assert (row["partition"], row["offset"]) == offsets[7]
    assert [(hop["topic"], hop["retained"]) for hop in hops] == [
        (f"{name}.scored", True), (f"{name}.clean", True), (f"{name}.raw", True)]
    assert [hop["written_by"] for hop in hops] == [["model m"], ["processor clean"], ["source src"]]
    assert ORIGIN_HEADER not in hops[2]["headers"]
    source = json.loads(hops[2]["value"])
    assert source == RECORDS[source["id"]]  # the record as the source read it, noise included
    cleaned = {k: v for k, v in source.items() if k != "noise"}
    assert json.loads(hops[1]["value"]) == cleaned
    scored = json.loads(hops[0]["value"])
    assert {k: scored[k] for k in cleaned} == cleaned and "model_version" in scored
    assert main(["lineage", "trace", str(file), "--sink", "lake", "--row", "0"]) == 0
    assert "the source record" in capsys.readouterr().out


def test_postgres_stores_the_manifest_in_the_flush_transaction(postgres_dsn: str) -> None:
    with postgres_names(postgres_dsn) as (pipeline, table):
        config = (Pipeline(pipeline, bootstrap="localhost:9092")
                  .sink("pg", "postgres", input="in", dsn=postgres_dsn, table=table,
                        lineage_columns=True, lineage_manifest=True).build())
        settings = PostgresConfig(dsn=postgres_dsn, table=table)
        sink = LineageSink(PostgresSink(settings, ComponentContext(pipeline, "pg")),
                           config.sinks[0], config, "hash")
        sink.open()
        try:
            def write(offsets: list[int]) -> None:
                batch = ConsumedBatch(topics=["in"] * len(offsets), partitions=[0] * len(offsets),
                                      offsets=offsets)
                rows = sink.annotate(pa.table({"x": offsets}), batch, np.arange(len(offsets)))
                sink.write(rows, ("in", 0), offsets[0])

            write([0, 1, 2])
            sink.flush({("in", 0): 3}, "c1")
            write([3, 4])
            sink.close()  # not flushed: the rows and the manifest roll back together
            sink.open()
            write([3, 4, 6])
            sink.flush({("in", 0): 7}, "c1")
        finally:
            sink.close()
        try:
            output = lineage_cli.resolve(postgres_dsn.replace("postgresql://", "postgres://", 1),
                                         table=table)
            found = lineage_cli.manifests(output)
            assert [(m["rows"], m["offsets"][0]["first_offset"], m["offsets"][0]["last_offset"],
                     m["offsets"][0]["next_offset"]) for m in found] == [(3, 0, 2, 3), (3, 3, 6, 7)]
            assert lineage_cli.lineage_rows(output).column("offset").to_pylist() == [
                0, 1, 2, 3, 4, 6]
        finally:
            with psycopg.connect(postgres_dsn, autocommit=True) as connection:
                connection.execute("DELETE FROM streamflow_lineage WHERE table_name = %s", (table,))

