"""The metric catalogue. Each pipeline run owns a registry; components get label-bound handles."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE = ("pipeline", "stage")
BATCH_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass
class StageMetrics:
    """Counters of one stage: in = out + filtered + dead-lettered."""

    records_in: Counter
    records_out: Counter
    records_filtered: Counter
    records_dead_lettered: Counter
    batch_seconds: Histogram
    lag: Gauge


@dataclass
class SourceMetrics:
    records_produced: Counter
    errors: Counter


@dataclass
class SinkMetrics:
    rows_written: Counter
    flush_seconds: Histogram


@dataclass
class ModelMetrics:
    """Metrics of one model stage; ``metric(name, window, partition)`` gives a gauge."""

    metric: Callable[[str, str, int], Gauge]
    records_learned: Counter
    drift_events: Counter
    labels_unmatched: Counter
    features_expired: Counter
    evictions: Counter
    checkpoint_time: Gauge


class PipelineMetrics:
    """All metrics of one pipeline, in a registry of their own."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.registry = CollectorRegistry()
        r = self.registry
        self._in = Counter("streamflow_records_in", "Records consumed by a stage.", STAGE, registry=r)
        self._out = Counter(
            "streamflow_records_out", "Records a stage passed on (produced or written).", STAGE,
            registry=r,
        )
        self._filtered = Counter(
            "streamflow_records_filtered", "Records a stage dropped on purpose.", STAGE, registry=r
        )
        self._dead = Counter(
            "streamflow_records_dead_lettered", "Records a stage sent to its dead-letter topic.",
            STAGE, registry=r,
        )
        self._batch_seconds = Histogram(
            "streamflow_batch_processing_seconds", "Time to process one micro-batch.", STAGE,
            buckets=BATCH_SECONDS_BUCKETS, registry=r,
        )
        self._lag = Gauge(
            "streamflow_consumer_lag_records", "Records not yet consumed by a stage.", STAGE,
            registry=r,
        )
        self._source_records = Counter(
            "streamflow_source_records", "Records a source published.", ("pipeline", "source"),
            registry=r,
        )
        self._source_errors = Counter(
            "streamflow_source_errors", "Failed source polls or publishes.", ("pipeline", "source"),
            registry=r,
        )
        self._sink_rows = Counter(
            "streamflow_sink_rows_written", "Rows a sink made durable.", ("pipeline", "sink"),
            registry=r,
        )
        self._sink_flush = Histogram(
            "streamflow_sink_flush_seconds", "Time a sink flush took.", ("pipeline", "sink"),
            buckets=BATCH_SECONDS_BUCKETS, registry=r,
        )
        model = (*STAGE, "model")
        self._model_metric = Gauge(
            "streamflow_model_metric",
            "Progressive-validation metric of a model stage, per input partition; window is "
            "'cumulative' or 'rolling'.",
            (*model, "metric", "window", "partition"), registry=r,
        )
        self._learned = Counter(
            "streamflow_model_records_learned", "Records a model stage learned from.", model,
            registry=r,
        )
        self._drift = Counter(
            "streamflow_model_drift_events", "Drifts the model stage's detector found.", model,
            registry=r,
        )
        self._unmatched = Counter(
            "streamflow_model_labels_unmatched", "Labels that matched no waiting features.", model,
            registry=r,
        )
        self._expired = Counter(
            "streamflow_model_features_expired",
            "Feature records dropped from the label wait list (TTL or size limit).", model,
            registry=r,
        )
        self._evicted = Counter(
            "streamflow_model_evictions", "Keyed models moved from memory to the checkpoint store.",
            model, registry=r,
        )
        self._checkpoint_time = Gauge(
            "streamflow_checkpoint_last_success_timestamp_seconds",
            "Unix time of the stage's last successful checkpoint.", STAGE, registry=r,
        )

    def stage(self, name: str) -> StageMetrics:
        labels = (self.pipeline, name)
        return StageMetrics(
            self._in.labels(*labels),
            self._out.labels(*labels),
            self._filtered.labels(*labels),
            self._dead.labels(*labels),
            self._batch_seconds.labels(*labels),
            self._lag.labels(*labels),
        )

    def source(self, name: str) -> SourceMetrics:
        return SourceMetrics(
            self._source_records.labels(self.pipeline, name),
            self._source_errors.labels(self.pipeline, name),
        )

    def sink(self, name: str) -> SinkMetrics:
        return SinkMetrics(
            self._sink_rows.labels(self.pipeline, name),
            self._sink_flush.labels(self.pipeline, name),
        )

    def model(self, stage: str, model: str) -> ModelMetrics:
        labels = (self.pipeline, stage, model)
        return ModelMetrics(
            lambda metric, window, partition: self._model_metric.labels(
                *labels, metric, window, str(partition)
            ),
            self._learned.labels(*labels),
            self._drift.labels(*labels),
            self._unmatched.labels(*labels),
            self._expired.labels(*labels),
            self._evicted.labels(*labels),
            self._checkpoint_time.labels(self.pipeline, stage),
        )
