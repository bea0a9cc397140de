"""Model stages: river estimators from names, and agreement with river's own progressive validation."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pytest
from river import datasets, evaluate, linear_model, metrics, preprocessing

from streamflow.ml.model import ModelSpecError, ModelStep, RiverModel, build_estimator, build_metric
from streamflow.plugins import ROW_ID


def test_estimators_resolve_only_inside_river() -> None:
    model = build_estimator([{"preprocessing.StandardScaler": {}},
                             {"linear_model.LogisticRegression": {"l2": 0.001}}])
    assert [type(step).__name__ for step in model.steps.values()] == [
        "StandardScaler", "LogisticRegression"]
    for bad in ("os.system", "__import__('os')", "linear_model.__class__", "..x.Y"):
        with pytest.raises(ModelSpecError):
            build_estimator([{bad: {}}])
    with pytest.raises(ModelSpecError, match="river has no"):
        build_estimator([{"linear_model.NoSuchModel": {}}])
    with pytest.raises(ModelSpecError, match="must be"):
        build_estimator("not a factory")
    with pytest.raises(ModelSpecError, match="no metric"):
        build_metric("__class__")


def test_factory_names_a_user_function() -> None:
    model = build_estimator("river.linear_model:LinearRegression")
    assert isinstance(model, linear_model.LinearRegression)


def test_model_step_matches_river_progressive_validation() -> None:
    """Streaming TrumpApproval through the step in batches gives river's own MAE."""
    stream = list(itertools.islice(datasets.TrumpApproval(), 1000))
    expected = evaluate.progressive_val_score(
        stream, preprocessing.StandardScaler() | linear_model.LinearRegression(), metrics.MAE()
    )
    rows = [{**x, "y": y} for x, y in stream]
    step = ModelStep(
        RiverModel(preprocessing.StandardScaler() | linear_model.LinearRegression()),
        target="y", features=None, metric=metrics.MAE(),
    )
    for start in range(0, len(rows), 128):
        table = pa.Table.from_pylist(rows[start:start + 128])
        table = table.append_column(ROW_ID, pa.array(range(table.num_rows), pa.int64()))
        result = step.process(table)
        assert not result.failures
        assert result.table.num_rows == table.num_rows
    assert step.metric.get() == pytest.approx(expected.get(), abs=1e-9)


def test_records_the_model_cannot_take_fail_alone() -> None:
    step = ModelStep(RiverModel(linear_model.LinearRegression()), target="y", features=["x"],
                     metric=metrics.MAE())
    table = pa.table({"x": [1.0, 2.0], "y": [1.0, 2.0]})
    table = table.append_column(ROW_ID, pa.array([0, 1], pa.int64()))

    class Picky(RiverModel):
        def learn_one(self, features: dict[str, object], target: object) -> None:
            if target == 2.0:
                raise ValueError("cannot learn 2")
            super().learn_one(features, target)

    step.model = Picky(linear_model.LinearRegression())
    result = step.process(table)
    assert result.table[ROW_ID].to_pylist() == [0]
    assert "prediction" in result.table.column_names
    assert [(row, str(error)) for row, error in result.failures] == [(1, "cannot learn 2")]
