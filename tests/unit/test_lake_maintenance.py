"""Scheduled lake maintenance on real files: Parquet small-file compaction beside the parquet
sink (every row exactly once, replays after a restart included) and Delta optimize + vacuum."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.sinks import parquet
from connectors.sinks.parquet import ParquetConfig, ParquetSink
from streamflow.config.loader import parse_pipeline
from streamflow.plugins import ComponentContext
from streamflow.runtime import jobs
from streamflow.runtime.jobs import build_job, compact_parquet, delta_maintenance

CONTEXT = ComponentContext("p", "lake")
CONFIG = {"partition_by": ["day"]}


def rows(first: int, count: int) -> pa.Table:
    ids = list(range(first, first + count))
    return pa.table({"id": ids, "day": [f"2026-01-0{1 + i % 2}" for i in ids]})


def flush(sink: ParquetSink, partition: int, first: int, count: int) -> None:
    """One sink flush of the records at offsets first .. first+count-1 of ``partition``."""
    table = rows(first, count)
    sink.write(table.set_column(0, "id", pa.array([partition * 1000 + i for i in table["id"].to_pylist()])),
               ("t", partition), first)
    sink.flush({("t", partition): first + count}, "cluster")


def ids_on_disk(root: Path) -> Counter[int]:
    return Counter(i for path in root.rglob("*.parquet")
                   for i in pq.ParquetFile(path).read()["id"].to_pylist())


def files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.parquet"))


def written(partitions: int, flushes: int, size: int) -> Counter[int]:
    return Counter(p * 1000 + i for p in range(partitions) for i in range(flushes * size))


def test_compaction_keeps_every_row_once_and_leaves_the_newest_flush(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path), **CONFIG), CONTEXT)
    sink.open()
    for number in range(5):
        for partition in (0, 1):
            flush(sink, partition, number * 10, 10)
    newest = [name for name in files(tmp_path) if "+00000000000000000040+" in name]
    assert len(files(tmp_path)) == 20 and len(newest) == 4  # 2 days x 2 partitions

    result = compact_parquet(tmp_path / "t", max_file_bytes=1 << 20)
    assert (result.files_in, result.files_out, result.rows) == (16, 4, 80)
    assert ids_on_disk(tmp_path) == written(2, 5, 10)
    assert set(newest) <= set(files(tmp_path))
    assert len(files(tmp_path)) == 8
    compacted = tmp_path / "t/day=2026-01-01" / (
        "t+0000+00000000000000000000+compacted-00000000000000000030+cluster.parquet")
    assert pq.ParquetFile(compacted).read()["id"].to_pylist() == list(range(0, 40, 2))
    # nothing more to merge until the sink writes more
    assert compact_parquet(tmp_path / "t", max_file_bytes=1 << 20).files_in == 0


def test_a_restart_after_compaction_replays_onto_the_same_files(tmp_path: Path) -> None:
    """The parquet sink resumes at the group's committed offsets and rewrites the files of the
    flushes after them. The newest flush may not be committed: compaction left it alone, so its
    replay overwrites it instead of adding its rows twice."""
    config = ParquetConfig(path=str(tmp_path), **CONFIG)
    sink = ParquetSink(config, CONTEXT)
    sink.open()
    for number in range(4):
        flush(sink, 0, number * 10, 10)  # the commit of the last (offsets 30-39) is lost
    compact_parquet(tmp_path / "t", max_file_bytes=1 << 20)

    restarted = ParquetSink(config, CONTEXT)
    restarted.open()
    flush(restarted, 0, 30, 10)  # replay from the committed offset 30
    flush(restarted, 0, 40, 10)  # and on
    assert ids_on_disk(tmp_path) == written(1, 5, 10)
    compact_parquet(tmp_path / "t", max_file_bytes=1 << 20)  # the compacted file merges again
    assert ids_on_disk(tmp_path) == written(1, 5, 10)
    assert [name.rsplit("/", 1)[1] for name in files(tmp_path) if "day=2026-01-01" in name] == [
        "t+0000+00000000000000000000+compacted-00000000000000000030+cluster.parquet",
        "t+0000+00000000000000000040+cluster.parquet",
    ]


def test_an_interrupted_compaction_is_finished_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    sink.open()
    for number in range(4):
        flush(sink, 0, number * 10, 10)

    def crash(self: Path, missing_ok: bool = False) -> None:
        raise OSError("killed between the rename and the deletions")

    monkeypatch.setattr(Path, "unlink", crash)
    with pytest.raises(OSError, match="killed"):
        compact_parquet(tmp_path / "t", max_file_bytes=1 << 20)
    monkeypatch.undo()
    assert sum(ids_on_disk(tmp_path).values()) == 70  # the compacted file beside its sources
    compact_parquet(tmp_path / "t", max_file_bytes=1 << 20)
    assert ids_on_disk(tmp_path) == written(1, 4, 10)
    assert len(files(tmp_path)) == 2


def test_files_in_progress_and_large_files_are_left_alone(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    sink.open()
    flush(sink, 0, 0, 500)  # large
    for number in range(3):
        flush(sink, 0, 500 + number * 10, 10)
    in_progress = tmp_path / "t" / "t+0000+00000000000000000600+cluster.parquet.tmp"
    in_progress.write_bytes(b"being written")
    large = tmp_path / "t" / "t+0000+00000000000000000000+cluster.parquet"
    limit = large.stat().st_size
    result = compact_parquet(tmp_path / "t", max_file_bytes=limit)
    assert (result.files_in, result.files_out) == (2, 1)
    assert large.exists() and in_progress.read_bytes() == b"being written"
    assert ids_on_disk(tmp_path) == written(1, 53, 10)


def test_files_whose_types_cannot_merge_are_left_as_they_are(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    for offset, values in ((0, [1, 2]), (2, ["a", "b"]), (4, [3])):
        pq.write_table(pa.table({"x": values}), folder / f"t+0000+{offset:020d}+c.parquet")
    assert compact_parquet(folder, max_file_bytes=1 << 20).files_in == 0
    assert len(list(folder.iterdir())) == 3


def test_the_scheduled_compaction_job_works_on_the_sinks_folder(tmp_path: Path) -> None:
    config = parse_pipeline({
        "pipeline": "p",
        "sources": [{"name": "gen", "type": "generator", "topic": "t"}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "t", "path": str(tmp_path)}],
        "schedules": [{"name": "compact", "cron": "*/5 * * * *", "compact_parquet": {"sink": "lake"}}],
    })
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    sink.open()
    for number in range(3):
        flush(sink, 0, number * 10, 10)
    outcome = build_job(config.schedules[0], config)()
    assert str(outcome) == "2 files compacted into 1 (20 rows)"


def test_the_job_reads_the_names_the_sink_writes(tmp_path: Path) -> None:
    sink = ParquetSink(ParquetConfig(path=str(tmp_path)), CONTEXT)
    names = [sink.file_path(("t.x-1", 12), 345, "streamflow-b+c/d", ["day=a"], bucket).name
             for bucket in (None, 1_700_000_000_000, -1)]
    matches = [jobs.SINK_FILE.match(name) for name in names]
    assert [(m["topic"], m["partition"], m["first"], m["cluster"]) for m in matches if m] == [
        ("t.x-1", "0012", f"{345:020d}", "streamflow-b%2Bc%2Fd")] * 3
    assert jobs.TEMPORARY_SUFFIX == parquet.TEMPORARY_SUFFIX  # the sink deletes them on open


def test_delta_optimize_and_vacuum_keep_rows_and_offsets(tmp_path: Path) -> None:
    deltalake = pytest.importorskip("deltalake")
    from connectors.sinks.delta import DeltaConfig, DeltaSink

    sink = DeltaSink(DeltaConfig(path=str(tmp_path)), CONTEXT)
    sink.open()
    for number in range(4):
        sink.write(pa.table({"id": list(range(number * 10, number * 10 + 10))}), ("t", 0), number * 10)
        sink.flush({("t", 0): number * 10 + 10}, "cluster")
    assert len(deltalake.DeltaTable(str(tmp_path)).file_uris()) == 4

    outcome = delta_maintenance(str(tmp_path), {}, optimize=True, vacuum_retention_hours=0)
    assert outcome == "optimize: 4 files into 1; vacuum: 4 files deleted"
    table = deltalake.DeltaTable(str(tmp_path))
    assert len(table.file_uris()) == 1
    assert len(list(tmp_path.glob("*.parquet"))) == 1
    assert sorted(table.to_pyarrow_table()["id"].to_pylist()) == list(range(40))
    reopened = DeltaSink(DeltaConfig(path=str(tmp_path)), CONTEXT)
    reopened.open()
    assert reopened.resume_offsets([("t", 0)], "cluster") == {("t", 0): 40}
