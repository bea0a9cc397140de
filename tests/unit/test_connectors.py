"""Built-in connectors: the generator is deterministic and resumable; Parquet files appear whole."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from connectors.sinks.parquet import ParquetConfig, ParquetSink
from connectors.sources.generator import GeneratorConfig, GeneratorSource
from streamflow.plugins import SINK_GROUP, SOURCE_GROUP, ComponentContext, discover

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


def test_parquet_sink_names_files_by_partition_and_offset(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    sink.open()
    sink.write(pa.table({"x": [1, 2]}), ("t", 1), 40)
    sink.write(pa.table({"x": [3]}), ("t", 1), 42)
    assert not list(tmp_path.rglob("*.parquet")), "nothing is visible before flush"
    sink.flush({("t", 1): 43}, "cluster")
    files = sorted(tmp_path.rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["t+0001+00000000000000000040.parquet"]
    assert pq.read_table(files[-1])["x"].to_pylist() == [1, 2, 3]
    # A replay of the same records overwrites the same file.
    sink.write(pa.table({"x": [1, 2, 3]}), ("t", 1), 40)
    sink.flush({("t", 1): 43}, "cluster")
    assert len([f for f in tmp_path.rglob("*") if f.is_file()]) == 1


def test_leftover_temporary_files_are_removed_on_open(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "t+0000+00000000000000000000.parquet.tmp").write_bytes(b"partial")
    ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT).open()
    assert not list(tmp_path.rglob("*.tmp"))


def test_builtins_register_through_entry_points() -> None:
    assert discover(SOURCE_GROUP)["generator"].value == "connectors.sources.generator:GeneratorSource"
    assert discover(SINK_GROUP)["parquet"].value == "connectors.sinks.parquet:ParquetSink"
