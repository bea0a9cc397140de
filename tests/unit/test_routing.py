"""The route step and the stage's output per topic."""

from __future__ import annotations

import json

from streamflow.config import parse_pipeline
from streamflow.runtime.stages import output_batches
from tests.tables import step, with_rows

TOPIC = "_sf_topic"


def test_first_matching_route_wins_and_unmatched_rows_take_the_default() -> None:
    route = step("route", {"routes": [{"when": "t > 30", "topic": "hot"},
                                      {"when": "t > 20", "topic": "warm"}]})
    result = route.process(with_rows({"t": [35, 25, 10, None]}))
    assert result.table[TOPIC].to_pylist() == ["hot", "warm", None, None]
    defaulted = step("route", {"routes": [{"when": "t > 30", "topic": "hot"}], "default": "cold"})
    assert defaulted.process(with_rows({"t": [35, 10]})).table[TOPIC].to_pylist() == ["hot", "cold"]


def test_a_later_route_overrides_only_where_it_matches() -> None:
    first = step("route", {"routes": [{"when": "t > 30", "topic": "hot"}]})
    second = step("route", {"routes": [{"when": "t < 0", "topic": "frozen"}]})
    table = first.process(with_rows({"t": [35, -5, 10]})).table
    assert second.process(table).table[TOPIC].to_pylist() == ["hot", "frozen", None]


def test_output_batches_group_rows_by_topic_with_keys_and_timestamps() -> None:
    table = step("route", {"routes": [{"when": "t > 30", "topic": "hot"}]}).process(
        with_rows({"t": [35, 10, 40]}, [2, 0, 1])).table
    batches = {b.topic: b for b in output_batches(table, "out", [b"k0", b"k1", b"k2"], [10, 11, 12])}
    assert set(batches) == {"hot", "out"}
    assert [json.loads(v) for v in batches["hot"].values] == [{"t": 35}, {"t": 40}]
    assert list(batches["hot"].keys) == [b"k2", b"k1"] and list(batches["hot"].timestamps_ms) == [12, 11]
    assert list(batches["out"].keys) == [b"k0"]
    assert json.loads(batches["out"].values[0]) == {"t": 10}  # no hidden columns


def test_routed_topics_are_created() -> None:
    config = parse_pipeline({
        "pipeline": "p",
        "processors": [{"name": "split", "input": "in", "output": "out", "steps": [
            {"route": {"routes": [{"when": "x > 1", "topic": "big"}], "default": "small"}}]}],
    })
    assert {"in", "out", "big", "small", "p.dlq"} <= {t.name for t in config.topic_specs()}
