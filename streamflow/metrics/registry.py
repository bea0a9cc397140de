"""The metric catalogue. Each pipeline run owns a registry; components get label-bound handles.

Names follow Prometheus conventions: base units (seconds, bytes), ``_total`` on counters (added
by prometheus-client), components in labels, and only bounded label values (pipeline, stage,
topic and partition, step names, metric names from the config).
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamflow import __version__
from streamflow.metrics.letters import LatestDeadLetters
from streamflow.transport import calls_still_blocked

STAGE = ("pipeline", "stage")
SOURCE = ("pipeline", "source")
SINK = ("pipeline", "sink")
MODEL = ("pipeline", "stage", "model")
SCHEDULE = ("pipeline", "schedule")
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
JOB_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10_000, 50_000)

# name, type, help, labels, extra constructor arguments
CATALOG: list[tuple[str, type, str, tuple[str, ...], dict[str, Any]]] = [
    ("streamflow_build_info", Gauge, "Always 1: the version and a hash of the pipeline config.",
     ("pipeline", "version", "config_hash"), {}),
    ("streamflow_records_in", Counter, "Records consumed by a stage.", STAGE, {}),
    ("streamflow_records_out", Counter, "Records a stage passed on (produced or written).", STAGE,
     {}),
    ("streamflow_records_filtered", Counter, "Records a stage dropped on purpose.", STAGE, {}),
    ("streamflow_records_dead_lettered", Counter,
     "Records a stage sent to its dead-letter topic.", STAGE, {}),
    ("streamflow_record_errors", Counter,
     "Failed records by the step that failed them (parse, a step name, model, sink).",
     (*STAGE, "step"), {}),
    ("streamflow_stage_restarts", Counter,
     "Times a stage or source was restarted after a transient failure.", STAGE, {}),
    ("streamflow_broker_reachable", Gauge,
     "1 while a stage's consumer gets answers about its partitions from the brokers, 0 while "
     "they fail (a broker down, a partition leader moving).", STAGE, {}),
    ("streamflow_kafka_calls_still_blocked", Gauge,
     "Kafka client calls given up in this process after they ignored their timeout (librdkafka "
     "issues 5456 and 5511), still blocked: each holds a replaced client's threads and buffers. "
     "Restart the process if it keeps growing.", ("pipeline",), {}),
    ("streamflow_batch_size_records", Histogram, "Records per consumed micro-batch.", STAGE,
     {"buckets": SIZE_BUCKETS}),
    ("streamflow_batch_processing_seconds", Histogram, "Time to process one micro-batch.", STAGE,
     {"buckets": SECONDS_BUCKETS}),
    ("streamflow_end_to_end_latency_seconds", Histogram,
     "From a record's source timestamp to its sink's commit.", SINK, {"buckets": LATENCY_BUCKETS}),
    ("streamflow_consumer_lag_records", Gauge,
     "Records between a stage's position and the end of a partition.",
     (*STAGE, "topic", "partition"), {}),
    ("streamflow_last_processed_timestamp_seconds", Gauge,
     "Unix time a stage last processed a batch.", STAGE, {}),
    ("streamflow_checkpoint_last_success_timestamp_seconds", Gauge,
     "Unix time of a stage's last successful commit of offsets (and state).", STAGE, {}),
    ("streamflow_lineage_emit_failures", Counter,
     "OpenLineage events that could not be sent (transport error or queue full).", ("pipeline",),
     {}),
    ("streamflow_source_records", Counter, "Records a source published.", SOURCE, {}),
    ("streamflow_source_errors", Counter, "Failed source polls or publishes.", SOURCE, {}),
    ("streamflow_source_records_dead_lettered", Counter,
     "Records a source sent to the dead-letter topic instead of its topic (refused by Kafka).",
     SOURCE, {}),
    ("streamflow_sink_rows_written", Counter, "Rows a sink made durable.", SINK, {}),
    ("streamflow_sink_bytes_written", Counter, "Bytes a sink made durable.", SINK, {}),
    ("streamflow_sink_flush_seconds", Histogram, "Time a sink flush took.", SINK,
     {"buckets": SECONDS_BUCKETS}),
    ("streamflow_model_metric", Gauge,
     "Progressive-validation metric of a model stage per input partition; window is "
     "'cumulative' or 'rolling'.", (*MODEL, "metric", "window", "partition"), {}),
    ("streamflow_model_records_learned", Counter, "Records a model stage learned from.", MODEL, {}),
    ("streamflow_model_drift_events", Counter, "Drifts the model stage's detector found.", MODEL,
     {}),
    ("streamflow_model_labels_unmatched", Counter, "Labels that matched no waiting features.",
     MODEL, {}),
    ("streamflow_model_features_expired", Counter,
     "Feature records dropped from the label wait list (TTL or size limit).", MODEL, {}),
    ("streamflow_model_evictions", Counter,
     "Keyed models moved from memory to the checkpoint store.", MODEL, {}),
    ("streamflow_model_checkpoint_age_seconds", Gauge,
     "Seconds since a model stage last saved its state (or started, before its first save).",
     MODEL, {}),
    ("streamflow_model_rollbacks", Counter,
     "Partitions of a model stage that adopted an earlier registry version (models rollback), "
     "by the version adopted.", (*MODEL, "version"), {}),
    ("streamflow_model_mlflow_errors", Counter,
     "MLflow calls of a model stage that failed or were dropped (queue full, unreachable server).",
     MODEL, {}),
    ("streamflow_model_candidate_metric", Gauge,
     "Progressive-validation metric of each model of a stage with challengers, on its own "
     "predictions, per input partition; candidate is the model's name (main: the stage's "
     "estimator).", (*MODEL, "candidate", "metric", "window", "partition"), {}),
    ("streamflow_model_champion", Gauge,
     "1 for the model whose predictions a stage with challengers publishes, per input "
     "partition; 0 for its challengers.", (*MODEL, "candidate", "partition"), {}),
    ("streamflow_model_promotions", Counter,
     "Challengers a model stage promoted to champion (promotion rule met).", MODEL, {}),
    ("streamflow_records_late", Counter,
     "Records a windowed stage sent to its late topic: one or more of their windows had closed.",
     STAGE, {}),
    ("streamflow_window_results", Counter, "Aggregate records a windowed stage emitted.", STAGE, {}),
    ("streamflow_window_open", Gauge, "Windows held open in a windowed stage's state.", STAGE, {}),
    ("streamflow_schedule_runs", Counter, "Runs a scheduled job started.", SCHEDULE, {}),
    ("streamflow_schedule_failures", Counter, "Runs of a scheduled job that raised.", SCHEDULE, {}),
    ("streamflow_schedule_skipped", Counter,
     "Ticks of a schedule skipped: its job's previous run was still going, or the tick was "
     "missed while nothing ran (on_missed: skip).", SCHEDULE, {}),
    ("streamflow_schedule_duration_seconds", Histogram, "Time a scheduled job's run took.",
     SCHEDULE, {"buckets": JOB_BUCKETS}),
]


EXAMPLE_CHARS = 300  # of the error message kept as a dead-letter reason's example


@dataclass
class DeadLetterReason:
    """Dead letters of one error class: how many, and the step and message of the first."""

    step: str
    example: str
    count: int = 0


class DeadLetterReasons:
    """A component's dead letters by error class, each with its first message as an example.

    Kept in memory for the run's summary rather than exported: error classes come from user
    code and plugins, so they are no bounded label.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, DeadLetterReason] = {}

    def add(self, failures: Iterable[tuple[str, BaseException]]) -> None:
        """Count the (step, error) ``failures``."""
        tally = Tally[tuple[str, type[BaseException]]]()
        first: dict[tuple[str, type[BaseException]], BaseException] = {}
        for step, error in failures:
            key = (step, type(error))
            tally[key] += 1
            first.setdefault(key, error)
        with self._lock:
            for (step, kind), count in tally.items():
                reason = self._reasons.get(kind.__name__)
                if reason is None:
                    example = str(first[(step, kind)])[:EXAMPLE_CHARS]
                    reason = self._reasons[kind.__name__] = DeadLetterReason(step, example)
                reason.count += count

    def snapshot(self) -> dict[str, DeadLetterReason]:
        """The reasons so far by error class, most frequent first."""
        with self._lock:
            reasons = sorted(self._reasons.items(), key=lambda item: -item[1].count)
            return {kind: DeadLetterReason(r.step, r.example, r.count) for kind, r in reasons}


@dataclass
class StageMetrics:
    """Metrics of one stage; :meth:`count` keeps in = out + filtered + dead-lettered."""

    records_in: Counter
    records_out: Counter
    records_filtered: Counter
    records_dead_lettered: Counter
    batch_size: Histogram
    batch_seconds: Histogram
    last_processed: Gauge
    checkpoint_time: Gauge
    restarts: Counter
    broker_reachable: Gauge
    _errors: Any
    _lag: Any
    reasons: DeadLetterReasons = field(default_factory=DeadLetterReasons)
    latest_dead_letters: LatestDeadLetters = field(default_factory=LatestDeadLetters)

    def count(self, consumed: int, out: int, dead_lettered: int) -> None:
        """Account for one batch: whatever was neither passed on nor dead-lettered is filtered."""
        self.records_in.inc(consumed)
        self.records_out.inc(out)
        self.records_dead_lettered.inc(dead_lettered)
        # A step that fans one record out into several can make out exceed in.
        self.records_filtered.inc(max(consumed - out - dead_lettered, 0))
        self.batch_size.observe(consumed)
        self.last_processed.set(time.time())

    def error(self, step: str) -> Counter:
        return self._errors(step)

    def lag(self, topic: str, partition: int) -> Gauge:
        return self._lag(topic, str(partition))


@dataclass
class SourceMetrics:
    records_produced: Counter
    errors: Counter
    restarts: Counter
    records_dead_lettered: Counter
    reasons: DeadLetterReasons = field(default_factory=DeadLetterReasons)
    latest_dead_letters: LatestDeadLetters = field(default_factory=LatestDeadLetters)


@dataclass
class SinkMetrics:
    rows_written: Counter
    bytes_written: Counter
    flush_seconds: Histogram
    latency: Histogram


@dataclass
class ModelMetrics:
    """Metrics of one model stage; ``metric(name, window, partition)`` gives a gauge."""

    _metric: Any
    records_learned: Counter
    drift_events: Counter
    labels_unmatched: Counter
    features_expired: Counter
    evictions: Counter
    checkpoint_age: Gauge
    mlflow_errors: Counter
    promotions: Counter
    _rollbacks: Any
    _candidate_metric: Any
    _champion: Any

    def metric(self, name: str, window: str, partition: int) -> Gauge:
        return self._metric(name, window, str(partition))

    def rollbacks(self, version: int) -> Counter:
        """Adoptions of registry version ``version``."""
        return self._rollbacks(str(version))

    def candidate_metric(self, candidate: str, name: str, window: str, partition: int) -> Gauge:
        return self._candidate_metric(candidate, name, window, str(partition))

    def champion(self, candidate: str, partition: int) -> Gauge:
        return self._champion(candidate, str(partition))


@dataclass
class WindowMetrics:
    """Metrics of one windowed stage, besides its :class:`StageMetrics`."""

    late: Counter
    results: Counter
    open_windows: Gauge


@dataclass
class ScheduleMetrics:
    """Metrics of one schedule."""

    runs: Counter
    failures: Counter
    skipped: Counter
    duration: Histogram


class PipelineMetrics:
    """All metrics of one pipeline, in a registry of their own."""

    def __init__(self, pipeline: str, config_hash: str = "") -> None:
        self.pipeline = pipeline
        self.registry = CollectorRegistry()
        self.families: dict[str, Any] = {
            name: kind(name, text, labels, registry=self.registry, **extra)
            for name, kind, text, labels, extra in CATALOG
        }
        self.families["streamflow_build_info"].labels(pipeline, __version__, config_hash).set(1)
        self.families["streamflow_kafka_calls_still_blocked"].labels(pipeline).set_function(
            calls_still_blocked)
        # by source or stage: kept across the restarts that build its handles anew
        self.reasons: dict[str, DeadLetterReasons] = {}
        self.latest_dead_letters = LatestDeadLetters()  # of every source and stage, for the dashboard

    def _bound(self, name: str, *labels: str) -> Any:
        return self.families[name].labels(*labels)

    def _partial(self, name: str, *labels: str) -> Any:
        family = self.families[name]
        return lambda *rest: family.labels(*labels, *rest)

    def stage(self, name: str, steps: tuple[str, ...] = ()) -> StageMetrics:
        """Handles for a stage; error counters of ``steps`` (and parse) start at 0."""
        labels = (self.pipeline, name)
        metrics = StageMetrics(
            *(self._bound(family, *labels) for family in (
                "streamflow_records_in", "streamflow_records_out", "streamflow_records_filtered",
                "streamflow_records_dead_lettered", "streamflow_batch_size_records",
                "streamflow_batch_processing_seconds",
                "streamflow_last_processed_timestamp_seconds",
                "streamflow_checkpoint_last_success_timestamp_seconds",
                "streamflow_stage_restarts", "streamflow_broker_reachable",
            )),
            self._partial("streamflow_record_errors", *labels),
            self._partial("streamflow_consumer_lag_records", *labels),
            self.reasons.setdefault(name, DeadLetterReasons()),
            latest_dead_letters=self.latest_dead_letters,
        )
        for step in ("parse", *steps):
            metrics.error(step)
        return metrics

    def source(self, name: str) -> SourceMetrics:
        labels = (self.pipeline, name)
        return SourceMetrics(
            self._bound("streamflow_source_records", *labels),
            self._bound("streamflow_source_errors", *labels),
            self._bound("streamflow_stage_restarts", *labels),
            self._bound("streamflow_source_records_dead_lettered", *labels),
            self.reasons.setdefault(name, DeadLetterReasons()),
            latest_dead_letters=self.latest_dead_letters,
        )

    def sink(self, name: str) -> SinkMetrics:
        labels = (self.pipeline, name)
        return SinkMetrics(*(self._bound(family, *labels) for family in (
            "streamflow_sink_rows_written", "streamflow_sink_bytes_written",
            "streamflow_sink_flush_seconds", "streamflow_end_to_end_latency_seconds",
        )))

    def window(self, stage: str) -> WindowMetrics:
        labels = (self.pipeline, stage)
        return WindowMetrics(*(self._bound(family, *labels) for family in (
            "streamflow_records_late", "streamflow_window_results", "streamflow_window_open",
        )))

    def model(self, stage: str, model: str) -> ModelMetrics:
        labels = (self.pipeline, stage, model)
        return ModelMetrics(
            self._partial("streamflow_model_metric", *labels),
            *(self._bound(family, *labels) for family in (
                "streamflow_model_records_learned", "streamflow_model_drift_events",
                "streamflow_model_labels_unmatched", "streamflow_model_features_expired",
                "streamflow_model_evictions", "streamflow_model_checkpoint_age_seconds",
                "streamflow_model_mlflow_errors", "streamflow_model_promotions",
            )),
            self._partial("streamflow_model_rollbacks", *labels),
            self._partial("streamflow_model_candidate_metric", *labels),
            self._partial("streamflow_model_champion", *labels),
        )

    def schedule(self, name: str) -> ScheduleMetrics:
        labels = (self.pipeline, name)
        return ScheduleMetrics(*(self._bound(family, *labels) for family in (
            "streamflow_schedule_runs", "streamflow_schedule_failures",
            "streamflow_schedule_skipped", "streamflow_schedule_duration_seconds",
        )))
