"""The file source in follow mode: appended lines (once complete) and new files of the glob."""

from __future__ import annotations

from pathlib import Path

from connectors.sources.file import FileConfig, FileSource
from streamflow.plugins import ComponentContext


def poll_all(source: FileSource) -> list[bytes]:
    values: list[bytes] = []
    for _ in range(5):
        batch = source.poll(100, 0.01)
        assert batch is not None, "a followed source never ends"
        values += batch.values
    return values


def test_follow_picks_up_appended_lines_and_new_files(tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    first.write_text('{"n": 1}\n{"n": 2}\n')
    source = FileSource(FileConfig(path=str(tmp_path / "*.jsonl"), follow=True),
                        ComponentContext("p", "f"))
    source.open(None)
    assert poll_all(source) == [b'{"n": 1}', b'{"n": 2}']
    with first.open("a") as handle:
        handle.write('{"n": 3}\n{"n": ')
    assert poll_all(source) == [b'{"n": 3}'], "a partial line was emitted"
    with first.open("a") as handle:
        handle.write("4}\n")
    assert poll_all(source) == [b'{"n": 4}']
    (tmp_path / "b.jsonl").write_text('{"n": 5}\n')
    assert poll_all(source) == [b'{"n": 5}']

    resumed = FileSource(source.config, ComponentContext("p", "f"))
    resumed.open(source.position())
    (tmp_path / "b.jsonl").open("a").write('{"n": 6}\n')
    (tmp_path / "c.jsonl").write_text('{"n": 7}\n')
    assert poll_all(resumed) == [b'{"n": 6}', b'{"n": 7}']
