"""The capabilities a processor step declares (docs/writing-a-connector.md), for any step: raw
records as the first step's input, and routing through the topic column."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from streamflow.config import parse_pipeline
from streamflow.plugins import ROW_ID, TOPIC_COLUMN, ComponentContext, Processor, StepResult
from streamflow.runtime.stages import StepRunner, decode_input, output_batches, run_steps

CONTEXT = ComponentContext("p", "stage")


class ByRegionConfig(BaseModel):
    prefix: str
    regions: list[str]


class ByRegion(Processor[ByRegionConfig]):
    """Sends each record to ``<prefix>.<its region>`` (the example of the docs)."""

    config_model = ByRegionConfig

    @classmethod
    def output_topics(cls, config: ByRegionConfig) -> list[str]:
        return [f"{config.prefix}.{region}" for region in config.regions]

    def process(self, table: pa.Table) -> StepResult:
        topics = pc.binary_join_element_wise(self.config.prefix, table["region"], ".")
        return StepResult(table.append_column(TOPIC_COLUMN, topics))


class NoSettings(BaseModel):
    pass


class Lines(Processor[NoSettings]):
    """Reads raw values as one ``line`` each; values that are not UTF-8 fail."""

    config_model = NoSettings
    reads_raw_records = True

    def process(self, table: pa.Table) -> StepResult:
        lines, keep, failures = [], [], []
        for row, value in enumerate(table["value"].to_pylist()):
            try:
                lines.append(value.decode())
                keep.append(row)
            except UnicodeDecodeError as exc:
                failures.append((row, exc))
        rows = table[ROW_ID].take(keep)
        return StepResult(pa.table({"line": lines, ROW_ID: rows}), failures)


def test_a_step_that_reads_raw_records_gets_the_values_undecoded() -> None:
    steps = [StepRunner(Lines(NoSettings(), CONTEXT))]
    table, failures = decode_input([b"not json", b"\xff", b'{"x": 1}'], steps)
    assert failures == [] and table["value"].to_pylist() == [b"not json", b"\xff", b'{"x": 1}']
    table = run_steps(steps, table, failures)
    assert table["line"].to_pylist() == ["not json", '{"x": 1}']
    assert [(failure.row, failure.step) for failure in failures] == [(1, "step")]


def test_other_steps_get_json_records() -> None:
    steps = [StepRunner(ByRegion(ByRegionConfig(prefix="t", regions=[]), CONTEXT))]
    table, failures = decode_input([b'{"region": "eu"}', b"not json"], steps)
    assert table["region"].to_pylist() == ["eu"] and [f.row for f in failures] == [1]


def test_a_step_routes_rows_through_the_topic_column() -> None:
    steps = [StepRunner(ByRegion(ByRegionConfig(prefix="t", regions=["eu", "us"]), CONTEXT))]
    values = [b'{"region": "eu", "n": 0}', b'{"region": null, "n": 1}', b'{"region": "us", "n": 2}']
    table, failures = decode_input(values, steps)
    table = run_steps(steps, table, failures)
    batches = {batch.topic: [json.loads(value) for value in batch.values]
               for batch in output_batches(table, "out", [None] * 3, [None] * 3)}
    assert batches == {"t.eu": [{"region": "eu", "n": 0}], "out": [{"region": None, "n": 1}],
                       "t.us": [{"region": "us", "n": 2}]}


def test_the_topics_a_step_declares_are_created() -> None:
    config = parse_pipeline({
        "pipeline": "p",
        "processors": [{"name": "split", "input": "in", "output": "out", "steps": [
            {f"{__name__}:ByRegion": {"prefix": "sales", "regions": ["eu", "us"]}}]}],
    })
    assert {"in", "out", "sales.eu", "sales.us"} <= {t.name for t in config.topic_specs()}
