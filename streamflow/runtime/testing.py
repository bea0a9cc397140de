"""``streamflow test FILE``: run declared cases through one processor stage's steps, without a
broker, and compare the records it would produce and dead-letter with the expected ones."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamflow.config.loader import ConfigError, format_location, load_pipeline
from streamflow.config.models import ProcessorConfig
from streamflow.runtime.stages import (
    StepFailedError,
    build_steps,
    decode_input,
    output_batches,
    run_steps,
)

EXIT_PASSED, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class ExpectedDeadLetter(BaseModel):
    """A record the case expects in the dead-letter topic, in input order."""

    model_config = ConfigDict(extra="forbid")

    step: str = Field(description="the step that failed it ('parse' for undecodable JSON)")
    error: str | None = Field(None, description="the error class, e.g. SchemaViolation")
    message: str | None = Field(None, description="text the error message contains")


class TestCase(BaseModel):
    """Records in, and the records expected out (per topic) and dead-lettered."""

    model_config = ConfigDict(extra="forbid")

    name: str
    input: list[dict[str, Any] | str] = Field(description="JSON objects, or raw values as text")
    expected: list[dict[str, Any]] | dict[str, list[dict[str, Any]]] = Field(
        default_factory=list,
        description="records on the stage's output topic, or {topic: [records]} with routing",
    )
    expected_dead_letters: list[ExpectedDeadLetter] = Field(default_factory=list)


class TestFile(BaseModel):
    """A test file: the pipeline file (relative to the test file), the stage, the cases."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str
    stage: str
    cases: list[TestCase] = Field(min_length=1)


@dataclass
class CaseOutcome:
    name: str
    diff: list[str]

    @property
    def passed(self) -> bool:
        return not self.diff


class TestFileError(Exception):
    """An invalid test file; one line per problem."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.path = path
        self.errors = errors


def load_test_file(path: Path) -> tuple[TestFile, ProcessorConfig, str]:
    """The test file, its processor stage and the pipeline name."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = TestFile.model_validate(data)
    except OSError as exc:
        raise TestFileError(path, [f"cannot read the file: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise TestFileError(path, [f"invalid YAML: {exc}"]) from None
    except ValidationError as exc:
        raise TestFileError(
            path, [f"{format_location(e['loc'])}: {e['msg']}" for e in exc.errors()]) from None
    try:
        pipeline = load_pipeline(path.parent / spec.pipeline)
    except ConfigError as exc:
        raise TestFileError(path, [f"pipeline: {line}" for line in exc.errors]) from None
    stages = {stage.name: stage for stage in pipeline.processors}
    if spec.stage not in stages:
        raise TestFileError(path, [f"stage: {spec.stage!r} is not a processor stage of "
                                   f"{spec.pipeline} (choose one of: {', '.join(stages) or 'none'})"])
    return spec, stages[spec.stage], pipeline.pipeline


def run_case(case: TestCase, stage: ProcessorConfig, pipeline: str) -> CaseOutcome:
    """Run one case through fresh steps (no state carried over from other cases)."""
    values = [item.encode() if isinstance(item, str) else json.dumps(item).encode()
              for item in case.input]
    steps = build_steps(stage, pipeline)
    table, failures = decode_input(values, steps)
    try:
        table = run_steps(steps, table, failures)
    except StepFailedError as exc:
        return CaseOutcome(case.name, [f"the stage stopped: {exc}"])
    produced: dict[str, list[Any]] = {}
    for batch in output_batches(table, stage.output, [None] * len(values), [None] * len(values)):
        if batch.values:
            produced.setdefault(batch.topic, []).extend(json.loads(value) for value in batch.values)
    expected = case.expected if isinstance(case.expected, dict) else (
        {stage.output: case.expected} if case.expected else {})
    diff = _diff("output", expected, produced)
    dead = [{"input": case.input[f.row], "step": f.step, "error": type(f.error).__name__,
             "message": str(f.error)} for f in sorted(failures, key=lambda f: f.row)]
    diff += _diff("dead letters", [_expected_dead(e, d) for e, d in
                                   zip(case.expected_dead_letters, dead, strict=False)]
                  + [e.model_dump(exclude_none=True) for e in case.expected_dead_letters[len(dead):]],
                  [{key: d[key] for key in ("step", "error", "message")} for d in dead])
    return CaseOutcome(case.name, diff)


def _expected_dead(expected: ExpectedDeadLetter, actual: dict[str, Any]) -> dict[str, Any]:
    """The expectation in the actual's shape: unspecified parts take the actual values, and a
    message matches when it contains the expected text."""
    message = actual["message"]
    if expected.message is not None and expected.message not in message:
        message = f"... {expected.message} ..."
    return {"step": expected.step, "error": expected.error or actual["error"], "message": message}


def _diff(what: str, expected: Any, actual: Any) -> list[str]:
    if expected == actual:
        return []
    lines = difflib.unified_diff(
        json.dumps(expected, indent=2, sort_keys=True, default=str).splitlines(),
        json.dumps(actual, indent=2, sort_keys=True, default=str).splitlines(),
        f"expected {what}", f"actual {what}", lineterm="",
    )
    return list(lines)


def run_test_file(path: str | Path) -> int:
    """Run every case of a test file, print a report; the exit code (0 pass, 1 fail, 2 invalid)."""
    path = Path(path)
    try:
        spec, stage, pipeline = load_test_file(path)
    except TestFileError as exc:
        print(f"invalid test file {path}:")
        for line in exc.errors:
            print(f"  {line}")
        return EXIT_INVALID
    outcomes = [run_case(case, stage, pipeline) for case in spec.cases]
    for outcome in outcomes:
        print(f"{'PASS' if outcome.passed else 'FAIL'}  {outcome.name}")
        for line in outcome.diff:
            print(f"      {line}")
    failed = sum(not outcome.passed for outcome in outcomes)
    print(f"{path}: {len(outcomes) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed else EXIT_PASSED
