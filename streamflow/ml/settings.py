"""A model engine's settings and the events it reports: plain data, without river, for the
stage's process, which never imports river (its workers do: :mod:`streamflow.ml.host`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromotionRule:
    """A challenger replaces the champion when its rolling ``metric`` over the last ``over``
    evaluated records beats the champion's by at least ``by`` at ``evaluations`` consecutive
    evaluations; one evaluation ends the first batch after each ``over`` evaluated records."""

    metric: str
    by: float
    over: int
    evaluations: int


@dataclass
class Promotion:
    """A challenger became the champion of ``partition``: it predicts from ``offset`` on."""

    partition: int
    offset: int
    promoted: str
    demoted: str
    metric: str
    promoted_value: float
    demoted_value: float
    model_version: int  # records the promoted model had learned


@dataclass(frozen=True)
class EngineSettings:
    """A model stage's engine settings. The stage leaves ``task`` (None: the estimator's) and
    ``metrics`` (None: the task's defaults) to its worker, which knows its estimator: see
    :meth:`streamflow.ml.host.EngineHost.resolved`."""

    task: str | None
    target: str | None
    metrics: list[str] | None
    rolling_window: int
    key_field: str | None
    max_models: int
    features_topic: str
    labels_topic: str | None = None
    labels_ttl_s: float = 3600.0
    max_waiting: int = 100_000
    drift_detector: dict[str, Any] | None = None
    drift_policy: str = "none"
    mini_batch: bool = False
    challengers: tuple[str, ...] = ()  # names of the models challenging the stage's own
    promotion: PromotionRule | None = None


@dataclass
class DriftEvent:
    """The drift detector of ``partition`` fired at ``offset``; ``policy`` was applied."""

    partition: int
    offset: int
    model_key: str
    error: float
    policy: str
