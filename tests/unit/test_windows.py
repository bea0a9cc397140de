"""Window logic without Kafka: hand-computed tumbling, hopping and session results with
out-of-order and late records, both emission modes, every aggregate, the quantile's error
bound, and invariance to batching, order, partition splits and snapshots."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamflow.api import Pipeline, window
from streamflow.config.loader import ConfigError, load_pipeline, parse_pipeline
from streamflow.config.models import WindowConfig
from streamflow.processing.windows import (
    PartitionWindows,
    QuantileSketch,
    SnapshotError,
    WindowRecordError,
    event_time_ms,
    iso_utc,
    record_values,
    window_record,
)

ALL = {
    "n": {"fn": "count"}, "total": {"fn": "sum", "field": "x"}, "avg": {"fn": "mean", "field": "x"},
    "low": {"fn": "min", "field": "x"}, "high": {"fn": "max", "field": "x"},
    "first_x": {"fn": "first", "field": "x"}, "last_x": {"fn": "last", "field": "x"},
    "median": {"fn": "quantile", "field": "x", "q": 0.5},
}
Event = tuple[str, int, Any]  # key, event time in seconds, x


def config(kind: str, aggregates: dict[str, Any] | None = None, **options: Any) -> WindowConfig:
    return WindowConfig.model_validate(
        {"kind": kind, "key": ["k"], "aggregates": aggregates or ALL, **options}
    )


def feed(state: PartitionWindows, events: list[Event],
         every: int = 1) -> tuple[list[dict[str, Any]], list[Any]]:
    """Add events (emitting after every ``every`` of them); the emitted records and late events."""
    emitted, late = [], []
    for number, (key, seconds, x) in enumerate(events, 1):
        values = record_values(list(state.config.aggregates.values()),
                               [x if spec.field else None for spec in state.config.aggregates.values()])
        added = state.add((key,), seconds * 1000, values)
        if added.missed:
            late.append((key, seconds, x, added.aggregated,
                         [(start // 1000, end // 1000) for start, end in added.missed]))
        if number % every == 0:
            emitted += [window_record(state.config, w) for w in state.emit()]
    emitted += [window_record(state.config, w) for w in state.emit()]
    return emitted, late


def at(seconds: int) -> str:
    return iso_utc(seconds * 1000)


def row(key: str, start: int, end: int, **aggregates: Any) -> dict[str, Any]:
    return {"k": key, "window_start": at(start), "window_end": at(end), **aggregates}


# --- hand-computed cases ----------------------------------------------------------------------

TUMBLING_EVENTS: list[Event] = [
    ("a", 1, 10), ("a", 3, 20), ("b", 2, 5), ("a", 12, 30),
    ("a", 9, 40),  # out of order; its window [0, 10) closed when 12 arrived: late
    ("a", 15, 50), ("a", 25, 60),
]


@pytest.mark.parametrize("every", [1, 3, 100])
def test_tumbling_final_every_aggregate_and_late_record(every: int) -> None:
    emitted, late = feed(PartitionWindows(config("tumbling", size_s=10), 0), TUMBLING_EVENTS, every)
    assert emitted == [
        row("a", 0, 10, n=2, total=30, avg=15.0, low=10, high=20, first_x=10, last_x=20,
            median=pytest.approx(10, rel=0.01)),
        row("b", 0, 10, n=1, total=5, avg=5.0, low=5, high=5, first_x=5, last_x=5,
            median=pytest.approx(5, rel=0.01)),
        row("a", 10, 20, n=2, total=80, avg=40.0, low=30, high=50, first_x=30, last_x=50,
            median=pytest.approx(30, rel=0.01)),
    ]
    assert late == [("a", 9, 40, False, [(0, 10)])]


def test_allowed_lateness_takes_the_out_of_order_record() -> None:
    state = PartitionWindows(config("tumbling", size_s=10, allowed_lateness_s=5), 0)
    emitted, late = feed(state, TUMBLING_EVENTS)
    assert late == []
    # 9 arrives while the watermark is 12 - 5 = 7; [0, 10) closes at 15, [10, 20) at 25.
    assert emitted == [
        row("a", 0, 10, n=3, total=70, avg=pytest.approx(70 / 3), low=10, high=40, first_x=10,
            last_x=40, median=pytest.approx(20, rel=0.01)),
        row("b", 0, 10, n=1, total=5, avg=5.0, low=5, high=5, first_x=5, last_x=5,
            median=pytest.approx(5, rel=0.01)),
        row("a", 10, 20, n=2, total=80, avg=40.0, low=30, high=50, first_x=30, last_x=50,
            median=pytest.approx(30, rel=0.01)),
    ]
    assert state.watermark == 20_000 and state.window_count() == 1  # [20, 30) stays open


def test_first_and_last_follow_event_time_not_arrival() -> None:
    state = PartitionWindows(config("tumbling", {"f": {"fn": "first", "field": "x"},
                                                 "l": {"fn": "last", "field": "x"}},
                                    size_s=10, allowed_lateness_s=100), 0)
    emitted, _ = feed(state, [("a", 5, "mid"), ("a", 9, "end"), ("a", 1, "start"), ("a", 300, "x")])
    assert emitted == [row("a", 0, 10, f="start", l="end")]


def test_hopping_windows_with_partly_and_wholly_late_records() -> None:
    state = PartitionWindows(config("hopping", {"total": {"fn": "sum", "field": "x"}},
                                    size_s=10, hop_s=5), 0)
    emitted, late = feed(state, [("a", 1, 1), ("a", 6, 2), ("a", 11, 3), ("a", 30, 4),
                                 ("a", 14, 5), ("a", 24, 6), ("a", 26, 7)])
    assert emitted == [
        row("a", -5, 5, total=1), row("a", 0, 10, total=3), row("a", 5, 15, total=5),
        row("a", 10, 20, total=3),
    ]
    assert late == [
        ("a", 14, 5, False, [(5, 15), (10, 20)]),
        ("a", 24, 6, False, [(15, 25), (20, 30)]),
        ("a", 26, 7, True, [(20, 30)]),  # still counted in [25, 35)
    ]
    open_windows = {(w.start // 1000, w.end // 1000): w.aggregates[0].result()
                    for windows in state.open.values() for w in windows.values()}
    assert open_windows == {(25, 35): 11, (30, 40): 4}


def test_session_windows_merge_out_of_order_and_reject_late() -> None:
    state = PartitionWindows(config("session", {"n": {"fn": "count"},
                                                "total": {"fn": "sum", "field": "x"},
                                                "first_x": {"fn": "first", "field": "x"},
                                                "last_x": {"fn": "last", "field": "x"}},
                                    gap_s=5, allowed_lateness_s=10), 0)
    emitted, late = feed(state, [
        ("a", 1, 1), ("a", 4, 2), ("b", 3, 100),
        ("a", 20, 3),  # watermark 10 closes a's [1, 9) and b's [3, 8)
        ("a", 12, 4),  # [12, 17): a session of its own, for now
        ("a", 16, 5),  # bridges [12, 17) and [20, 25) into [12, 25)
        ("a", 40, 6),  # watermark 30 closes [12, 25)
        ("a", 3, 7),   # [3, 8) ends before the watermark: late
    ])
    assert emitted == [
        row("b", 3, 8, n=1, total=100, first_x=100, last_x=100),
        row("a", 1, 9, n=2, total=3, first_x=1, last_x=2),
        row("a", 12, 25, n=3, total=12, first_x=4, last_x=3),
    ]
    assert late == [("a", 3, 7, False, [(3, 8)])]


def test_update_emission_emits_each_change_once_per_emit() -> None:
    state = PartitionWindows(config("tumbling", {"n": {"fn": "count"}}, size_s=10, emit="update"), 0)
    emitted, _ = feed(state, [("a", 1, None), ("a", 3, None), ("a", 12, None), ("b", 13, None)])
    assert emitted == [row("a", 0, 10, n=1), row("a", 0, 10, n=2), row("a", 10, 20, n=1),
                       row("b", 10, 20, n=1)]
    coalesced = PartitionWindows(config("tumbling", {"n": {"fn": "count"}}, size_s=10, emit="update"), 0)
    emitted, _ = feed(coalesced, [("a", 1, None), ("a", 3, None), ("a", 4, None)], every=100)
    assert emitted == [row("a", 0, 10, n=3)]


def test_update_emission_of_a_merged_session() -> None:
    state = PartitionWindows(config("session", {"n": {"fn": "count"}}, gap_s=5, emit="update",
                                    allowed_lateness_s=10), 0)
    emitted, _ = feed(state, [("a", 1, None), ("a", 9, None), ("a", 5, None)])
    assert emitted == [row("a", 1, 6, n=1), row("a", 9, 14, n=1), row("a", 1, 14, n=3)]


# --- records ------------------------------------------------------------------------------------


def test_event_times() -> None:
    assert event_time_ms(1_700_000_000_123) == 1_700_000_000_123
    assert event_time_ms(1_700_000_000.5, "s") == 1_700_000_000_500
    assert event_time_ms("2024-01-01T00:00:01.5Z") == 1_704_067_201_500
    assert event_time_ms("2024-01-01T01:00:00+01:00") == 1_704_067_200_000
    assert event_time_ms("2024-01-01 00:00:00") == 1_704_067_200_000  # no zone: UTC
    assert event_time_ms(datetime(2024, 1, 1, tzinfo=UTC)) == 1_704_067_200_000
    assert iso_utc(1_704_067_201_500) == "2024-01-01T00:00:01.500Z"
    for bad in (None, True, "yesterday", float("nan"), [1]):
        with pytest.raises(WindowRecordError):
            event_time_ms(bad)


def test_non_numeric_aggregate_fields_are_record_errors() -> None:
    specs = list(config("tumbling", size_s=1).aggregates.values())
    for bad in ("12", None, True, float("inf")):
        with pytest.raises(WindowRecordError, match="'x'"):
            record_values(specs, [bad] * len(specs))
    assert record_values(specs, [3] * len(specs)) == [3] * len(specs)


# --- the quantile sketch ------------------------------------------------------------------------


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
       st.floats(0, 1), st.sampled_from([0.001, 0.01, 0.05]))
def test_quantile_within_relative_error_of_the_exact_rank(values: list[float], q: float,
                                                          accuracy: float) -> None:
    sketch = QuantileSketch(accuracy)
    for value in values:
        sketch.add(value)
    exact = sorted(values)[math.floor(q * (len(values) - 1))]
    estimate = sketch.quantile(q)
    assert estimate is not None
    assert abs(estimate - exact) <= accuracy * abs(exact) * (1 + 1e-9) + QuantileSketch.MIN_MAGNITUDE


def test_quantile_of_a_known_distribution() -> None:
    sketch = QuantileSketch(0.01)
    for value in range(1, 10_001):
        sketch.add(float(value))
    for q, exact in ((0.5, 5000), (0.95, 9500), (0.99, 9900), (0.0, 1), (1.0, 10_000)):
        assert sketch.quantile(q) == pytest.approx(exact, rel=0.01)
    assert QuantileSketch(0.01).quantile(0.5) is None
    restored = QuantileSketch.from_state(sketch.state())
    assert restored.quantile(0.95) == sketch.quantile(0.95)


# --- invariants ---------------------------------------------------------------------------------

KINDS = [{"kind": "tumbling", "size_s": 10}, {"kind": "hopping", "size_s": 10, "hop_s": 4},
         {"kind": "session", "gap_s": 3}]
INTEGER_AGGREGATES = {name: spec for name, spec in ALL.items() if name != "avg"} | {
    "p90": {"fn": "quantile", "field": "x", "q": 0.9}}


def events_strategy() -> st.SearchStrategy[list[Event]]:
    """Events with distinct times (so first/last have no ties) and integer values."""
    return st.lists(st.integers(0, 120), min_size=1, max_size=40, unique=True).flatmap(
        lambda times: st.lists(st.tuples(st.sampled_from("ab"), st.integers(-50, 50)),
                               min_size=len(times), max_size=len(times)).map(
            lambda pairs: [(k, t, x) for t, (k, x) in zip(times, pairs, strict=True)]))


def open_results(state: PartitionWindows) -> list[dict[str, Any]]:
    return sorted((window_record(state.config, w) for windows in state.open.values()
                   for w in windows.values()), key=repr)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KINDS), events_strategy(), st.randoms(use_true_random=False))
def test_in_lateness_data_in_any_order_gives_the_same_windows(kind: dict[str, Any],
                                                              events: list[Event], rng: Any) -> None:
    window_config = config(aggregates=INTEGER_AGGREGATES, allowed_lateness_s=1000, **kind)
    in_order = PartitionWindows(window_config, 0)
    feed(in_order, sorted(events, key=lambda e: e[1]))
    shuffled = list(events)
    rng.shuffle(shuffled)
    any_order = PartitionWindows(window_config, 0)
    _, late = feed(any_order, shuffled, every=3)
    assert late == []
    assert open_results(any_order) == open_results(in_order)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KINDS[:2]), events_strategy(), st.integers(0, 40))
def test_states_of_split_input_merge_to_the_whole(kind: dict[str, Any], events: list[Event],
                                                  split: int) -> None:
    window_config = config(aggregates=INTEGER_AGGREGATES, allowed_lateness_s=1000, **kind)
    whole, first, second = (PartitionWindows(window_config, 0) for _ in range(3))
    feed(whole, events)
    feed(first, events[:split])
    feed(second, events[split:])
    for key, windows in second.open.items():
        for start, theirs in windows.items():
            mine = first.open.setdefault(key, {}).setdefault(start, theirs)
            if mine is not theirs:
                for aggregate, other in zip(mine.aggregates, theirs.aggregates, strict=True):
                    aggregate.merge(other)
    assert open_results(first) == open_results(whole)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KINDS), st.sampled_from(["final", "update"]), st.integers(0, 15),
       st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 200), st.integers(-5, 5)),
                max_size=40),
       st.integers(1, 7), st.integers(0, 40))
@example({"kind": "session", "gap_s": 3}, "update", 0, [("a", 1, 0), ("a", 0, 0)], 2, 0)
def test_batching_and_a_snapshot_restore_do_not_change_the_results(
    kind: dict[str, Any], emit: str, lateness: int, events: list[Event], every: int, cut: int
) -> None:
    """What is emitted and what is late depends on the records' order only: not on where the
    batches end, nor on a snapshot and restore in between."""
    window_config = config(aggregates=INTEGER_AGGREGATES, allowed_lateness_s=lateness, emit=emit,
                           **kind)
    reference = PartitionWindows(window_config, 0)
    expected, expected_late = feed(reference, events)
    before = PartitionWindows(window_config, 0)
    emitted, late = feed(before, events[:cut], every)
    restored = PartitionWindows.from_bytes(window_config, 0, before.to_bytes())
    after, late_after = feed(restored, events[cut:], every)
    assert late + late_after == expected_late
    if emit == "final":
        assert emitted + after == expected
    else:  # the last update of each window is the same
        batched, one_by_one = last_updates(emitted + after), last_updates(expected)
        assert batched == one_by_one
    assert open_results(restored) == open_results(reference)


def last_updates(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last update of each window, by key and start. A session's update covering an earlier
    one of the same key replaces it: a session extended to an earlier start within one batch is
    emitted under its new start only, while records one by one emit it under both."""
    last: dict[str, dict[str, Any]] = {}
    for record in records:
        for name in [name for name, earlier in last.items() if earlier["k"] == record["k"]
                     and record["window_start"] <= earlier["window_start"]
                     and record["window_end"] >= earlier["window_end"]]:
            del last[name]
        last[f"{record['k']}{record['window_start']}"] = record
    return last


def test_snapshot_of_other_settings_is_refused() -> None:
    state = PartitionWindows(config("tumbling", size_s=10), 3)
    feed(state, [("a", 1, 1)])
    restored = PartitionWindows.from_bytes(config("tumbling", size_s=10, emit="update"), 3,
                                           state.to_bytes())
    assert (restored.partition, restored.max_time) == (3, 1000)
    with pytest.raises(SnapshotError, match="settings changed"):
        PartitionWindows.from_bytes(config("tumbling", size_s=20), 3, state.to_bytes())
    with pytest.raises(SnapshotError, match="not a window snapshot"):
        PartitionWindows.from_bytes(config("tumbling", size_s=10), 3, b"garbage")


# --- configuration --------------------------------------------------------------------------------


def pipeline_with(window_block: dict[str, Any]) -> dict[str, Any]:
    return {"pipeline": "p", "processors": [{"name": "w", "input": "in", "output": "out",
                                             "window": window_block}]}


@pytest.mark.parametrize(("block", "message"), [
    ({"kind": "tumbling", "aggregates": {"n": {"fn": "count"}}},
     "processors[0].window: value error, tumbling windows take size_s; got none"),
    ({"kind": "session", "gap_s": 1, "size_s": 2, "aggregates": {"n": {"fn": "count"}}},
     "session windows take gap_s; got gap_s, size_s"),
    ({"kind": "hopping", "size_s": 5, "hop_s": 10, "aggregates": {"n": {"fn": "count"}}},
     "hop_s must not exceed size_s"),
    ({"kind": "tumbling", "size_s": 5, "aggregates": {"m": {"fn": "mean"}}},
     "processors[0].window.aggregates.m: value error, mean needs 'field'"),
    ({"kind": "tumbling", "size_s": 5, "aggregates": {"m": {"fn": "quantile", "field": "x"}}},
     "'q' (0 to 1, e.g. q: 0.95) goes with fn: quantile"),
    ({"kind": "tumbling", "size_s": 5, "aggregates": {"m": {"fn": "median", "field": "x"}}},
     "processors[0].window.aggregates.m.fn: input should be 'count'"),
    ({"kind": "tumbling", "size_s": 5, "key": ["window_end"], "aggregates": {"n": {"fn": "count"}}},
     "output field names must be unique"),
    ({"kind": "tumbling", "size_s": 5, "aggregates": {}},
     "processors[0].window.aggregates: dictionary should have at least 1 item"),
])
def test_bad_window_config_names_the_field(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_pipeline(pipeline_with(block))
    assert message in str(error.value)


def test_window_topics_and_python_api() -> None:
    built = (
        Pipeline("p")
        .processor("w", input="in", output="out", steps=[],
                   window=window("tumbling", size_s=60, key=["device"], time_field="ts",
                                 aggregates={"n": "count", "avg": "mean:temperature",
                                             "p95": {"fn": "quantile", "field": "temperature",
                                                     "q": 0.95}}))
        .build()
    )
    stage = built.processors[0]
    assert stage.window is not None and stage.window.aggregates["avg"].field == "temperature"
    specs = {topic.name: topic for topic in built.topic_specs()}
    assert specs["p.late"].partitions == 4
    assert specs["p.w.changelog"].partitions == 1
    assert specs["p.w.changelog"].config == {"cleanup.policy": "compact"}


def test_the_windows_example_is_valid() -> None:
    example = load_pipeline(Path(__file__).parents[2] / "examples" / "windows.yaml", environ={})
    window_config = example.processors[0].window
    assert window_config is not None and window_config.key == ["device_id"]
