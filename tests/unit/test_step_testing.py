"""``streamflow test``: the shipped example passes; failing cases exit 1 with a diff; invalid
test files exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamflow.cli import main

EXAMPLE = Path(__file__).parents[2] / "examples" / "quickstart.test.yaml"

PIPELINE = {
    "pipeline": "t",
    "processors": [{"name": "split", "input": "in", "output": "rest", "steps": [
        {"schema": {"id": {"type": "string", "required": True}, "t": {"type": "float"}}},
        {"route": {"routes": [{"when": "t > 30", "topic": "hot"}]}},
    ]}],
}


def write(tmp_path: Path, cases: list[dict[str, object]], **extra: object) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(PIPELINE))
    path = tmp_path / "split.test.yaml"
    path.write_text(yaml.safe_dump({"pipeline": "pipeline.yaml", "stage": "split", "cases": cases, **extra}))
    return path


def test_the_shipped_example_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(EXAMPLE)]) == 0
    assert "3 passed, 0 failed" in capsys.readouterr().out


def test_routed_outputs_and_dead_letters_are_compared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, [{
        "name": "routes",
        "input": [{"id": "a", "t": 35}, {"id": "b", "t": 10}, {"t": 1}],
        "expected": {"hot": [{"id": "a", "t": 35.0}], "rest": [{"id": "b", "t": 10.0}]},
        "expected_dead_letters": [{"step": "schema", "message": "required field 'id'"}],
    }])
    assert main(["test", str(path)]) == 0, capsys.readouterr().out


def test_a_failing_case_exits_1_with_a_readable_diff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, [
        {"name": "good", "input": [{"id": "b", "t": 10}], "expected": [{"id": "b", "t": 10.0}]},
        {"name": "wrong topic and value", "input": [{"id": "a", "t": 35}, "oops"],
         "expected": [{"id": "a", "t": 36.0}]},
    ])
    assert main(["test", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PASS  good" in out and "FAIL  wrong topic and value" in out
    assert '-  "rest": [' in out and '+  "hot": [' in out
    assert '+    "error": "DecodeError"' in out and "1 passed, 1 failed" in out


@pytest.mark.parametrize("content,message", [
    ({"pipeline": "pipeline.yaml", "stage": "split"}, "cases: Field required"),
    ({"pipeline": "pipeline.yaml", "stage": "nope", "cases": [{"name": "x", "input": []}]},
     "'nope' is not a processor stage"),
    ({"pipeline": "missing.yaml", "stage": "split", "cases": [{"name": "x", "input": []}]},
     "cannot read the file"),
])
def test_invalid_test_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   content: dict[str, object], message: str) -> None:
    write(tmp_path, [])
    path = tmp_path / "bad.test.yaml"
    path.write_text(yaml.safe_dump(content))
    assert main(["test", str(path)]) == 2
    assert message in capsys.readouterr().out
