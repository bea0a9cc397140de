"""Prometheus metrics of one running pipeline (the HTTP endpoint that serves them is
:mod:`streamflow.metrics.server`, imported only where it runs: it loads aiohttp)."""

from streamflow.metrics.registry import (
    ModelMetrics,
    PipelineMetrics,
    SinkMetrics,
    SourceMetrics,
    StageMetrics,
    WindowMetrics,
)

__all__ = ["ModelMetrics", "PipelineMetrics", "SinkMetrics", "SourceMetrics", "StageMetrics",
           "WindowMetrics"]
