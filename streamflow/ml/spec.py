"""Building river objects from configuration: names resolved only inside ``river``, or a
``module:function`` factory the user names in a module of their own. No configuration string is
ever evaluated, and no factory from Python's standard library or streamflow is ever called."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Callable
from typing import Any

import river
from river import base, compose, metrics
from river.base.anomaly_detector import AnomalyDetector

from streamflow.ml.errors import ModelSpecError

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


FIX = ("name a river estimator, e.g. [{linear_model.LinearRegression: {}}], or a function of your "
       "own module that returns one, e.g. 'my_models:build'")


def _outside_user_code(module: str) -> str | None:
    """Where ``module`` belongs when a factory may not come from it, else None."""
    root = module.partition(".")[0]
    if root in sys.stdlib_module_names:
        return "Python's standard library"
    if root == "streamflow":
        return "streamflow itself"
    return None


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``name``, or nothing."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _river_suggestion(module_name: str, class_name: str) -> str:
    """Did-you-mean text for a river name that does not resolve: the closest river module, when
    ``module_name`` is none, and the closest public class in that module."""
    modules = [info.name for info in pkgutil.iter_modules(river.__path__) if not info.name.startswith("_")]
    root = module_name.partition(".")[0]
    if root not in modules:
        close = difflib.get_close_matches(root, modules, n=1)
        if not close:
            return ""
        module_name = close[0] + module_name[len(root):]
    try:
        module = importlib.import_module(f"river.{module_name}")
    except ImportError:
        return ""
    classes = [name for name in getattr(module, "__all__", dir(module)) if name[:1].isupper()]
    close = difflib.get_close_matches(class_name, classes, n=1)
    if close or class_name in classes:
        return f" (did you mean {module_name + '.' + (close[0] if close else class_name)!r}?)"
    return ""


def river_object(qualified: str, params: dict[str, Any] | None) -> Any:
    """Instantiate ``river.<module>.<Class>(**params)``; nothing outside river is reachable."""
    match = _RIVER_NAME.match(qualified)
    if not match:
        raise ModelSpecError(f"{qualified!r} is not a river name like 'linear_model.LinearRegression'")
    try:
        module = importlib.import_module(f"river.{match['module']}")
        cls = getattr(module, match["cls"])
    except (ImportError, AttributeError):
        hint = _river_suggestion(match["module"], match["cls"])
        raise ModelSpecError(f"river has no {qualified!r}{hint}") from None
    if not isinstance(cls, type) or not issubclass(cls, base.Base) or not cls.__module__.startswith("river."):
        raise ModelSpecError(f"river.{qualified} is not a river class")
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise ModelSpecError(f"{qualified}: {exc}") from None


def resolve_factory(spec: str) -> Callable[[], Any]:
    """The function or class a ``module:function`` estimator names, without calling it; refused
    unless it is defined in river or in a module of the user's."""
    if not _FACTORY.match(spec):
        raise ModelSpecError(f"estimator {spec!r} must be 'package.module:function'")
    module_name, name = spec.split(":")
    outside = _outside_user_code(module_name)
    if outside:
        raise ModelSpecError(f"estimator factory {spec!r} is from {outside}, not a model; {FIX}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"estimator factory {spec!r}: {exc}") from None
    if not hasattr(module, name):
        hint = did_you_mean(name, [item for item in dir(module) if not item.startswith("_")])
        raise ModelSpecError(f"estimator factory {spec!r}: module {module_name!r} has no {name!r}{hint}")
    factory = getattr(module, name)
    if not (inspect.isfunction(factory) or inspect.isclass(factory)):
        raise ModelSpecError(f"estimator factory {spec!r} is a {type(factory).__name__}, not a function "
                             f"or class written in Python; {FIX}")
    outside = _outside_user_code(factory.__module__)
    if outside:
        raise ModelSpecError(f"estimator factory {spec!r} is {factory.__module__}.{factory.__qualname__}, "
                             f"from {outside}; {FIX}")
    return factory


def build_estimator(spec: list[dict[str, dict[str, Any] | None]] | str) -> Any:
    """A river estimator from ``[{module.Class: {params}}, ...]`` or a ``module:function`` factory."""
    if isinstance(spec, str):
        estimator = resolve_factory(spec)()
        if not isinstance(estimator, base.Estimator):
            raise ModelSpecError(f"estimator factory {spec!r} returned a {type(estimator).__name__}, "
                                 "not a river estimator")
        return estimator
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
        known = [item for item in dir(metrics) if isinstance(getattr(metrics, item), type)
                 and issubclass(getattr(metrics, item), metrics.base.Metric)]
        raise ModelSpecError(f"river.metrics has no metric {name!r}{did_you_mean(name, known)}")
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
