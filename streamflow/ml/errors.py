"""The model layer's errors, importable without river (whose import takes seconds and ~90 MB)."""


class ModelSpecError(ValueError):
    """The estimator, metric or detector named in the config cannot be built."""
