"""streamflow: event-driven streaming ETL on Kafka, with Arrow micro-batches and online learning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamflow.api import Pipeline, schema, sql
    from streamflow.config import ConfigError, PipelineConfig, load_pipeline

__version__ = "0.1.0"

_EXPORTS = {"Pipeline": "streamflow.api", "schema": "streamflow.api", "sql": "streamflow.api",
            "ConfigError": "streamflow.config", "PipelineConfig": "streamflow.config",
            "load_pipeline": "streamflow.config"}

__all__ = ["ConfigError", "Pipeline", "PipelineConfig", "__version__", "load_pipeline", "schema", "sql"]


def __getattr__(name: str) -> Any:
    """The public API, imported on first use: processes that need only part of streamflow (the
    model worker) start faster and smaller, which also makes forking them cheaper."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streamflow' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
