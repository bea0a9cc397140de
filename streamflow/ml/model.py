"""The Model contract and its river implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

Features = dict[str, Any]


@dataclass(slots=True)  # not frozen: a frozen dataclass takes three times as long to build
class Prediction:
    """What a model says about one record: the prediction, class probabilities (classifiers)
    and an anomaly score (anomaly detectors)."""

    value: Any
    probabilities: dict[Any, float] | None = None
    score: float | None = None


class Model(ABC):
    """An incrementally trained model.

    Contract: for every record, :meth:`predict` is called before :meth:`learn`, in offset order,
    so a prediction never saw its own label. A model must be picklable: checkpoints store it.
    """

    task: str

    @abstractmethod
    def predict(self, features: Features) -> Prediction:
        """Predict from ``features``; the value may be None before anything was learned."""

    @abstractmethod
    def learn(self, features: Features, target: Any) -> None:
        """Update with one record (``target`` is None for anomaly detection and clustering)."""

    @abstractmethod
    def fresh(self) -> Model:
        """An untrained model with the same parameters (for drift resets)."""

    def progressive(
        self, rows: list[Features], targets: list[Any]
    ) -> tuple[list[Prediction | None], dict[int, BaseException]]:
        """Predict each row, then learn it with its target, in order (progressive validation).

        A row whose prediction or learning raised gets a None prediction and its error under its
        position; the others are unaffected.
        """
        predict, learn = self._record_functions()
        predictions: list[Prediction | None] = []
        errors: dict[int, BaseException] = {}
        for position, (row, target) in enumerate(zip(rows, targets, strict=True)):
            try:
                prediction: Prediction | None = predict(row)
                learn(row, target)
            except Exception as exc:  # the record goes to the dead letters; the run goes on
                prediction = None
                errors[position] = exc
            predictions.append(prediction)
        return predictions, errors

    def _record_functions(
        self,
    ) -> tuple[Callable[[Features], Prediction], Callable[[Features, Any], None]]:
        """The predict and learn functions :meth:`progressive` calls for each record."""
        return self.predict, self.learn

    @property
    def supports_batches(self) -> bool:
        return False

    def predict_batch(self, rows: list[Features]) -> list[Prediction]:
        """Predict a whole micro-batch before learning any of it."""
        return [self.predict(row) for row in rows]

    def learn_batch(self, rows: list[Features], targets: list[Any]) -> None:
        for row, target in zip(rows, targets, strict=True):
            self.learn(row, target)


class RiverModel(Model):
    """A river estimator, used through river's own methods for its task."""

    def __init__(self, estimator: Any, task: str) -> None:
        self.estimator = estimator
        self.task = task

    def predict(self, features: Features) -> Prediction:
        estimator = self.estimator
        if self.task == "classification":
            return Prediction(estimator.predict_one(features), estimator.predict_proba_one(features))
        if self.task == "anomaly":
            score = estimator.score_one(features)
            return Prediction(score, score=score)
        return Prediction(estimator.predict_one(features))

    def learn(self, features: Features, target: Any) -> None:
        if self.task in ("anomaly", "clustering"):
            self.estimator.learn_one(features)
        else:
            self.estimator.learn_one(features, target)

    def _record_functions(
        self,
    ) -> tuple[Callable[[Features], Prediction], Callable[[Features, Any], None]]:
        if self.task != "regression":
            return super()._record_functions()
        # The common case without the per-record dispatch on the task.
        predict_one = self.estimator.predict_one
        return (lambda features: Prediction(predict_one(features))), self.estimator.learn_one

    def fresh(self) -> RiverModel:
        return RiverModel(self.estimator.clone(), self.task)

    @property
    def supports_batches(self) -> bool:
        return self.task in ("regression", "classification") and all(
            hasattr(self.estimator, method) for method in ("learn_many", "predict_many")
        )

    def predict_batch(self, rows: list[Features]) -> list[Prediction]:
        if not self.supports_batches:
            return super().predict_batch(rows)
        frame = pd.DataFrame(rows)
        values = self.estimator.predict_many(frame).tolist()
        if self.task == "classification":
            probabilities = self.estimator.predict_proba_many(frame).to_dict("records")
            return [Prediction(v, p) for v, p in zip(values, probabilities, strict=True)]
        return [Prediction(value) for value in values]

    def learn_batch(self, rows: list[Features], targets: list[Any]) -> None:
        if not self.supports_batches:
            super().learn_batch(rows, targets)
            return
        self.estimator.learn_many(pd.DataFrame(rows), pd.Series(targets))

    def __repr__(self) -> str:
        return f"RiverModel({self.estimator}, task={self.task!r})"
