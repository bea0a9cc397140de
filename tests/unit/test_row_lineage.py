"""Row-level lineage without a broker: the lineage columns, the manifest of each commit as each
sink stores it, ``lineage show`` reading them back, and a trace through ``sf-origin`` headers
on the in-memory transport."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from connectors.sinks.delta import DeltaConfig, DeltaSink
from connectors.sinks.duckdb import DuckDBConfig, DuckDBSink
from connectors.sinks.iceberg import IcebergConfig, IcebergSink
from connectors.sinks.parquet import ParquetConfig, ParquetSink
from connectors.sinks.warehouse import mapped_name
from streamflow.api import Pipeline
from streamflow.config.models import PipelineConfig
from streamflow.plugins import ComponentContext, Sink, SinkRecordError
from streamflow.runtime import jobs, lineage_cli
from streamflow.runtime.row_lineage import (
    CONFIG_HASH,
    MODEL_VERSION,
    OFFSET,
    ORIGIN_HEADER,
    PARTITION,
    TOPIC,
    LineageSink,
    lineage_count,
    model_upstream,
    origin_header,
    parse_origin,
)
from streamflow.runtime.semantics import check_pipeline
from streamflow.runtime.stages import output_batches
from streamflow.transport import ConsumedBatch, OutgoingBatch, TopicSpec, create_transport
from streamflow.transport.memory import drop_cluster

CONTEXT = ComponentContext("pl", "out")
HASH = "abc123def456"


def pipeline(sink_type: str = "parquet", model: bool = False, **settings: Any) -> PipelineConfig:
    """source → raw → (model m →) scored → sink ``out`` with lineage columns and manifests."""
    settings = settings or {"path": "out"}
    built = (Pipeline("pl", bootstrap="localhost:9092")
             .source("src", "generator", topic="raw", count=10)
             .processor("clean", input="raw", output="clean", steps=[{"drop": ["noise"]}]))
    if model:
        built = built.model("m", input="clean", output="scored",
                            estimator=[{"linear_model.LinearRegression": {}}], target="y")
    else:
        built = built.processor("pass", input="clean", output="scored", steps=[])
    return built.sink("out", sink_type, input="scored", lineage_columns=True,
                      lineage_manifest=True, **settings).build()


def consumed(topic: str, partition: int, offsets: list[int]) -> ConsumedBatch:
    return ConsumedBatch(topics=[topic] * len(offsets), partitions=[partition] * len(offsets),
                         offsets=offsets, keys=[None] * len(offsets),
                         values=[b"{}"] * len(offsets), timestamps_ms=[0] * len(offsets),
                         headers=[None] * len(offsets))


class NoSettings(BaseModel):
    pass


class Recording(Sink[NoSettings]):
    """Takes every row but those whose ``bad`` is true; remembers tables and manifests."""

    def __init__(self) -> None:
        super().__init__(NoSettings(), CONTEXT)
        self.tables: list[pa.Table] = []
        self.manifests: list[Mapping[str, Any]] = []

    def write(self, table: pa.Table, partition: tuple[str, int], first_offset: int) -> None:
        self.tables.append(table)
        bad = [row for row, value in enumerate(table.column("bad").to_pylist()) if value]
        if bad:
            raise SinkRecordError(bad, ValueError("bad"))

    def flush(self, offsets: Mapping[tuple[str, int], int], cluster_id: str) -> None:
        assert self.lineage_manifest is not None
        self.manifests.append(self.lineage_manifest)


def wrapped(inner: Sink, config: PipelineConfig) -> LineageSink:
    return LineageSink(inner, config.sinks[0], config, HASH)


def test_lineage_columns_carry_the_input_coordinates_and_keep_a_field_named_like_them() -> None:
    sink = wrapped(Recording(), pipeline(model=True))
    batch = consumed("scored", 3, [10, 11, 13, 14])
    part = pa.table({"x": [1, 2, 3], TOPIC: ["mine", "mine", "mine"],
                     "model_version": [4, 5, 5], "bad": [False, False, False]})
    table = sink.annotate(part, batch, np.array([0, 2, 3]))
    assert lineage_count(table) == 5
    assert table.column_names[:3] == ["x", TOPIC, "model_version"]  # the field comes first
    lineage = table.select(list(range(4, 9))).to_pydict()
    assert lineage == {TOPIC: ["scored"] * 3, PARTITION: [3, 3, 3], OFFSET: [10, 13, 14],
                       CONFIG_HASH: [HASH] * 3, MODEL_VERSION: [4, 5, 5]}


def test_without_a_model_upstream_there_is_no_model_version_column() -> None:
    config = pipeline()
    assert not model_upstream(config, "scored")
    assert model_upstream(pipeline(model=True), "scored")
    table = wrapped(Recording(), config).annotate(
        pa.table({"model_version": [1]}), consumed("scored", 0, [0]), np.array([0]))
    assert lineage_count(table) == 4 and MODEL_VERSION not in table.column_names


def test_the_manifest_covers_exactly_the_rows_the_sink_took() -> None:
    inner = Recording()
    sink = wrapped(inner, pipeline(model=True))
    first = sink.annotate(pa.table({"bad": [True, False, False], "model_version": [1, 2, 3]}),
                          consumed("scored", 0, [5, 6, 7]), np.arange(3))
    with pytest.raises(SinkRecordError):
        sink.write(first, ("scored", 0), 5)
    second = sink.annotate(pa.table({"bad": [False, True], "model_version": [3, 9]}),
                           consumed("scored", 1, [20, 21]), np.arange(2))
    with pytest.raises(SinkRecordError):
        sink.write(second, ("scored", 1), 20)
    sink.flush({("scored", 0): 8, ("scored", 1): 22, ("scored", 2): 4}, "cluster")
    manifest = inner.manifests[0]
    assert manifest["rows"] == 3
    assert manifest["offsets"] == [
        {"topic": "scored", "partition": 0, "first_offset": 6, "last_offset": 7,
         "next_offset": 8, "rows": 2},
        {"topic": "scored", "partition": 1, "first_offset": 20, "last_offset": 20,
         "next_offset": 22, "rows": 1},
        {"topic": "scored", "partition": 2, "first_offset": None, "last_offset": None,
         "next_offset": 4, "rows": 0},
    ]
    assert manifest["model_version"] == {"min": 2, "max": 3}
    assert manifest["config_hash"] == HASH and manifest["cluster_id"] == "cluster"
    assert manifest["started_at"] <= manifest["committed_at"]
    assert inner.lineage_manifest is None
    sink.flush({("scored", 0): 8}, "cluster")  # nothing written since: a fresh manifest
    assert inner.manifests[1]["rows"] == 0 and inner.manifests[1]["model_version"] is None


def test_a_manifest_alone_leaves_the_rows_as_they_were() -> None:
    inner = Recording()
    config = pipeline()
    config.sinks[0].lineage_columns = False
    sink = wrapped(inner, config)
    sink.write(sink.annotate(pa.table({"bad": [False]}), consumed("scored", 0, [0]),
                             np.arange(1)), ("scored", 0), 0)
    assert inner.tables[0].column_names == ["bad"]
    sink.flush({("scored", 0): 1}, "c")
    assert inner.manifests[0]["offsets"][0]["first_offset"] == 0


def records(sink: LineageSink, topic: str, partition: int, offsets: list[int],
            **fields: list[Any]) -> None:
    table = pa.table(fields or {"x": list(range(len(offsets)))})
    sink.write(sink.annotate(table, consumed(topic, partition, offsets), np.arange(len(offsets))),
               (topic, partition), offsets[0])


def test_parquet_sidecars_and_lineage_show(tmp_path: Path) -> None:
    config = pipeline(path=str(tmp_path))
    sink = wrapped(ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT), config)
    sink.open()
    records(sink, "scored", 0, [0, 1, 2], x=[1, 2, 3], **{OFFSET: ["mine", "a", "b"]})
    records(sink, "scored", 1, [7], x=[4], **{OFFSET: ["c"]})
    sink.flush({("scored", 0): 3, ("scored", 1): 8}, "c1")
    records(sink, "scored", 0, [3, 5], x=[5, 6], **{OFFSET: ["d", "e"]})
    sink.flush({("scored", 0): 6}, "c1")
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == 3 and all(f.with_name(f"_{f.name}.lineage.json").is_file() for f in files)
    first = pq.read_table(files[0])
    # The field named like the offset column is data: kept under its mapped column.
    assert first.column(mapped_name(OFFSET)).to_pylist() == ["mine", "a", "b"]
    assert first.column(OFFSET).to_pylist() == [0, 1, 2]
    output = lineage_cli.resolve(str(tmp_path))
    found = lineage_cli.manifests(output)
    covered = sorted((entry["partition"], entry["first_offset"], entry["last_offset"], entry["rows"])
                     for manifest in found for entry in manifest["offsets"])
    assert covered == [(0, 0, 2, 3), (0, 3, 5, 2), (1, 7, 7, 1)]
    text = "\n".join(lineage_cli.render_manifests(output, found))
    assert "2 commits with a manifest in 3 files, 6 rows" in text and f"config {HASH}" in text
    assert "scored[0] offsets 3..5, 2 rows (next offset 6)" in text
    rows = lineage_cli.lineage_rows(output)
    assert rows.column("offset").to_pylist() == [0, 1, 2, 3, 5, 7]
    # pyarrow reads the folder without the sidecars (their names start with "_").
    assert pq.read_table(tmp_path).num_rows == 6


def test_compaction_keeps_the_manifests_of_the_files_it_replaces(tmp_path: Path) -> None:
    config = pipeline(path=str(tmp_path))
    sink = wrapped(ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT), config)
    sink.open()
    output = lineage_cli.resolve(str(tmp_path))

    def flushes(first: int, count: int) -> None:
        for offset in range(first, first + count):
            records(sink, "scored", 0, [offset], x=[offset])
            sink.flush({("scored", 0): offset + 1}, "c1")

    def covered() -> list[tuple[str, int, int]]:
        return sorted((Path(manifest["file"]).name.split("+")[3], entry["first_offset"],
                       entry["rows"]) for manifest in lineage_cli.manifests(output)
                      for entry in manifest["offsets"])

    flushes(0, 4)
    assert jobs.compact_parquet(tmp_path / "scored", 1 << 20).files_in == 3
    assert covered() == [("c1.parquet", 3, 1)] + [("compacted-00000000000000000002", offset, 1)
                                                  for offset in range(3)]
    assert len(list(tmp_path.rglob("_*.lineage.json"))) == 2  # the replaced files' are gone
    flushes(4, 2)  # compacted again with newer files: the manifests stay flat
    jobs.compact_parquet(tmp_path / "scored", 1 << 20)
    assert covered() == [("c1.parquet", 5, 1)] + [("compacted-00000000000000000004", offset, 1)
                                                  for offset in range(5)]
    text = "\n".join(lineage_cli.render_manifests(output, lineage_cli.manifests(output)))
    assert "6 commits with a manifest in 2 files, 6 rows" in text
    assert "(compacted from scored+0000+00000000000000000001+c1.parquet)" in text
    assert lineage_cli.lineage_rows(output).column("offset").to_pylist() == list(range(6))


def test_duckdb_stores_the_manifest_in_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    settings = DuckDBConfig(path=str(path), table="events")
    sink = wrapped(DuckDBSink(settings, CONTEXT), pipeline("duckdb", path=str(path), table="events"))
    sink.open()
    records(sink, "scored", 0, [0, 1], x=[1, 2])
    sink.flush({("scored", 0): 2}, "c1")
    records(sink, "scored", 0, [2], x=[3])
    sink.close()  # not flushed: the rows and the manifest roll back together
    sink.open()
    records(sink, "scored", 0, [2, 3], x=[3, 4])
    sink.flush({("scored", 0): 4}, "c1")
    sink.close()
    found = lineage_cli.manifests(lineage_cli.resolve(str(path), table="events"))
    assert [(m["rows"], m["offsets"][0]["first_offset"], m["offsets"][0]["last_offset"])
            for m in found] == [(2, 0, 1), (2, 2, 3)]
    with duckdb.connect(str(path), read_only=True) as connection:
        assert connection.execute('SELECT count(*) FROM "events"').fetchone() == (4,)
    rows = lineage_cli.lineage_rows(lineage_cli.resolve(str(path), table="events"))
    assert rows.column("offset").to_pylist() == [0, 1, 2, 3]


def test_delta_commit_properties_hold_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "delta"
    sink = wrapped(DeltaSink(DeltaConfig(path=str(path)), CONTEXT),
                   pipeline("delta", path=str(path)))
    sink.open()
    records(sink, "scored", 1, [4, 5, 6])
    sink.flush({("scored", 1): 7}, "c1")
    found = lineage_cli.manifests(lineage_cli.resolve(str(path)))
    assert [(m["rows"], m["delta_version"], m["offsets"][0]["next_offset"]) for m in found] == [
        (3, 0, 7)]
    assert lineage_cli.lineage_rows(lineage_cli.resolve(str(path))).num_rows == 3


def test_iceberg_snapshot_summary_holds_the_manifest(tmp_path: Path) -> None:
    catalog = {"name": "local", "properties": {"type": "sql",
                                               "uri": f"sqlite:///{tmp_path}/catalog.db",
                                               "warehouse": f"file://{tmp_path}/iceberg"}}
    config = pipeline("iceberg", table="lake.events", catalog=catalog)
    sink = wrapped(IcebergSink(IcebergConfig(table="lake.events", catalog=catalog), CONTEXT),
                   config)
    sink.open()
    records(sink, "scored", 0, [0, 1])
    sink.flush({("scored", 0): 2}, "c1")
    records(sink, "scored", 0, [2])
    sink.flush({("scored", 0): 3}, "c1")
    file = tmp_path / "pipeline.yaml"
    file.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True)))
    output = lineage_cli.resolve(str(file), sink="out")
    found = lineage_cli.manifests(output)
    assert [m["rows"] for m in found] == [2, 1]
    assert all("iceberg_snapshot" in m for m in found)
    assert lineage_cli.lineage_rows(output).column("offset").to_pylist() == [0, 1, 2]


def test_origin_headers_only_when_asked() -> None:
    table = pa.table({"_sf_row": [1, 0], "v": [1, 2]})
    batch = consumed("raw", 2, [40, 41])
    plain = output_batches(table, "out", batch.keys, batch.timestamps_ms)
    assert not plain[0].headers
    traced = output_batches(table, "out", batch.keys, batch.timestamps_ms, batch)
    assert traced[0].headers == [[(ORIGIN_HEADER, b"raw/2/41")], [(ORIGIN_HEADER, b"raw/2/40")]]
    assert parse_origin(origin_header("a.b-c", 1, 99)) == ("a.b-c", 1, 99)


def test_a_manifest_on_a_sink_without_commits_is_a_warning() -> None:
    config = (Pipeline("pl", bootstrap="localhost:9092")
              .source("src", "generator", topic="raw", count=1)
              .sink("copy", "kafka", input="raw", topic="copy", lineage_manifest=True)
              .sink("show", "console", input="raw", lineage_columns=True).build())
    assert [(found.severity, found.path) for found in check_pipeline(config, "p.yaml")] == [
        ("warning", "sinks[0].lineage_manifest")]


@pytest.fixture
def cluster() -> Iterator[str]:
    name = f"memory://lineage-{uuid.uuid4().hex[:10]}"
    yield name
    drop_cluster(name)


def test_trace_walks_the_origin_headers_back_to_the_source_record(cluster: str) -> None:
    transport = create_transport("memory", cluster)
    admin = transport.admin()
    admin.create_topics([TopicSpec("raw"), TopicSpec("clean"), TopicSpec("scored")])
    admin.close()
    producer = transport.producer()
    producer.produce([OutgoingBatch("raw", [b'{"n": 0}', b'{"n": 1}'], [b"k0", b"k1"])])
    producer.produce([OutgoingBatch("clean", [b'{"n": 1}'],
                                    headers=[[(ORIGIN_HEADER, origin_header("raw", 0, 1))]]),
                      OutgoingBatch("clean", [b'{"count": 2}'])])  # like a window's aggregate
    producer.produce([OutgoingBatch("scored", [b'{"n": 1, "p": 2}'],
                                    headers=[[(ORIGIN_HEADER, origin_header("clean", 0, 0))]]),
                      OutgoingBatch("scored", [b'{"gone": 1}'],
                                    headers=[[(ORIGIN_HEADER, origin_header("clean", 0, 5))]])])
    producer.close()
    hops = lineage_cli.trace(transport, "scored", 0, 0, pipeline())
    assert [(hop.topic, hop.offset, hop.retained) for hop in hops] == [
        ("scored", 0, True), ("clean", 0, True), ("raw", 1, True)]
    assert hops[-1].value == '{"n": 1}' and hops[-1].key == "k1"
    assert hops[-1].written_by == ["source src"] and hops[1].written_by == ["processor clean"]
    assert list(lineage_cli.render_trace(hops))[-2:] == [
        "    raw[0]@1 (written by source src): the source record",
        "      key 'k1'  timestamp_ms " + str(hops[-1].timestamp_ms) + '  value {"n": 1}']
    lost = lineage_cli.trace(transport, "scored", 0, 1, pipeline())
    assert [(hop.topic, hop.offset, hop.retained) for hop in lost] == [
        ("scored", 1, True), ("clean", 5, False)]
    assert list(lineage_cli.render_trace(lost))[-1] == (
        "  clean[0]@5 (written by processor clean): no longer retained by the topic")
    # A stage's record without an origin (a window's aggregate) is not taken for a source's.
    stopped = lineage_cli.trace(transport, "clean", 0, 1, pipeline())
    assert len(stopped) == 1
    assert "no sf-origin header" in next(lineage_cli.render_trace(stopped))
