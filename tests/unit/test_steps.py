"""Schema and SQL steps, and how a stage maps step failures back to consumed records."""

from __future__ import annotations

import pyarrow as pa
import pytest

from streamflow.plugins import ROW_ID, ComponentContext, Processor, StepResult
from streamflow.processing.steps import (
    SchemaCheck,
    SchemaConfig,
    SchemaViolation,
    SqlConfig,
    SqlTransform,
)
from streamflow.runtime.dead_letters import Failure
from streamflow.runtime.stages import StepFailedError, StepOutputError, StepRunner, run_steps

CONTEXT = ComponentContext("p", "s")


def schema_check(fields: dict[str, object]) -> SchemaCheck:
    return SchemaCheck(SchemaConfig.model_validate(fields), CONTEXT)


def sql(statement: str) -> SqlTransform:
    return SqlTransform(SqlConfig(statement), CONTEXT)


def with_rows(data: dict[str, list[object]], rows: list[int] | None = None) -> pa.Table:
    table = pa.table(data)
    return table.append_column(ROW_ID, pa.array(rows or list(range(table.num_rows)), pa.int64()))


def test_schema_check_types_and_requires_fields() -> None:
    step = schema_check({
        "id": {"type": "string", "required": True},
        "x": {"type": "float"},
        "n": {"type": "int"},
    })
    result = step.process(with_rows({"id": ["a", None, "c"], "x": [1, 2, 3], "extra": [1, 2, 3]}))
    assert result.table.column_names == ["id", "x", "n", ROW_ID]
    assert result.table["x"].type == pa.float64()
    assert result.table[ROW_ID].to_pylist() == [0, 2]
    assert [(row, type(e)) for row, e in result.failures] == [(1, SchemaViolation)]


def test_schema_check_fails_only_rows_that_cannot_take_the_type() -> None:
    step = schema_check({"n": {"type": "int"}})
    result = step.process(with_rows({"n": ["1", "x", "3"]}))
    assert result.table["n"].to_pylist() == [1, 3]
    assert [row for row, _ in result.failures] == [1]


def test_sql_keeps_row_ids_through_select_star() -> None:
    result = sql("SELECT *, x * 2 AS y FROM batch WHERE x > 1").process(
        with_rows({"x": [1.0, 2.0, 3.0]}, [10, 11, 12])
    )
    assert result.table["y"].to_pylist() == [4.0, 6.0]
    assert result.table[ROW_ID].to_pylist() == [11, 12]


class Explode(Processor[None]):
    name = "explode"

    def process(self, table: pa.Table) -> StepResult:
        raise RuntimeError("boom")


class FailSecond(Processor[None]):
    name = "fail-second"

    def process(self, table: pa.Table) -> StepResult:
        return StepResult(table.slice(0, 1), [(1, ValueError("second row is bad"))])


def test_step_failures_point_at_the_consumed_rows() -> None:
    failures: list[Failure] = []
    table = run_steps([StepRunner(FailSecond(None, CONTEXT))], with_rows({"x": [1, 2, 3]}, [7, 8, 9]),
                      failures)
    assert table[ROW_ID].to_pylist() == [7]
    assert [(f.row, f.step) for f in failures] == [(8, "fail-second")]


def test_a_step_that_raises_dead_letters_its_whole_batch() -> None:
    failures: list[Failure] = []
    table = run_steps([StepRunner(Explode(None, CONTEXT))], with_rows({"x": [1, 2]}, [3, 4]), failures)
    assert table.num_rows == 0
    assert [(f.row, str(f.error)) for f in failures] == [(3, "boom"), (4, "boom")]


def test_a_step_that_loses_row_ids_is_a_contract_error() -> None:
    failures: list[Failure] = []
    run_steps([StepRunner(sql("SELECT x FROM batch"))], with_rows({"x": [1]}), failures)
    assert isinstance(failures[0].error, StepOutputError)


@pytest.mark.parametrize("statement", ["SELEC nonsense", "SELECT missing FROM batch"])
def test_bad_sql_fails_the_batch_not_the_stage(statement: str) -> None:
    failures: list[Failure] = []
    run_steps([StepRunner(sql(statement))], with_rows({"x": [1, 2]}), failures)
    assert [f.row for f in failures] == [0, 1]


def test_on_error_drop_filters_and_fail_stops() -> None:
    failures: list[Failure] = []
    table = run_steps([StepRunner(FailSecond(None, CONTEXT), "drop")],
                      with_rows({"x": [1, 2]}), failures)
    assert table.num_rows == 1 and not failures
    with pytest.raises(StepFailedError, match="second row is bad"):
        run_steps([StepRunner(FailSecond(None, CONTEXT), "fail")], with_rows({"x": [1, 2]}), [])
