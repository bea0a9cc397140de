"""The MLflow pyfunc model of a streamflow model version: the river estimators of the version,
as ``streamflow models export`` writes them, behind ``mlflow.pyfunc.PythonModel``.

This file is logged with each model as MLflow "models from code" and run by MLflow when the
model is loaded, so it imports nothing of streamflow: loading a model needs MLflow, pandas and
river only (and the module of a factory estimator). ``predict`` takes a DataFrame of features,
one row a record, and returns one prediction a row as the model stage would have made it then:
``predict_one`` (regression, classification, clustering) or ``score_one`` (anomaly), null
values left out of the features as the stage leaves them out.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import mlflow
import pandas as pd


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class RiverPyfuncModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """River estimators by model key (``""`` without ``key_field``)."""

    def load_context(self, context: Any) -> None:
        with open(context.artifacts["export"], "rb") as handle:
            document = pickle.load(handle)
        config = context.model_config or {}
        self.task: str = config.get("task", "regression")
        self.features: list[str] | None = config.get("features")
        self.excluded = {config.get("target"), config.get("key_field")}
        self.key_field: str | None = config.get("key_field")
        self.models: dict[str, Any] = {
            key: estimator for keyed in document["models"].values()
            for key, estimator in keyed.items()}

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> list[Any]:
        names = self.features or [name for name in model_input.columns
                                  if name not in self.excluded]
        keys = (model_input[self.key_field].astype(str).tolist()
                if self.key_field and self.key_field in model_input.columns
                else [""] * len(model_input))
        predictions = []
        for key, row in zip(keys, model_input[names].to_dict("records"), strict=True):
            model = self.models.get(key)
            features = {name: value for name, value in row.items() if not _missing(value)}
            predictions.append(None if model is None else self._predict(model, features))
        return predictions

    def _predict(self, model: Any, features: dict[str, Any]) -> Any:
        if self.task == "anomaly":
            return model.score_one(features)
        return model.predict_one(features)


mlflow.models.set_model(RiverPyfuncModel())
