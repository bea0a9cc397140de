"""Online learning: the Model contract and its river implementation."""

from streamflow.ml.model import Model, ModelStep, RiverModel, build_estimator

__all__ = ["Model", "ModelStep", "RiverModel", "build_estimator"]
