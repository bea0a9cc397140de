"""The dedupe step: repeats within the window are filtered; state stays bounded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamflow.plugins import PARTITION_COLUMN, ROW_ID, Processor
from streamflow.processing.dedupe import DedupeStep, MissingTimeError
from tests.tables import step, with_rows


def test_repeats_within_the_event_time_window_are_filtered() -> None:
    dedupe = step("dedupe", {"key": ["id", "kind"], "window_s": 10, "time_field": "ts", "time_unit": "s"})
    first = dedupe.process(with_rows({
        "id": ["a", "a", "a", "b", "a"], "kind": [1, 1, 2, 1, 1], "ts": [100, 105, 106, 107, 111],
    }))
    # a/1 at 105 repeats the one at 100; a/1 at 111 is past the window and passes again
    assert first.table[ROW_ID].to_pylist() == [0, 2, 3, 4]
    second = dedupe.process(with_rows({"id": ["b", "a"], "kind": [1, 1], "ts": [116, 121]}))
    assert second.table[ROW_ID].to_pylist() == [1]


def test_timestamps_and_a_single_key_field_work_and_missing_times_fail() -> None:
    dedupe = step("dedupe", {"key": "id", "window_s": 60, "time_field": "ts"})
    ts = pa.array([datetime(2024, 1, 1, 0, 0, tzinfo=UTC), datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC),
                   None], pa.timestamp("us", tz="UTC"))
    result = dedupe.process(with_rows(pa.table({"id": ["a", "a", "a"], "ts": ts})))
    assert result.table[ROW_ID].to_pylist() == [0]
    assert [(row, type(error)) for row, error in result.failures] == [(2, MissingTimeError)]


def test_processing_time_and_bounded_state() -> None:
    dedupe = step("dedupe", {"key": "id", "window_s": 3600, "max_keys": 2})
    assert isinstance(dedupe, DedupeStep)
    dedupe.process(with_rows({"id": ["a", "b", "c"]}))
    assert len(dedupe.partitions[0].first_seen) == 2  # "a" was forgotten first
    result = dedupe.process(with_rows({"id": ["a", "c", "c"]}))
    assert result.table[ROW_ID].to_pylist() == [0]


def in_partitions(columns: dict[str, list[Any]], partitions: list[int]) -> pa.Table:
    return with_rows(columns).append_column(PARTITION_COLUMN, pa.array(partitions))


def test_partitions_keep_their_keys_apart_and_a_snapshot_restores_them() -> None:
    dedupe = step("dedupe", {"key": "id", "window_s": 60, "time_field": "ts", "time_unit": "s"})
    assert isinstance(dedupe, DedupeStep)
    first = dedupe.process(in_partitions({"id": ["a", "a", "b"], "ts": [1, 2, 3]}, [0, 1, 0]))
    assert first.table[ROW_ID].to_pylist() == [0, 1, 2]  # "a" once in each partition
    saved = {partition: dedupe.snapshot(partition) for partition in (0, 1)}

    restored = step("dedupe", {"key": "id", "window_s": 60, "time_field": "ts", "time_unit": "s"})
    assert isinstance(restored, DedupeStep)
    restored.restore(0, saved[0])
    restored.restore(1, None)  # partition 1 starts empty: its "a" passes again
    again = restored.process(in_partitions({"id": ["a", "b", "a"], "ts": [4, 5, 6]}, [0, 0, 1]))
    assert again.table[ROW_ID].to_pylist() == [2]
    restored.revoke(0)
    assert 0 not in restored.partitions
    with pytest.raises(ValueError, match="not a dedupe snapshot"):
        restored.restore(0, b"not a snapshot")


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 3), st.integers(0, 200)),
                max_size=60),
       st.integers(0, 60))
def test_a_snapshot_between_any_two_batches_changes_nothing(
    records: list[tuple[str, int, int]], cut: int
) -> None:
    """Records split at any point, with every partition snapshotted and restored into a new
    step between the parts, pass exactly as they do through one step."""
    settings = {"key": "id", "window_s": 50, "time_field": "ts", "time_unit": "s", "max_keys": 3}
    records = sorted(records, key=lambda record: record[2])

    def run(dedupe: Processor[Any], part: list[tuple[str, int, int]]) -> list[int]:
        if not part:
            return []
        ids, partitions, times = (list(column) for column in zip(*part, strict=True))
        return dedupe.process(in_partitions({"id": ids, "ts": times}, partitions)
                              ).table[ROW_ID].to_pylist()

    whole = run(step("dedupe", settings), records)
    before = step("dedupe", settings)
    passed = run(before, records[:cut])
    after = step("dedupe", settings)
    assert isinstance(before, DedupeStep) and isinstance(after, DedupeStep)
    for partition in range(4):
        after.restore(partition, before.snapshot(partition))
    passed += [row + len(records[:cut]) for row in run(after, records[cut:])]
    assert passed == whole
