"""Built-in connectors: the generator is deterministic and resumable; Parquet files appear whole."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.sinks.parquet import ParquetConfig, ParquetSink
from connectors.sources.generator import GeneratorConfig, GeneratorSource
from streamflow.plugins import SINK_GROUP, SOURCE_GROUP, ComponentContext, SinkRecordError, discover

CONTEXT = ComponentContext("p", "c")


def drain(source: GeneratorSource, batch: int) -> list[bytes]:
    values: list[bytes] = []
    while (polled := source.poll(batch, 0.01)) is not None:
        values += polled.values
    return values


def test_generator_resumes_exactly_where_it_stopped() -> None:
    config = GeneratorConfig(count=500, rate=0, seed=3, malformed_fraction=0.1)
    whole = GeneratorSource(config, CONTEXT)
    whole.open(None)
    everything = drain(whole, 64)

    first = GeneratorSource(config, CONTEXT)
    first.open(None)
    head = first.poll(123, 0.01)
    assert head is not None
    second = GeneratorSource(config, CONTEXT)
    second.open(first.position())
    assert head.values + drain(second, 50) == everything
    assert len(everything) == 500


def test_generator_honours_its_rate() -> None:
    source = GeneratorSource(GeneratorConfig(rate=50), CONTEXT)
    source.open(None)
    polled = source.poll(1000, 0.05)
    assert polled is not None and len(polled) <= 5


def test_parquet_sink_names_files_by_partition_offset_and_cluster(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    sink.open()
    sink.write(pa.table({"x": [1, 2]}), ("t", 1), 40)
    sink.write(pa.table({"x": [3]}), ("t", 1), 42)
    assert not list(tmp_path.rglob("*.parquet")), "nothing is visible before flush"
    sink.flush({("t", 1): 43}, "cluster")
    files = sorted(tmp_path.rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["t+0001+00000000000000000040+cluster.parquet"]
    assert pq.read_table(files[-1])["x"].to_pylist() == [1, 2, 3]
    # A replay of the same records overwrites the same file.
    sink.write(pa.table({"x": [1, 2, 3]}), ("t", 1), 40)
    sink.flush({("t", 1): 43}, "cluster")
    assert len([f for f in tmp_path.rglob("*") if f.is_file()]) == 1


def test_parquet_files_of_another_cluster_never_overwrite_or_mix(tmp_path: Path) -> None:
    """A new in-memory embedded broker (a new cluster id) starts its offsets at 0 again."""
    for cluster, values in (("streamflow-aaa", [1, 2]), ("streamflow-b+c/d", [3, 4])):
        sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
        sink.open()
        sink.write(pa.table({"x": values}), ("t", 0), 0)
        sink.flush({("t", 0): 2}, cluster)
    files = parquet_files(tmp_path)
    assert files == ["t/t+0000+00000000000000000000+streamflow-aaa.parquet",
                     "t/t+0000+00000000000000000000+streamflow-b%2Bc%2Fd.parquet"]
    assert [pq.read_table(tmp_path / name)["x"].to_pylist() for name in files] == [[1, 2], [3, 4]]


def test_leftover_temporary_files_are_removed_on_open(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "t+0000+00000000000000000000.parquet.tmp").write_bytes(b"partial")
    ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT).open()
    assert not list(tmp_path.rglob("*.tmp"))


def test_builtins_register_through_entry_points() -> None:
    assert discover(SOURCE_GROUP)["generator"].value == "connectors.sources.generator:GeneratorSource"
    assert discover(SINK_GROUP)["parquet"].value == "connectors.sinks.parquet:ParquetSink"


def parquet_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.parquet"))


def test_parquet_sink_partitions_by_field_values_and_replays_onto_the_same_files(
    tmp_path: Path,
) -> None:
    config = ParquetConfig(path=str(tmp_path), partition_by=["day", "site"])
    batch = pa.table({"day": ["2024-01-01", "2024-01-02", "2024-01-01", None],
                      "site": ["a/b", "c", "a/b", "c"], "x": [1, 2, 3, 4]})
    sink = ParquetSink(config, CONTEXT)
    sink.open()
    sink.write(batch, ("t", 0), 7)
    sink.flush({("t", 0): 11}, "cluster")
    assert parquet_files(tmp_path) == [
        "t/day=2024-01-01/site=a%2Fb/t+0000+00000000000000000007+cluster.parquet",
        "t/day=2024-01-02/site=c/t+0000+00000000000000000007+cluster.parquet",
        "t/day=__HIVE_DEFAULT_PARTITION__/site=c/t+0000+00000000000000000007+cluster.parquet",
    ]
    first = tmp_path / "t/day=2024-01-01/site=a%2Fb/t+0000+00000000000000000007+cluster.parquet"
    assert pq.read_table(first)["x"].to_pylist() == [1, 3]
    # After a crash the same records come again from offset 7: the same files are rewritten.
    replay = ParquetSink(config, CONTEXT)
    replay.open()
    replay.write(batch, ("t", 0), 7)
    replay.flush({("t", 0): 11}, "cluster")
    assert len(parquet_files(tmp_path)) == 3
    assert sum(pq.read_table(tmp_path / name).num_rows for name in parquet_files(tmp_path)) == 4


def test_parquet_sink_asks_for_a_flush_when_a_file_reaches_its_size(tmp_path: Path) -> None:
    by_rows = ParquetSink(ParquetConfig(path=str(tmp_path), roll_rows=3), CONTEXT)
    by_rows.write(pa.table({"x": [1, 2]}), ("t", 0), 0)
    assert not by_rows.should_flush()
    by_rows.write(pa.table({"x": [3]}), ("t", 0), 2)
    assert by_rows.should_flush()
    by_rows.flush({("t", 0): 3}, "cluster")
    assert not by_rows.should_flush()
    table = pa.table({"x": list(range(1000))})
    by_bytes = ParquetSink(ParquetConfig(path=str(tmp_path), roll_bytes=table.nbytes), CONTEXT)
    by_bytes.write(table.slice(0, 500), ("t", 1), 0)
    assert not by_bytes.should_flush()
    by_bytes.write(table.slice(500), ("t", 1), 500)
    assert by_bytes.should_flush()


def test_parquet_sink_rolls_files_by_event_time(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path), roll_interval_s=3600, time_field="ts"),
                       CONTEXT)
    hour = 3_600_000
    sink.write(pa.table({"ts": [5, hour + 1, 10, 2 * hour, None], "x": [1, 2, 3, 4, 5]}),
               ("t", 0), 0)
    sink.flush({("t", 0): 5}, "cluster")
    files = parquet_files(tmp_path)
    assert files == [f"t/t+0000+00000000000000000000+{start:015d}+cluster.parquet"
                     for start in (-1, 0, hour, 2 * hour)]
    assert pq.read_table(tmp_path / files[1])["x"].to_pylist() == [1, 3]


def test_parquet_sink_rejects_only_the_values_that_cannot_take_the_files_types(
    tmp_path: Path,
) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    sink.write(pa.table({"id": [1, 2], "x": [1.5, 2.5]}), ("t", 0), 0)
    with pytest.raises(SinkRecordError) as rejected:
        sink.write(pa.table({"id": [3, 4, 5], "x": ["3.5", "lots", "5"]}), ("t", 0), 2)
    assert rejected.value.rows == [1]
    assert "'x'" in str(rejected.value.errors[0]) and "lots" in str(rejected.value.errors[0])
    sink.write(pa.table({"id": [6], "x": [6.0], "new": ["field"]}), ("t", 0), 5)
    sink.flush({("t", 0): 6}, "cluster")
    [written] = tmp_path.rglob("*.parquet")
    rows = pq.read_table(written).to_pylist()
    assert [(row["id"], row["x"], row["new"]) for row in rows] == [
        (1, 1.5, None), (2, 2.5, None), (3, 3.5, None), (5, 5.0, None), (6, 6.0, "field")]
