"""The model stage runner: Kafka in, predictions out, with checkpointed exactly-once learning.

Unlike a processor stage, a model stage commits input offsets only at checkpoints, right after
the model states covering them were saved. After a crash it resumes from the checkpoint and
skips what the restored state already covered, so no record is learned twice or skipped. Output
records produced after the last checkpoint may be produced again (at-least-once output).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.config.models import BatchConfig, ModelConfig
from streamflow.metrics import ModelMetrics, StageMetrics
from streamflow.ml.engine import DriftEvent, ModelEngine, Scored
from streamflow.plugins import ROW_ID
from streamflow.processing.codec import decode_json, encode_json
from streamflow.runtime.dead_letters import Failure
from streamflow.runtime.stages import StageIdentity, StageRunner
from streamflow.transport import ConsumedBatch, OutgoingBatch, TopicPartition, Transport

log = logging.getLogger(__name__)

_UNSAFE_BEFORE_BRACE = (b"{", b" ", b"\t", b"\r", b"\n")
_MAX_BYTES = 2**31 - 1


class ModelStage(StageRunner):
    """Runs a :class:`ModelEngine` as a consumer group member."""

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
        model_metrics: ModelMetrics,
        config: ModelConfig,
        engine: ModelEngine,
        drift_topic: str | None,
    ) -> None:
        super().__init__(identity, transport, batch, metrics)
        self.config = config
        self.engine = engine
        self.model_metrics = model_metrics
        self.drift_topic = drift_topic
        self.labels_topic = config.labels.topic if config.labels else None
        self.label_field = (config.labels.field if config.labels else None) or config.target
        self._last_checkpoint = time.monotonic()
        model_metrics.checkpoint_age.set_function(lambda: time.monotonic() - self._last_checkpoint)
        self._drift_events: list[DriftEvent] = []
        self._assigned: list[TopicPartition] = []

    def topics(self) -> list[str]:
        return [self.identity.input_topic, *([self.labels_topic] if self.labels_topic else [])]

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        super().on_assign(partitions)
        # Restoring needs broker calls, which some clients forbid inside rebalance callbacks:
        # do it before the next batch is scored instead.
        self._assigned.extend(partitions)

    def open(self) -> None:
        admin = self.transport.admin()
        try:
            self.engine.cluster_id = admin.cluster_id()
        finally:
            admin.close()

    def _restore_assigned(self) -> None:
        """Restore the state of newly assigned partitions from the checkpoint store."""
        partitions, self._assigned = self._assigned, []
        for partition in sorted({partition for _topic, partition in partitions}):
            if partition not in self.engine.states:
                self.engine.assign(partition)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        super().on_revoke(partitions)
        self._assigned = [tp for tp in self._assigned if tp not in partitions]
        if self.error is None:  # after a failure the state may be ahead of the output: replay
            self.checkpoint()
        for partition in {p for _topic, p in partitions}:
            self.engine.revoke(partition)

    def record_drift(self, event: DriftEvent) -> None:
        log.warning("stage %s: drift on partition %d at offset %d (policy %s)",
                    self.name, event.partition, event.offset, event.policy)
        self.model_metrics.drift_events.inc()
        self._drift_events.append(event)

    def handle(self, batch: ConsumedBatch) -> None:
        assert self.producer is not None
        self._restore_assigned()
        is_label = np.asarray([topic == self.labels_topic for topic in batch.topics], dtype=bool)
        failures: list[Failure] = []
        outgoing: list[OutgoingBatch] = []
        produced = 0
        if not is_label.all():
            output, failed = self._score(batch, np.flatnonzero(~is_label))
            failures += failed
            produced = len(output.values)
            outgoing.append(output)
        if is_label.any():
            failures += self._learn_labels(batch, np.flatnonzero(is_label))
        self.engine.expire()
        if self._drift_events and self.drift_topic:
            outgoing.append(self._drift_batch())
        self._drift_events = []
        self.producer.produce(outgoing)
        self.produce_dead_letters(failures, batch)
        self.metrics.count(len(batch), produced, len(failures))
        self._publish_metric_values()
        if self.engine.due_for_checkpoint(self.config.checkpoint.every_records):
            self.checkpoint()

    def _feature_names(self, table: pa.Table) -> list[str]:
        if self.config.features is not None:
            return self.config.features
        excluded = {self.config.target, self.config.key_field, ROW_ID}
        return [
            f.name for f in table.schema
            if f.name not in excluded
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        ]

    def _score(self, batch: ConsumedBatch, indices: np.ndarray) -> tuple[OutgoingBatch, list[Failure]]:
        values = [batch.values[i] for i in indices]
        table, decode_failures = decode_json(values)
        failures = [Failure(int(indices[row]), "parse", error) for row, error in decode_failures]
        names = self._feature_names(table)
        missing = [name for name in names if name not in table.column_names]
        rows_in_batch = indices[table[ROW_ID].to_numpy()]  # table row → consumed-batch row
        if missing:
            error = KeyError(f"feature fields missing: {', '.join(missing)}")
            failures += [Failure(int(row), "model", error) for row in rows_in_batch]
            return OutgoingBatch(self.config.output, []), failures
        selected = table.select(names)
        features = selected.to_pylist()
        if any(column.null_count for column in selected.columns):
            features = [{k: v for k, v in row.items() if v is not None} for row in features]
        target = self.config.target
        targets = (
            table[target].to_pylist() if target and target in table.column_names and not self.labels_topic
            else [None] * table.num_rows
        )
        key_field = self.config.key_field
        model_keys = (
            [str(value) for value in table[key_field].to_pylist()]
            if key_field and key_field in table.column_names else [""] * table.num_rows
        )
        partitions = np.asarray(batch.partitions)[rows_in_batch]
        scored: list[Scored | None] = [None] * table.num_rows
        for partition in np.unique(partitions):
            members = np.flatnonzero(partitions == partition)
            results = self.engine.score(
                int(partition),
                [batch.offsets[rows_in_batch[m]] for m in members],
                [batch.keys[rows_in_batch[m]] for m in members],
                [features[m] for m in members],
                [targets[m] for m in members],
                [model_keys[m] for m in members],
            )
            for member, result in zip(members, results, strict=True):
                scored[member] = result
        keep = []
        for row, result in enumerate(scored):
            if result is None:
                continue  # handled before a restart: already learned and already produced
            if result.error is not None:
                failures.append(Failure(int(rows_in_batch[row]), "model", result.error))
            else:
                keep.append(row)
        out_rows = rows_in_batch[keep]
        originals = [batch.values[row] for row in out_rows]
        added = self._predictions_table([scored[row] for row in keep])
        return OutgoingBatch(
            self.config.output,
            self._encode(table.take(keep), originals, added),
            [batch.keys[row] for row in out_rows],
            timestamps_ms=[batch.timestamps_ms[row] for row in out_rows],
        ), failures

    @staticmethod
    def _encode(table: pa.Table, originals: list[bytes | None], added: pa.Table) -> list[bytes]:
        """Output JSON: the original bytes with the added fields spliced in before the closing
        brace when that is safe, else the whole record re-encoded."""
        splice = not set(added.column_names) & set(table.column_names) and all(
            value is not None and value.endswith(b"}") and value[-2:-1] not in _UNSAFE_BEFORE_BRACE
            for value in originals
        )
        if not splice:
            for name in added.column_names:
                if name in table.column_names:
                    table = table.drop_columns([name])
            for name, column in zip(added.column_names, added.columns, strict=True):
                table = table.append_column(name, column)
            return encode_json(table)
        body = pc.binary_slice(pa.array(originals, pa.binary()), 0, -1)
        extra = pc.binary_slice(pa.array(encode_json(added), pa.binary()), 1, _MAX_BYTES)
        return pc.binary_join_element_wise(body, extra, pa.scalar(b",")).to_pylist()

    def _predictions_table(self, scored: list[Any]) -> pa.Table:
        """The fields a model stage adds: prediction, probabilities or score, model_version."""
        predictions = [result.prediction for result in scored]
        columns: dict[str, pa.Array] = {
            self.config.prediction_field: pa.array([p.value for p in predictions])
        }
        if self.engine.settings.task == "classification":
            columns["probabilities"] = pa.array([
                {str(label): probability for label, probability in (p.probabilities or {}).items()}
                or None for p in predictions
            ])
        if self.engine.settings.task == "anomaly":
            columns["score"] = pa.array([p.score for p in predictions])
        columns["model_version"] = pa.array([r.model_version for r in scored], pa.int64())
        return pa.table(columns)

    def _learn_labels(self, batch: ConsumedBatch, indices: np.ndarray) -> list[Failure]:
        table, decode_failures = decode_json([batch.values[i] for i in indices])
        failures = [Failure(int(indices[row]), "parse", error) for row, error in decode_failures]
        labels = (
            table[self.label_field].to_pylist()
            if self.label_field and self.label_field in table.column_names
            else [None] * table.num_rows
        )
        for row, label in zip(table[ROW_ID].to_pylist(), labels, strict=True):
            position = int(indices[row])
            self.engine.label(
                batch.partitions[position], batch.offsets[position], batch.keys[position], label
            )
        return failures

    def _drift_batch(self) -> OutgoingBatch:
        assert self.drift_topic is not None
        events = [json.dumps({
            "pipeline": self.identity.pipeline, "stage": self.name,
            "partition": event.partition, "offset": event.offset, "model_key": event.model_key,
            "error": event.error, "policy": event.policy, "detected_at_ms": int(time.time() * 1000),
        }).encode() for event in self._drift_events]
        return OutgoingBatch(self.drift_topic, events)

    def _publish_metric_values(self) -> None:
        for partition, state in self.engine.states.items():
            for metric in state.metrics:
                self.model_metrics.metric(metric.name, "cumulative", partition).set(
                    metric.cumulative.get()
                )
                self.model_metrics.metric(metric.name, "rolling", partition).set(metric.rolling_value())

    def tick(self) -> None:
        self._restore_assigned()
        if time.monotonic() - self._last_checkpoint >= self.config.checkpoint.every_seconds:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save models and partition states, then commit the offsets they cover."""
        self._last_checkpoint = time.monotonic()
        if not self.engine.states:
            return
        self.engine.checkpoint()
        self.commit(self.engine.committable(), asynchronous=False)

    def drain(self) -> None:
        self.checkpoint()
