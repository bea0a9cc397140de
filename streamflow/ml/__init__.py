"""Online learning: the Model contract, its river implementation, state and checkpoints."""

from streamflow.ml.model import Model, Prediction, RiverModel

__all__ = ["Model", "Prediction", "RiverModel"]
