"""SIGKILL of the built-in generator and file sources mid-stream, then a restart on the same
broker: every record arrives exactly once (positions are written with their batches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connectors.sources.generator import GeneratorConfig, sensor_event
from tests.helpers import read_topic
from tests.source_runs import TopicWatcher, kill_and_restart, source_pipeline, unique


def kill_mid_stream_then_finish(bootstrap: str, tmp_path: Path, source_type: str, total: int,
                                **settings: Any) -> list[bytes]:
    """Run the source, SIGKILL it once some records are out, restart it; all it published."""
    topic = unique("records")
    pipeline = source_pipeline(bootstrap, source_type, topic, partitions=2, **settings)
    pipeline["runtime"] = {"batch": {"max_records": 50}}
    watcher = TopicWatcher(bootstrap, topic, partitions=2)

    def not_finished() -> None:
        assert len(watcher.read()) < total, "the source finished before it was killed"

    try:
        kill_and_restart(pipeline, tmp_path, before_kill=lambda: watcher.wait_for(total // 5, timeout_s=60),
                         while_down=not_finished,
                         after_restart=lambda: watcher.wait_for(total, timeout_s=60))
    finally:
        watcher.close()
    return read_topic(bootstrap, topic).values


def test_generator_resumes_after_sigkill_with_nothing_lost_or_repeated(
    tmp_path: Path, bootstrap: str
) -> None:
    total = 6000
    values = kill_mid_stream_then_finish(bootstrap, tmp_path, "generator", total, count=total, rate=2000,
                                         seed=11)
    config = GeneratorConfig(count=total, seed=11)
    assert sorted(values) == sorted(sensor_event(config, i)[1] for i in range(total))


def test_file_source_resumes_after_sigkill_with_nothing_lost_or_repeated(
    tmp_path: Path, bootstrap: str
) -> None:
    total = 20_000
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"n": n, "pad": "x" * 200}) + "\n" for n in range(total)))
    values = kill_mid_stream_then_finish(bootstrap, tmp_path, "file", total, path=str(data))
    numbers = [json.loads(value)["n"] for value in values]
    assert sorted(numbers) == list(range(total))
