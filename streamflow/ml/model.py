"""Model stages: predict each record, then learn from it (progressive validation).

Estimators are built from names resolved only inside the ``river`` package, or from a
``module:function`` factory the user names. No configuration string is ever evaluated.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from river import compose, metrics

from streamflow.plugins import Processor, StepResult

_RIVER_NAME = re.compile(r"^(?P<module>[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\.(?P<cls>[A-Z]\w*)$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelSpecError(ValueError):
    """The estimator or metric named in the config cannot be built."""


def _river_class(qualified: str) -> type[Any]:
    match = _RIVER_NAME.match(qualified)
    if not match:
        raise ModelSpecError(f"{qualified!r} is not a river name like 'linear_model.LinearRegression'")
    try:
        module = importlib.import_module(f"river.{match['module']}")
        return getattr(module, match["cls"])
    except (ImportError, AttributeError):
        raise ModelSpecError(f"river has no {qualified!r}") from None


def build_estimator(spec: list[dict[str, dict[str, Any] | None]] | str) -> Any:
    """A river estimator from ``[{module.Class: {params}}, ...]`` or a ``module:function`` factory."""
    if isinstance(spec, str):
        if not _FACTORY.match(spec):
            raise ModelSpecError(f"estimator {spec!r} must be 'package.module:function'")
        module_name, function = spec.split(":")
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), function)
        return factory()
    steps = []
    for step in spec:
        if len(step) != 1:
            raise ModelSpecError(f"each estimator step is one {{module.Class: params}}, got {step}")
        (qualified, params), = step.items()
        try:
            steps.append(_river_class(qualified)(**(params or {})))
        except TypeError as exc:
            raise ModelSpecError(f"{qualified}: {exc}") from None
    if not steps:
        raise ModelSpecError("the estimator needs at least one step")
    return steps[0] if len(steps) == 1 else compose.Pipeline(*steps)


def build_metric(name: str) -> metrics.base.Metric:
    metric_class = getattr(metrics, name, None)
    if not isinstance(metric_class, type) or not issubclass(metric_class, metrics.base.Metric):
        raise ModelSpecError(f"river.metrics has no metric {name!r}")
    return metric_class()


class Model(ABC):
    """An incrementally trained model.

    Contract: records arrive in offset order; for each, :meth:`predict_one` is called before
    :meth:`learn_one`, so a prediction never saw its own label.
    """

    @abstractmethod
    def predict_one(self, features: dict[str, Any]) -> Any:
        """Predict from the features; may return None before the model has learned anything."""

    @abstractmethod
    def learn_one(self, features: dict[str, Any], target: Any) -> None:
        """Update the model with one labelled record."""


class RiverModel(Model):
    """A river estimator with river's own ``predict_one``/``learn_one``."""

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator

    def predict_one(self, features: dict[str, Any]) -> Any:
        return self.estimator.predict_one(features)

    def learn_one(self, features: dict[str, Any], target: Any) -> None:
        self.estimator.learn_one(features, target)


class ModelStep(Processor[Any]):
    """Adds the prediction to each record, updates the metric, then learns the record.

    Model stages are configured in their own ``models:`` section, so this step is built
    directly rather than through the processor registry.
    """

    name = "model"

    def __init__(
        self,
        model: Model,
        target: str,
        features: list[str] | None,
        metric: metrics.base.Metric,
        prediction_field: str = "prediction",
        on_learned: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.target = target
        self.features = features
        self.metric = metric
        self.prediction_field = prediction_field
        self.on_learned = on_learned

    def _feature_names(self, table: pa.Table) -> list[str]:
        if self.features is not None:
            return self.features
        return [
            field.name for field in table.schema
            if field.name != self.target and not field.name.startswith("_sf_")
            and (pa.types.is_integer(field.type) or pa.types.is_floating(field.type))
        ]

    def process(self, table: pa.Table) -> StepResult:
        names = self._feature_names(table)
        missing = [name for name in [*names, self.target] if name not in table.column_names]
        if missing:
            raise KeyError(f"fields missing from the batch: {', '.join(missing)}")
        rows = table.select(names).to_pylist()
        targets = table.column(self.target).to_pylist()
        predictions: list[Any] = []
        failures: list[tuple[int, BaseException]] = []
        learned = 0
        for index, (row, target) in enumerate(zip(rows, targets, strict=True)):
            features = {key: value for key, value in row.items() if value is not None}
            try:
                prediction = self.model.predict_one(features)
                if target is not None:
                    if prediction is not None:
                        self.metric.update(target, prediction)
                    self.model.learn_one(features, target)
                    learned += 1
            except Exception as exc:  # a record the model cannot take goes to the dead letters
                failures.append((index, exc))
                predictions.append(None)
                continue
            predictions.append(prediction)
        output = table.append_column(self.prediction_field, pa.array(predictions))
        if failures:
            failed = {index for index, _error in failures}
            output = output.filter(pa.array([i not in failed for i in range(table.num_rows)]))
        if self.on_learned:
            self.on_learned(learned, self.metric.get())
        return StepResult(output, failures)
