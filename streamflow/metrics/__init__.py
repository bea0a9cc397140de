"""Prometheus metrics of one running pipeline, and the HTTP endpoint that serves them."""

from streamflow.metrics.registry import (
    ModelMetrics,
    PipelineMetrics,
    SinkMetrics,
    SourceMetrics,
    StageMetrics,
    WindowMetrics,
)
from streamflow.metrics.server import MetricsServer

__all__ = ["MetricsServer", "ModelMetrics", "PipelineMetrics", "SinkMetrics", "SourceMetrics", "StageMetrics",
           "WindowMetrics"]
