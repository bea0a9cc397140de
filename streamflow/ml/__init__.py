"""Online learning: the Model contract, its river implementation, state and checkpoints."""

from streamflow.ml.model import Model, Prediction, RiverModel
from streamflow.ml.registry import Exported, load

__all__ = ["Exported", "Model", "Prediction", "RiverModel", "load"]
