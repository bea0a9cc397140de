"""The Model contract and its river implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Features = dict[str, Any]
MAIN_MODEL = "main"  # the name of a model stage's own estimator beside its challengers


@dataclass(slots=True)  # not frozen: a frozen dataclass takes three times as long to build
class Prediction:
    """What a model says about one record: the prediction, class probabilities (classifiers)
    and an anomaly score (anomaly detectors)."""

    value: Any
    probabilities: dict[Any, float] | None = None
    score: float | None = None


@dataclass
class PredictionColumns:
    """A run's predictions as columns: one value per record and, by task, class probabilities
    (classifiers) or anomaly scores (detectors); None where a record failed. Columns cost much
    less than one :class:`Prediction` per record."""

    values: list[Any] = field(default_factory=list)
    probabilities: list[dict[Any, float] | None] | None = None
    scores: list[float | None] | None = None

    @classmethod
    def for_task(cls, task: str) -> PredictionColumns:
        return cls(probabilities=[] if task == "classification" else None,
                   scores=[] if task == "anomaly" else None)

    def __len__(self) -> int:
        return len(self.values)

    def append(self, prediction: Prediction | None) -> None:
        self.values.append(None if prediction is None else prediction.value)
        if self.probabilities is not None:
            self.probabilities.append(None if prediction is None else prediction.probabilities)
        if self.scores is not None:
            self.scores.append(None if prediction is None else prediction.score)

    def take(self, positions: Sequence[int]) -> PredictionColumns:
        """The predictions at ``positions``, in that order."""
        def pick(column: list[Any] | None) -> list[Any] | None:
            return None if column is None else [column[i] for i in positions]

        return PredictionColumns([self.values[i] for i in positions], pick(self.probabilities),
                                 pick(self.scores))

    def extend(self, other: PredictionColumns) -> None:
        self.values += other.values
        if other.probabilities is not None:
            self.probabilities = (self.probabilities or []) + other.probabilities
        if other.scores is not None:
            self.scores = (self.scores or []) + other.scores


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
    ) -> tuple[PredictionColumns, dict[int, BaseException]]:
        """Predict each row, then learn it with its target, in order (progressive validation).

        A row whose prediction or learning raised gets a None prediction and its error under its
        position; the others are unaffected.
        """
        predictions = PredictionColumns.for_task(self.task)
        errors: dict[int, BaseException] = {}
        for position, (row, target) in enumerate(zip(rows, targets, strict=True)):
            try:
                prediction: Prediction | None = self.predict(row)
                self.learn(row, target)
            except Exception as exc:  # the record goes to the dead letters; the run goes on
                prediction = None
                errors[position] = exc
            predictions.append(prediction)
        return predictions, errors

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

    def progressive(
        self, rows: list[Features], targets: list[Any]
    ) -> tuple[PredictionColumns, dict[int, BaseException]]:
        if self.task != "regression":
            return super().progressive(rows, targets)
        # The common case in a tight loop: no Prediction objects, no dispatch on the task.
        predict_one, learn_one = self.estimator.predict_one, self.estimator.learn_one
        values: list[Any] = []
        append = values.append
        errors: dict[int, BaseException] = {}
        for position, (row, target) in enumerate(zip(rows, targets, strict=True)):
            try:
                value = predict_one(row)
                learn_one(row, target)
            except Exception as exc:  # the record goes to the dead letters; the run goes on
                value = None
                errors[position] = exc
            append(value)
        return PredictionColumns(values), errors

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
        import pandas as pd  # only here: the model worker starts faster and smaller without it

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
        import pandas as pd

        self.estimator.learn_many(pd.DataFrame(rows), pd.Series(targets))

    def __repr__(self) -> str:
        return f"RiverModel({self.estimator}, task={self.task!r})"
