"""The dedupe step: repeats within the window are filtered; state stays bounded."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from streamflow.plugins import ROW_ID
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
    assert len(dedupe.first_seen) == 2  # "a" was forgotten first
    result = dedupe.process(with_rows({"id": ["a", "c", "c"]}))
    assert result.table[ROW_ID].to_pylist() == [0]
