"""Building river objects from configuration: names resolved only inside ``river``, or a
``module:function`` factory the user names. No configuration string is ever evaluated."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from river import base, compose, metrics
from river.base.anomaly_detector import AnomalyDetector

_RIVER_NAME = re.compile(
    r"^(?P<module>[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\.(?P<cls>[A-Z]\w*)$"
)
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

DEFAULT_METRICS = {
    "regression": ["MAE", "RMSE"],
    "classification": ["Accuracy"],
    "anomaly": [],
    "clustering": [],
}


class ModelSpecError(ValueError):
    """The estimator, metric or detector named in the config cannot be built."""


def river_object(qualified: str, params: dict[str, Any] | None) -> Any:
    """Instantiate ``river.<module>.<Class>(**params)``; nothing outside river is reachable."""
    match = _RIVER_NAME.match(qualified)
    if not match:
        raise ModelSpecError(f"{qualified!r} is not a river name like 'linear_model.LinearRegression'")
    try:
        module = importlib.import_module(f"river.{match['module']}")
        cls = getattr(module, match["cls"])
    except (ImportError, AttributeError):
        raise ModelSpecError(f"river has no {qualified!r}") from None
    if not isinstance(cls, type):
        raise ModelSpecError(f"river.{qualified} is not a class")
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise ModelSpecError(f"{qualified}: {exc}") from None


def build_estimator(spec: list[dict[str, dict[str, Any] | None]] | str) -> Any:
    """A river estimator from ``[{module.Class: {params}}, ...]`` or a ``module:function`` factory."""
    if isinstance(spec, str):
        if not _FACTORY.match(spec):
            raise ModelSpecError(f"estimator {spec!r} must be 'package.module:function'")
        module_name, function = spec.split(":")
        try:
            factory: Callable[[], Any] = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(f"estimator factory {spec!r}: {exc}") from None
        return factory()
    steps = []
    for step in spec:
        if len(step) != 1:
            raise ModelSpecError(f"each estimator step is one {{module.Class: params}}, got {step}")
        ((qualified, params),) = step.items()
        steps.append(river_object(qualified, params))
    if not steps:
        raise ModelSpecError("the estimator needs at least one step")
    return steps[0] if len(steps) == 1 else compose.Pipeline(*steps)


def build_metric(name: str) -> metrics.base.Metric:
    metric_class = getattr(metrics, name, None)
    if not isinstance(metric_class, type) or not issubclass(metric_class, metrics.base.Metric):
        raise ModelSpecError(f"river.metrics has no metric {name!r}")
    return metric_class()


def infer_task(estimator: Any) -> str:
    """regression, classification, anomaly or clustering, from the estimator's final step."""
    final = estimator._last_step if isinstance(estimator, compose.Pipeline) else estimator
    if isinstance(final, AnomalyDetector):
        return "anomaly"
    if isinstance(estimator, base.Classifier):
        return "classification"
    if isinstance(estimator, base.Regressor):
        return "regression"
    if isinstance(estimator, base.Clusterer):
        return "clustering"
    raise ModelSpecError(f"cannot tell the task of {estimator}; set task: in the model config")


def build_detector(spec: dict[str, dict[str, Any] | None]) -> Any:
    if len(spec) != 1:
        raise ModelSpecError(f"drift.detector is one {{drift.Class: params}}, got {spec}")
    ((qualified, params),) = spec.items()
    if not qualified.startswith("drift."):
        raise ModelSpecError(f"drift.detector must be in river.drift, got {qualified!r}")
    return river_object(qualified, params)


def model_label(estimator: Any) -> str:
    """A short, bounded metrics label: class names, e.g. StandardScaler|LinearRegression."""
    if isinstance(estimator, compose.Pipeline):
        return "|".join(type(step).__name__ for step in estimator.steps.values())
    return type(estimator).__name__
