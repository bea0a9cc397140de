"""streamflow: event-driven streaming ETL on Kafka, with Arrow micro-batches and online learning."""

__version__ = "0.1.0"
