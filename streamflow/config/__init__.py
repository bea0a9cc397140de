"""Pipeline configuration: models, loading and validation."""

from streamflow.config.loader import ConfigError, load_pipeline, parse_pipeline
from streamflow.config.models import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "load_pipeline", "parse_pipeline"]
