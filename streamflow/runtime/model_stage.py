"""The model stage runner: Kafka in, predictions out, with checkpointed exactly-once learning.

The engine runs in worker processes (:mod:`streamflow.ml.worker`), one per core, each learning
some of the input partitions (:mod:`streamflow.ml.pool`). This thread decodes each batch, hands
it over, and produces the output of batches before it while the workers learn: each worker
holding partitions gets a request queued behind the one it works on, when the input allows it
(see READ_AHEAD_BATCHES). A checkpoint request queues behind the batches before it, and its
files are put in place when its reply comes: replies are handled in order, so by then the output
of those batches is out. (A checkpoint in place before that output would have a restarted stage
skip those records.) A restored partition state skips the records below the offsets it covers,
so no record is learned twice.

- Under at_least_once, input offsets are committed only at checkpoints, right after the model
  states covering them were put in place. After a crash the stage resumes from the checkpoint;
  output records produced after it may be produced again.
- Under exactly_once, each batch's output, dead letters and input offsets go in the stage's
  open Kafka transaction (see StageRunner.deliver), which is committed before a checkpoint's
  files are put in place, so the committed offsets run ahead of the checkpoint, never behind it. A
  partition whose restored state is behind the committed offset is brought up to it at
  assignment (and to its first record, should the consumer resume beyond) by replaying the
  input records in between through the model, learning them with their output discarded
  (it was committed when they were first handled): each record is learned once and published
  once. A crash between putting checkpoint files in place and committing cannot skip records,
  since files never cover offsets beyond the committed ones. A labels topic is not supported
  under exactly_once: the order of features and labels could not be replayed as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.config.models import BatchConfig, ModelConfig
from streamflow.metrics import ModelMetrics, StageMetrics
from streamflow.ml.checkpoint import publish
from streamflow.ml.pool import EngineWorkers
from streamflow.ml.registry import Registry
from streamflow.ml.settings import DriftEvent, Promotion
from streamflow.ml.worker import (
    BatchReply,
    BatchRequest,
    Checkpointed,
    Effects,
    EngineSpec,
    MetricValue,
    Standings,
    record_error_type,
)
from streamflow.plugins import ROW_ID
from streamflow.processing.codec import Failures, decode_json, encode_json, user_fields
from streamflow.runtime.dead_letters import Failure, OutputBatch
from streamflow.runtime.mlflow_tracking import MlflowTracker, run_parameters
from streamflow.runtime.row_lineage import origin_headers
from streamflow.runtime.stages import TRANSACTION_INTERVAL_S, StageIdentity, StageRunner
from streamflow.transport import (
    ConsumedBatch,
    OutgoingBatch,
    TopicPartition,
    Transport,
    read_until,
)

log = logging.getLogger(__name__)

# Batches consumed ahead while a worker has no request queued behind the one it works on: a
# fetch brings each partition's records in one piece, so a run of one worker's batches may come
# before the next of another's. Bounded in records (memory): this many batches' worth.
READ_AHEAD_BATCHES = 4

# A closing brace right after a value: an added field can go before it, after a comma.
_SPLICEABLE = r"[^{\s]}$"
_MAX_BYTES = 2**31 - 1
METRIC_VALUES_INTERVAL_S = 1.0
COMMITTED_RETRY_S = 5.0  # how often committed offsets unknown at assignment are asked again


@dataclass(frozen=True)
class DecodedFeatures:
    """Features records decoded as a model stage decodes a batch of them."""

    table: pa.Table  # the records decoded, with their ``_sf_row``
    names: list[str]  # the feature fields
    missing: list[str]  # listed features in no record
    failures: Failures  # (position, error) of the records that are not JSON objects

    def features(self) -> pa.Table:
        """The feature columns, whose rows :mod:`streamflow.ml.features` makes river's dicts."""
        return self.table.select(self.names)

    def missing_error(self) -> KeyError:
        return KeyError(f"feature fields missing: {', '.join(self.missing)}")


def decode_features(config: ModelConfig, values: Sequence[bytes | None]) -> DecodedFeatures:
    """Decode features records into one table and pick their feature fields: ``features``, or
    every integer and float field of these records but the target and the key field. The stage
    decodes each batch with it, and the model server each request."""
    table, failures = decode_json(values)
    if config.features is not None:
        names = config.features
    else:
        excluded = {config.target, config.key_field, ROW_ID}
        names = [field.name for field in table.schema if field.name not in excluded
                 and (pa.types.is_integer(field.type) or pa.types.is_floating(field.type))]
    missing = [name for name in names if name not in table.column_names]
    return DecodedFeatures(table, names, missing, failures)


@dataclass
class InFlight:
    """A batch handed to the worker: what producing its output needs besides the reply."""

    batch: ConsumedBatch
    failures: list[Failure] = field(default_factory=list)
    table: pa.Table | None = None  # the decoded features records
    rows_in_batch: np.ndarray | None = None  # table row → consumed-batch row
    replay: bool = False  # learned again to restore state: its output is discarded


@dataclass(frozen=True)
class CheckpointInFlight:
    """A checkpoint requested from the worker; ``synchronous`` when its offsets must be
    committed before going on (on revoke and shutdown)."""

    synchronous: bool


class ModelStage(StageRunner):
    """Runs a model engine, in its worker process, as a consumer group member. Its
    ``model_metrics`` are those of the model's label, which the worker tells when it starts."""

    def __init__(
        self,
        identity: StageIdentity,
        transport: Transport,
        batch: BatchConfig,
        metrics: StageMetrics,
        model_metrics: Callable[[str], ModelMetrics],
        config: ModelConfig,
        spec: EngineSpec,
        drift_topic: str | None,
        exactly_once: bool = False,
        transaction_interval_s: float = TRANSACTION_INTERVAL_S,
        models_topic: str | None = None,
    ) -> None:
        super().__init__(identity, transport, batch, metrics)
        self.models_topic = models_topic  # where promotions are published
        self.workers = (os.cpu_count() or 1) if config.workers == "auto" else config.workers
        self.transactional = exactly_once
        self.transaction_interval_s = transaction_interval_s
        self.config = config
        self.spec = spec
        self._model_metrics = model_metrics
        self.model_metrics: ModelMetrics  # once the worker tells the label: open
        self.drift_topic = drift_topic
        self.labels_topic = config.labels.topic if config.labels else None
        self.label_field = (config.labels.field if config.labels else None) or config.target
        self.worker: EngineWorkers | None = None
        self.mlflow: MlflowTracker | None = None
        self._last_checkpoint = self._last_saved = time.monotonic()  # requested, durable
        self._metric_values_at = 0.0
        self._drift_events: list[DriftEvent] = []
        self._promotions: list[Promotion] = []
        self._unversioned_promotions: list[str] = []  # for MLflow, until a version holds them
        self._restored: set[int] = set()  # partitions whose state the worker holds
        self._restored_at: dict[int, int] = {}  # exactly_once: restored, not caught up yet
        self._committed_unknown: set[int] = set()  # exactly_once: see _retry_committed
        self._committed_retry_at = 0.0
        self._in_flight: deque[InFlight | CheckpointInFlight] = deque()
        self._checkpoint_due = False

    def topics(self) -> list[str]:
        return [self.identity.input_topic, *([self.labels_topic] if self.labels_topic else [])]

    def open(self) -> None:
        self.worker = EngineWorkers(self.spec, f"model-{self.name}", self._apply, self.workers)
        started = self.worker.started()
        self.model_metrics = self._model_metrics(started.label)
        self.model_metrics.checkpoint_age.set_function(lambda: time.monotonic() - self._last_saved)
        self.worker.call("start", self.transport.cluster_id())
        if self.config.mlflow is not None:
            spec = self.spec
            self.mlflow = MlflowTracker(
                self.config, spec.pipeline,
                Registry.of_stage(spec.checkpoint_root, spec.pipeline, spec.stage),
                run_parameters(self.config, spec.pipeline, started.task, started.metrics,
                               spec.config_hash),
                {"task": started.task, "features": self.config.features,
                 "target": self.config.target, "key_field": self.config.key_field},
                self.model_metrics.mlflow_errors)

    def set_champion(self, version: int) -> None:
        """Point MLflow's ``champion`` alias at the registered model version of registry version
        ``version`` (queued, never blocking; nothing without an ``mlflow:`` block). Each new
        version gets the alias when it is registered; call this when another one becomes it."""
        if self.mlflow is not None:
            self.mlflow.set_champion(version)

    def is_idle(self, since: float) -> bool:
        return super().is_idle(since) and not self._in_flight

    def restore(self, partitions: list[TopicPartition]) -> None:
        """Have the worker restore newly assigned partitions from the checkpoint store."""
        assert self.worker is not None
        numbers = sorted({partition for _topic, partition in partitions} - self._restored)
        if numbers:
            self._finish_all()
            restored = self.worker.call("assign", numbers)
            self._restored.update(numbers)
            if self.transactional:
                self._restored_at.update(restored)
                committed = self.committed_input(numbers)
                self._committed_unknown.update(set(numbers) - set(committed))
                self._catch_up(committed, confirm=True)

    def _retry_committed(self) -> None:
        """Under exactly_once: bring up to date, once the group's committed offsets are known,
        the restored partitions whose offsets were not known at assignment (a crashed member's
        open transaction holds them until it times out) and which got no record since. A
        partition with nothing left to read gets no first record to tell where it resumed: its
        state would stay behind the committed offset, and the checkpoint on stop with it."""
        self._committed_unknown &= set(self._restored_at)
        if not self._committed_unknown or time.monotonic() < self._committed_retry_at:
            return
        self._committed_retry_at = time.monotonic() + COMMITTED_RETRY_S
        known = self.committed_input(sorted(self._committed_unknown))
        self._committed_unknown.difference_update(known)
        self._catch_up(known, confirm=True)

    def _first_offsets(self, batch: ConsumedBatch) -> dict[int, int]:
        """The offset of the first record in ``batch`` of each partition still to catch up."""
        topic, first = self.identity.input_topic, {}
        for batch_topic, partition, offset in zip(batch.topics, batch.partitions, batch.offsets,
                                                  strict=True):
            if batch_topic == topic and partition in self._restored_at:
                first.setdefault(partition, offset)
        return first

    def _catch_up(self, resumed_at: dict[int, int], confirm: bool = False) -> None:
        """Under exactly_once: learn the input records between each restored partition's state
        offset and ``resumed_at``, read from the input topic, discarding their output (it was
        committed when they were first handled).

        At assignment, ``resumed_at`` holds the group's committed offsets, so that a state is
        complete even if no record follows; with ``confirm`` the partitions stay to be checked
        against their first record, which tells where the consumer really resumed (past
        transaction markers) when that differs from the offsets fetched."""
        assert self.worker is not None
        topic = self.identity.input_topic
        start: dict[TopicPartition, int] = {}
        end: dict[TopicPartition, int] = {}
        for partition, offset in resumed_at.items():
            restored_at = self._restored_at.pop(partition)
            if restored_at < offset:
                start[(topic, partition)], end[(topic, partition)] = restored_at, offset
            if confirm:
                self._restored_at[partition] = max(restored_at, offset)
        if not start:
            return
        replayed = 0
        for replayed_batch in read_until(self.transport, start, end):
            request, in_flight = self._prepare(replayed_batch)
            in_flight.replay = True
            self.worker.submit("handle", request)
            self._in_flight.append(in_flight)
            while len(self._in_flight) > 1:  # one batch queued behind the one learned
                self._finish()
            replayed += len(replayed_batch)
        log.info("stage %s learned %d records again to bring partitions %s from their checkpoint "
                 "up to where it resumed them", self.name, replayed, sorted(p for _t, p in start))

    def revoke(self, partitions: list[TopicPartition], lost: bool) -> None:
        """Have the worker forget the partitions. Lost ones (this member was evicted): drop
        their work in flight and every queued checkpoint unpublished (their files would
        overwrite the next owner's); their next owner replays from its checkpoint."""
        gone = {partition for _topic, partition in partitions}
        for partition in gone:
            self._restored_at.pop(partition, None)
        if self.worker is None or self.error is not None or self._callback_error is not None:
            # After a failure (or one of this revoke's checkpoint, raised at the next poll,
            # with replies maybe still pending) the state may be ahead of the output: the
            # stage restarts with a fresh worker and replays.
            return
        if lost:
            self._drop_in_flight(gone)
        forgotten = sorted(gone & self._restored)
        self.worker.call("revoke", forgotten)
        self._restored.difference_update(forgotten)

    def _drop_in_flight(self, lost: set[int]) -> None:
        """Receive every reply in flight. Checkpoints are discarded, their staged files removed
        (a later checkpoint covers the partitions kept; offsets are committed only after one is
        in place); batches of lost partitions only are dropped, others finished as usual."""
        assert self.worker is not None
        while self._in_flight:
            in_flight = self._in_flight[0]
            if isinstance(in_flight, InFlight) and not lost.issuperset(in_flight.batch.partitions):
                self._finish()
                continue
            reply = self.worker.receive()
            self._in_flight.popleft()
            if isinstance(in_flight, CheckpointInFlight):
                checkpointed: Checkpointed = reply
                for file in checkpointed.staged:
                    file.temporary.unlink(missing_ok=True)
                    file.tag_file.unlink(missing_ok=True)
        self._drift_events = [event for event in self._drift_events if event.partition not in lost]
        self._promotions = [event for event in self._promotions if event.partition not in lost]

    def _apply(self, effects: Effects) -> None:
        """Count and log what the worker's engine did."""
        for logger, level, message in effects.logs:
            logging.getLogger(logger).log(level, "%s (stage %s)", message, self.name)
        self.model_metrics.records_learned.inc(effects.learned)
        self.model_metrics.evictions.inc(effects.evicted)
        self.model_metrics.features_expired.inc(effects.expired)
        self.model_metrics.labels_unmatched.inc(effects.unmatched)
        for version in effects.rollbacks:
            self.model_metrics.rollbacks(version).inc()
        for event in effects.drift:
            log.warning("stage %s: drift on partition %d at offset %d (policy %s)",
                        self.name, event.partition, event.offset, event.policy)
            self.model_metrics.drift_events.inc()
        self._drift_events += effects.drift
        for promotion in effects.promotions:
            log.warning("stage %s: %s promoted to champion of partition %d from offset %d, "
                        "demoting %s (rolling %s %.6g against %.6g)", self.name,
                        promotion.promoted, promotion.partition, promotion.offset,
                        promotion.demoted, promotion.metric, promotion.promoted_value,
                        promotion.demoted_value)
            self.model_metrics.promotions.inc()
            if self.mlflow is not None:
                self._unversioned_promotions.append(
                    f"{promotion.promoted} replaced {promotion.demoted} on partition "
                    f"{promotion.partition} from offset {promotion.offset}")
        self._promotions += effects.promotions

    def handle(self, batch: ConsumedBatch) -> None:
        assert self.worker is not None
        if self._restored_at:
            self._catch_up(self._first_offsets(batch))
        request, in_flight = self._prepare(batch)
        now = time.monotonic()
        if now - self._metric_values_at >= METRIC_VALUES_INTERVAL_S:
            request.metric_values = True
            self._metric_values_at = now
        self.worker.submit("handle", request)
        self._in_flight.append(in_flight)
        if self._checkpoint_due:
            self._request_checkpoint()
        # Only requests older than this batch are finished here: the poll that brought it
        # came after them, so a member evicted meanwhile (a stall) has learned it, and never
        # publishes a checkpoint queued behind it over its partitions' next owner's.
        read_ahead = READ_AHEAD_BATCHES * self.batch_config.max_records
        while self._in_flight[0] is not in_flight and (
                self.worker.ready() or self.worker.saturated()
                or self._records_in_flight() > read_ahead):
            self._finish()

    def _records_in_flight(self) -> int:
        return sum(len(queued.batch) for queued in self._in_flight if isinstance(queued, InFlight))

    def _prepare(self, batch: ConsumedBatch) -> tuple[BatchRequest, InFlight]:
        """Decode a batch into the worker's request; decoding failures stay here."""
        request = BatchRequest()
        in_flight = InFlight(batch)
        is_label = np.asarray([topic == self.labels_topic for topic in batch.topics], dtype=bool)
        if not is_label.all():
            self._prepare_features(batch, np.flatnonzero(~is_label), request, in_flight)
        if is_label.any():
            self._prepare_labels(batch, np.flatnonzero(is_label), request, in_flight)
        return request, in_flight

    def _prepare_features(self, batch: ConsumedBatch, indices: np.ndarray, request: BatchRequest,
                          in_flight: InFlight) -> None:
        decoded = decode_features(self.config, [batch.values[i] for i in indices])
        table = decoded.table
        in_flight.failures += [
            Failure(int(indices[row]), "parse", error) for row, error in decoded.failures
        ]
        rows_in_batch = indices[table[ROW_ID].to_numpy()]
        if decoded.missing:
            error = decoded.missing_error()
            in_flight.failures += [Failure(int(row), "model", error) for row in rows_in_batch]
            return
        in_flight.table, in_flight.rows_in_batch = table, rows_in_batch
        request.features = decoded.features()  # pickled per worker: EngineWorker.submit
        request.partitions = np.asarray(batch.partitions)[rows_in_batch]
        request.offsets = np.asarray(batch.offsets)[rows_in_batch]
        target, key_field = self.config.target, self.config.key_field
        if target and target in table.column_names and not self.labels_topic:
            request.targets = table[target].to_pylist()
        if self.labels_topic:
            request.keys = [batch.keys[row] for row in rows_in_batch]
        if key_field and key_field in table.column_names:
            request.model_keys = [str(value) for value in table[key_field].to_pylist()]

    def _prepare_labels(self, batch: ConsumedBatch, indices: np.ndarray, request: BatchRequest,
                        in_flight: InFlight) -> None:
        table, decode_failures = decode_json([batch.values[i] for i in indices])
        in_flight.failures += [
            Failure(int(indices[row]), "parse", error) for row, error in decode_failures
        ]
        labels = (
            table[self.label_field].to_pylist()
            if self.label_field and self.label_field in table.column_names
            else [None] * table.num_rows
        )
        for row, label in zip(table[ROW_ID].to_pylist(), labels, strict=True):
            position = int(indices[row])
            request.labels.append((position, batch.partitions[position], batch.offsets[position],
                                   batch.keys[position], label))

    def _finish(self) -> None:
        """Once the worker replied to the oldest request, produce that batch's output, or
        commit the offsets that checkpoint covers."""
        assert self.worker is not None and self.producer is not None
        in_flight = self._in_flight[0]
        reply = self.worker.receive()
        self._in_flight.popleft()
        if isinstance(in_flight, CheckpointInFlight):
            checkpointed: Checkpointed = reply
            self.commit_transaction()  # files must never cover offsets beyond committed ones
            self.acknowledge()  # the output of every batch before the checkpoint is out
            versions = publish(checkpointed.staged)
            if self.mlflow is not None:
                for number in versions:
                    self.mlflow.version_published(number)
                if versions and self._unversioned_promotions:
                    self.mlflow.promoted(max(versions), self._unversioned_promotions)
                    self._unversioned_promotions = []
            self._last_saved = time.monotonic()
            self._set_metric_gauges(checkpointed.metric_values, checkpointed.standings)
            if checkpointed.committable and not self.transactional:
                # A periodic commit need not wait: if it is lost, the restored state skips
                # the records it covers.
                self.commit(checkpointed.committable, asynchronous=not in_flight.synchronous)
            return
        if in_flight.replay:
            self._drift_events, self._promotions = [], []  # published when first handled
            return
        batch, failures = in_flight.batch, in_flight.failures
        outgoing: list[OutgoingBatch] = []
        produced = 0
        failures += [Failure(row, "model", record_error_type(kind)(message))
                     for row, kind, message in reply.label_errors]
        if in_flight.table is not None:
            assert in_flight.rows_in_batch is not None
            failures += [
                Failure(int(in_flight.rows_in_batch[row]), "model", record_error_type(kind)(message))
                for row, kind, message in reply.errors
            ]
            output = self._output(in_flight, reply)
            produced = len(output.values)
            outgoing.append(output)
        if self._drift_events and self.drift_topic:
            outgoing.append(self._drift_batch())
        self._drift_events = []
        if self._promotions and self.models_topic:
            outgoing.append(self._promotions_batch())
        self._promotions = []
        offsets = batch.next_offsets() if self.transactional else None

        def delivered(oversize: int) -> None:
            self.count_dead_letters(failures)
            self.metrics.count(len(batch), produced - oversize, len(failures))

        self.deliver(outgoing, failures, batch, offsets, delivered)
        if reply.metric_values is not None:
            self._set_metric_gauges(reply.metric_values, reply.standings)
        if reply.checkpoint_due and not any(  # none queued already
            isinstance(queued, CheckpointInFlight) for queued in self._in_flight
        ):
            self._checkpoint_due = True
        self.idle_since = time.monotonic()

    def _finish_all(self) -> None:
        while self._in_flight:
            self._finish()

    def _output(self, in_flight: InFlight, reply: BatchReply) -> OutputBatch:
        assert in_flight.table is not None and in_flight.rows_in_batch is not None
        batch = in_flight.batch
        rows = np.asarray(reply.rows, dtype=np.int64)  # typed even when empty (all skipped)
        out_rows = in_flight.rows_in_batch[rows]
        originals = [batch.values[row] for row in out_rows]
        return OutputBatch(
            self.config.output,
            self._encode(in_flight.table.take(rows), originals, self._predictions_table(reply)),
            [batch.keys[row] for row in out_rows],
            timestamps_ms=[batch.timestamps_ms[row] for row in out_rows],
            headers=origin_headers(batch, out_rows.tolist()) if self.origin_headers else (),
            rows=out_rows.tolist(),
        )

    @staticmethod
    def _encode(table: pa.Table, originals: list[bytes | None], added: pa.Table) -> list[bytes]:
        """Output JSON: the original bytes with the added fields spliced in before the closing
        brace when that is safe, else the whole record re-encoded."""
        original = pa.array(originals, pa.binary())
        splice = (
            not set(added.column_names) & set(table.column_names)
            and original.null_count == 0
            and pc.all(pc.match_substring_regex(original, _SPLICEABLE)).as_py()
        )
        if not splice:
            for name in added.column_names:
                if name in table.column_names:
                    table = table.drop_columns([name])
            for name, column in zip(added.column_names, added.columns, strict=True):
                table = table.append_column(name, column)
            return encode_json(user_fields(table))
        body = pc.binary_slice(original, 0, -1)
        extra = pc.binary_slice(pa.array(encode_json(added), pa.binary()), 1, _MAX_BYTES)
        return pc.binary_join_element_wise(body, extra, pa.scalar(b",")).to_pylist()

    def _predictions_table(self, reply: BatchReply) -> pa.Table:
        """The fields a model stage adds: prediction, probabilities or score, model_version."""
        predictions = reply.predictions
        columns: dict[str, pa.Array] = {self.config.prediction_field: pa.array(predictions.values)}
        if predictions.probabilities is not None:
            columns["probabilities"] = pa.array([
                {str(label): probability for label, probability in (probabilities or {}).items()}
                or None for probabilities in predictions.probabilities
            ])
        if predictions.scores is not None:
            columns["score"] = pa.array(predictions.scores)
        columns["model_version"] = pa.array(reply.versions, pa.int64())
        return pa.table(columns)

    def _drift_batch(self) -> OutgoingBatch:
        assert self.drift_topic is not None
        events = [json.dumps({
            "pipeline": self.identity.pipeline, "stage": self.name,
            "partition": event.partition, "offset": event.offset, "model_key": event.model_key,
            "error": event.error, "policy": event.policy, "detected_at_ms": int(time.time() * 1000),
        }).encode() for event in self._drift_events]
        return OutgoingBatch(self.drift_topic, events)

    def _promotions_batch(self) -> OutgoingBatch:
        """The promotions as JSON records: the input partition and the first offset of it the
        promoted model predicted, the models, and the values that decided."""
        assert self.models_topic is not None and self.config.promotion is not None
        rule = self.config.promotion
        records = [json.dumps({
            "event": "promotion", "pipeline": self.identity.pipeline, "stage": self.name,
            "topic": self.identity.input_topic, "partition": promotion.partition,
            "offset": promotion.offset, "promoted": promotion.promoted,
            "demoted": promotion.demoted, "model_version": promotion.model_version,
            "metric": promotion.metric, "promoted_value": promotion.promoted_value,
            "demoted_value": promotion.demoted_value, "by": rule.by, "over": rule.over,
            "evaluations": rule.evaluations, "promoted_at_ms": int(time.time() * 1000),
        }).encode() for promotion in self._promotions]
        return OutgoingBatch(self.models_topic, records)

    def _set_metric_gauges(self, values: list[MetricValue], standings: Standings | None) -> None:
        for partition, name, cumulative, rolling in values:
            self.model_metrics.metric(name, "cumulative", partition).set(cumulative)
            self.model_metrics.metric(name, "rolling", partition).set(rolling)
        for partition, models in (standings or {}).items():
            for candidate, standing in models.items():
                self.model_metrics.champion(candidate, partition).set(standing["champion"])
                for name, value in standing["metrics"].items():
                    for window in ("cumulative", "rolling"):
                        self.model_metrics.candidate_metric(
                            candidate, name, window, partition).set(value[window])

    def tick(self) -> None:
        assert self.worker is not None
        while self.worker.ready():
            self._finish()
        self._retry_committed()

    def checkpoint_due(self) -> bool:
        return self._checkpoint_due or (
            time.monotonic() - self._last_checkpoint >= self.config.checkpoint.every_seconds)

    def _request_checkpoint(self, synchronous: bool = False) -> None:
        """Have the worker save the models and partition states once the batches before have
        been learned; their offsets are committed when the reply comes, after their output."""
        assert self.worker is not None
        self._last_checkpoint = time.monotonic()
        self._checkpoint_due = False
        self.worker.submit("checkpoint")
        self._in_flight.append(CheckpointInFlight(synchronous))

    def checkpoint(self, wait: bool) -> None:
        """Have the worker save the models; with ``wait``, then commit the offsets covered
        before returning (else when its reply comes)."""
        if self.worker is None:
            return  # it failed to start: nothing to save
        self._request_checkpoint(synchronous=wait)
        if wait:
            self._finish_all()

    def _close(self) -> None:
        super()._close()  # closing the consumer may still checkpoint through the worker
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.mlflow is not None:
            self.mlflow.close(failed=self.error is not None)
            self.mlflow = None
