"""streamflow: event-driven streaming ETL on Kafka, with Arrow micro-batches and online learning."""

__version__ = "0.1.0"

from streamflow.api import Pipeline, schema, sql
from streamflow.config import ConfigError, PipelineConfig, load_pipeline

__all__ = ["ConfigError", "Pipeline", "PipelineConfig", "__version__", "load_pipeline", "schema", "sql"]
