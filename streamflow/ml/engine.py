"""The state of a model stage and the predict-then-learn loop, without any Kafka.

State is kept per input partition (features and labels topics are co-partitioned by key), so a
partition can move to another replica with its model, metrics and waiting features. A
partition's state and its models in memory are saved together in one atomic checkpoint with the
offsets they cover; on restore, records below those offsets are skipped, which makes learning
exactly-once across restarts.

Keyed models evicted from memory (LRU) are written to files of their own at eviction and carry
their own offsets, so they are never learned twice either. A model evicted, reloaded and
evicted again between two checkpoints is saved ahead of its partition's checkpoint; after a
crash in that window its replayed records are predicted by that newer model. A partition's state
lists the keys that have such a file, so that a registry version of a checkpoint holds the
files of the models that were not in memory, as they were then (see
``ModelEngine.version_links``), and a rollback puts a version's files back in their place.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from river import utils

from streamflow.ml.checkpoint import CheckpointStore, Snapshot, link_checkpoint, model_name
from streamflow.ml.model import MAIN_MODEL, Features, Model, Prediction, PredictionColumns
from streamflow.ml.settings import DriftEvent, EngineSettings, Promotion, PromotionRule
from streamflow.ml.spec import build_detector, build_metric

log = logging.getLogger(__name__)


@dataclass
class TrackedMetric:
    """A river metric, cumulative and over a rolling window.

    The rolling value is read once per micro-batch, so updates to it are queued (at most one
    window's worth) and applied when it is read: with batches larger than the window, most
    records never pay for river's update-and-revert.
    """

    name: str
    cumulative: Any
    rolling: Any
    uses_probabilities: bool
    unapplied: deque[tuple[Any, Any]]

    @classmethod
    def create(cls, name: str, window: int, task: str) -> TrackedMetric:
        metric = build_metric(name)
        return cls(
            name,
            metric,
            utils.Rolling(type(metric), window_size=window),
            task == "classification" and not metric.requires_labels,
            deque(maxlen=window),
        )

    def update(self, target: Any, prediction: Prediction) -> None:
        value = prediction.probabilities if self.uses_probabilities else prediction.value
        if value is None or value == {}:
            return
        self.cumulative.update(target, value)
        self.unapplied.append((target, value))

    def update_many(self, targets: list[Any], predictions: PredictionColumns) -> None:
        """:meth:`update` for a run of records; those without a prediction or target are left out."""
        values = predictions.probabilities if self.uses_probabilities else predictions.values
        assert values is not None
        if None in targets or None in values or (self.uses_probabilities and {} in values):
            pairs = [(target, value) for target, value in zip(targets, values, strict=True)
                     if target is not None and value is not None and value != {}]
            targets, values = [target for target, _ in pairs], [value for _, value in pairs]
        deque(map(self.cumulative.update, targets, values), maxlen=0)  # runs the map in C
        window = self.unapplied.maxlen
        assert window is not None
        self.unapplied.extend(zip(targets[-window:], values[-window:], strict=True))

    def rolling_value(self) -> float:
        """The metric over the last ``window`` updates."""
        window = self.unapplied.maxlen
        if len(self.unapplied) == window:  # every earlier update has left the window
            self.rolling = utils.Rolling(type(self.cumulative), window_size=window)
        for target, value in self.unapplied:
            self.rolling.update(target, value)
        self.unapplied.clear()
        return float(self.rolling.get())


@dataclass
class ModelSlot:
    """One model (the stage's, or one key's) with what it has learned; with challengers, the
    champion, its name, and the challengers by name (each a slot of its own)."""

    model: Model
    background: Model | None = None
    learned: int = 0
    next_offsets: dict[str, int] = field(default_factory=dict)
    name: str = MAIN_MODEL
    challengers: dict[str, ModelSlot] | None = None


@dataclass
class Challenge:
    """A partition's standings of its champion and challengers, by model name: each model's own
    progressive metrics, the promotion metric over the rule's window, and the evaluations won
    in a row."""

    metrics: dict[str, list[TrackedMetric]] = field(default_factory=dict)
    judged: dict[str, TrackedMetric] = field(default_factory=dict)
    streaks: dict[str, int] = field(default_factory=dict)
    since_evaluation: int = 0  # evaluated records since the last evaluation
    promotions: int = 0


@dataclass
class Waiting:
    """Features predicted on, waiting for their label."""

    features: Features
    prediction: Prediction
    model_key: str
    expires_at: float


@dataclass
class PartitionState:
    """Everything a partition's checkpoint holds besides the models."""

    partition: int
    next_offsets: dict[str, int] = field(default_factory=dict)
    metrics: list[TrackedMetric] = field(default_factory=list)
    waiting: OrderedDict[bytes, Waiting] = field(default_factory=OrderedDict)
    detector: Any | None = None
    drift_events: int = 0
    records_since_checkpoint: int = 0
    rollback: dict[str, Any] | None = None  # the rollback request adopted last (registry)
    challenge: Challenge | None = None  # with challengers
    # keys whose model has a file of its own in the store, with the records it had learned then
    stored: dict[str, int] = field(default_factory=dict)


@dataclass
class ScoredRun:
    """What :meth:`ModelEngine.score` did with a run of records.

    Records before ``first`` were handled before a restart (already learned and produced). From
    ``first`` on, each has an entry in ``predictions`` and one in ``versions``, the version of
    the model that predicted (the records it had learned); a record that failed has a None
    prediction and its error in ``errors``, under its position in the run.
    """

    first: int
    predictions: PredictionColumns = field(default_factory=PredictionColumns)
    versions: list[int] = field(default_factory=list)
    errors: dict[int, BaseException] = field(default_factory=dict)


class ModelEngine:
    """Predicts and learns per partition; checkpoints to a :class:`CheckpointStore`. Its
    settings name the task and the metrics (see :meth:`streamflow.ml.host.EngineHost.resolved`)."""

    def __init__(
        self,
        settings: EngineSettings,
        new_model: Callable[[], Model],
        store: CheckpointStore,
        on_learned: Callable[[int], None] = lambda count: None,
        on_drift: Callable[[DriftEvent], None] = lambda event: None,
        on_evicted: Callable[[], None] = lambda: None,
        on_expired: Callable[[int], None] = lambda count: None,
        on_unmatched: Callable[[], None] = lambda: None,
        new_challengers: dict[str, Callable[[], Model]] | None = None,
        on_promoted: Callable[[Promotion], None] = lambda promotion: None,
    ) -> None:
        assert settings.task is not None and settings.metrics is not None, "unresolved settings"
        self.settings = settings
        self.new_model = new_model
        # every model by name: the stage's own and the challengers
        self.new_models = {MAIN_MODEL: new_model, **(new_challengers or {})}
        self._on_promoted = on_promoted
        self.store = store
        self.states: dict[int, PartitionState] = {}
        self.cluster_id: str | None = None  # of the Kafka cluster whose offsets states hold
        self.registry_metadata: dict[str, Any] = {}  # what each registry version also records
        self.slots: OrderedDict[tuple[int, str], ModelSlot] = OrderedDict()
        # A registry version being prepared (by a forked child) in a directory, and the keys,
        # by partition, whose model files it links: a file of theirs is linked into it first,
        # before the engine replaces or removes it.
        self.version_links: tuple[Path, dict[int, dict[str, int]]] | None = None
        self._on_learned = on_learned
        self._on_drift = on_drift
        self._on_evicted = on_evicted
        self._on_expired = on_expired
        self._on_unmatched = on_unmatched

    # --- partitions -------------------------------------------------------------------------

    def _state_name(self, partition: int) -> str:
        return f"{self.settings.features_topic}+{partition}"

    def _model_name(self, partition: int, key: str) -> str:
        return model_name(self._state_name(partition), key)

    def assign(self, partition: int) -> None:
        """Restore a partition's state from the store, or start it fresh."""
        loaded = self.store.load(self._state_name(partition), "partition-state")
        if loaded is not None and loaded[0].get("cluster_id") != self.cluster_id:
            # The offsets in this checkpoint belong to another cluster's log (for example an
            # earlier run of the in-memory embedded broker): they mean nothing here.
            log.warning("checkpoint of partition %d was taken on cluster %s, not %s: "
                        "starting afresh", partition, loaded[0].get("cluster_id"), self.cluster_id)
            self.store.delete_tree(self._state_name(partition))
            loaded = None
        if loaded is not None:
            state, models = loaded[1]
            vars(state).setdefault("stored", {})  # a checkpoint from before the field
            self.states[partition] = state
            for key, slot in models.items():
                self.slots[(partition, key)] = slot
                self._line_up(partition, slot)
            log.info("restored partition %d at offsets %s", partition, state.next_offsets)
            return
        state = PartitionState(partition)
        state.metrics = [
            TrackedMetric.create(name, self.settings.rolling_window, self.settings.task)
            for name in self.settings.metrics
        ]
        if self.settings.drift_detector:
            state.detector = build_detector(self.settings.drift_detector)
        self.states[partition] = state

    def revoke(self, partition: int) -> None:
        """Forget a partition (after :meth:`checkpoint`)."""
        self.states.pop(partition, None)
        for slot_key in [k for k in self.slots if k[0] == partition]:
            del self.slots[slot_key]

    def committable(self) -> dict[tuple[str, int], int]:
        """Offsets covered by the in-memory states: commit them only after a checkpoint."""
        return {
            (topic, partition): offset
            for partition, state in self.states.items()
            for topic, offset in state.next_offsets.items()
        }

    # --- models ---------------------------------------------------------------------------

    def slot(self, partition: int, key: str) -> ModelSlot:
        """The model for ``key`` on ``partition``: in memory, from the store, or new."""
        slot_key = (partition, key)
        slot = self.slots.get(slot_key)
        if slot is not None:
            self.slots.move_to_end(slot_key)
            return slot
        loaded = self.store.load(self._model_name(partition, key), "model")
        slot = loaded[1] if loaded is not None else ModelSlot(self.new_model())
        if slot.background is None and self.settings.drift_policy == "swap":
            slot.background = slot.model.fresh()
        self._line_up(partition, slot)
        self.slots[slot_key] = slot
        while len(self.slots) > self.settings.max_models:
            (old_partition, old_key), old = self.slots.popitem(last=False)
            self._keep_for_version(old_partition, old_key)
            self.store.save(self._model_name(old_partition, old_key), "model", old)
            self.states[old_partition].stored[old_key] = old.learned
            self._on_evicted()
        return slot

    def _keep_for_version(self, partition: int, key: str) -> None:
        """Before ``key``'s model file is replaced or removed: link it into the version being
        prepared, if that version holds it (unless linked already, or the version is done)."""
        if self.version_links is not None and key in self.version_links[1].get(partition, ()):
            link_checkpoint(self.store.path(self._model_name(partition, key)),
                            self.version_links[0])

    def _line_up(self, partition: int, slot: ModelSlot) -> None:
        """Give ``slot`` the configured challengers, and its partition standings for them: a
        checkpoint taken with other challengers (or none) keeps the models still configured,
        and its champion, configured or not."""
        state = self.states[partition]
        if not self.settings.challengers:
            if slot.challengers:
                log.warning("partition %d: challengers %s are configured no more: dropped",
                            partition, sorted(slot.challengers))
            slot.challengers, state.challenge = None, None
            return
        before = slot.challengers or {}
        slot.challengers = {
            name: before.get(name) or ModelSlot(new_model(), name=name)
            for name, new_model in self.new_models.items() if name != slot.name
        }
        if set(before) - set(slot.challengers) - {slot.name}:
            log.warning("partition %d: challengers %s are configured no more: dropped", partition,
                        sorted(set(before) - set(slot.challengers) - {slot.name}))
        challenge = state.challenge or Challenge()
        names = [slot.name, *slot.challengers]
        settings, rule = self.settings, self.settings.promotion
        metrics = {name: challenge.metrics.get(name) or [
            TrackedMetric.create(metric, settings.rolling_window, settings.task)
            for metric in settings.metrics] for name in names}
        judged: dict[str, TrackedMetric] = {}
        if rule is not None:
            for name in names:
                kept = challenge.judged.get(name)
                fits = kept is not None and kept.name == rule.metric \
                    and kept.unapplied.maxlen == rule.over
                judged[name] = kept if kept is not None and fits else TrackedMetric.create(
                    rule.metric, rule.over, settings.task)
        if list(metrics) != list(challenge.metrics) or judged.keys() != challenge.judged.keys():
            challenge.since_evaluation = 0  # a new window for the new line-up
        challenge.metrics, challenge.judged = metrics, judged
        challenge.streaks = {name: challenge.streaks.get(name, 0) for name in slot.challengers}
        state.challenge = challenge

    def standings(self, partition: int) -> dict[str, dict[str, Any]]:
        """Each model of a partition with challengers, by name: whether it is the champion, the
        records it learned, its metrics (cumulative and rolling) and, with a promotion rule, the
        promotion metric over the rule's window and the evaluations it won in a row."""
        state = self.states[partition]
        slot = self.slots.get((partition, ""))
        if state.challenge is None or slot is None or slot.challengers is None:
            return {}
        challenge = state.challenge
        learned = {slot.name: slot.learned,
                   **{name: other.learned for name, other in slot.challengers.items()}}
        standings = {}
        for name, tracked in challenge.metrics.items():
            standing: dict[str, Any] = {
                "champion": name == slot.name, "records_learned": learned.get(name, 0),
                "metrics": {metric.name: {"cumulative": float(metric.cumulative.get()),
                                          "rolling": metric.rolling_value()}
                            for metric in tracked}}
            if name in challenge.judged:
                standing["promotion"] = {"value": challenge.judged[name].rolling_value(),
                                         "wins": challenge.streaks.get(name, 0)}
            standings[name] = standing
        return standings

    def checkpoint(self) -> None:
        """Save each partition's state together with its models in memory, in one atomic file.

        Keyed models evicted from memory live in files of their own, written at eviction.
        """
        for snapshot in self.snapshots():
            snapshot.write()

    def snapshots(self) -> list[Snapshot]:
        """What :meth:`checkpoint` writes, taken now, for the caller to write later; each
        names the keyed models of its partition that are in files of their own, not in
        memory (:attr:`Snapshot.evicted`)."""
        snapshots = []
        for partition, state in self.states.items():
            state.records_since_checkpoint = 0
            models = {key: slot for (p, key), slot in self.slots.items() if p == partition}
            learned = {key: slot.learned for key, slot in models.items()}
            evicted = dict(state.stored)
            for key in models:
                evicted.pop(key, None)
            metrics = {metric.name: {"cumulative": float(metric.cumulative.get()),
                                     "rolling": metric.rolling_value()} for metric in state.metrics}
            snapshots.append(self.store.snapshot(
                self._state_name(partition), "partition-state", (state, models),
                {"next_offsets": state.next_offsets, "learned": learned,
                 "cluster_id": self.cluster_id, "partition": partition,
                 "records_learned": sum(learned.values()) + sum(evicted.values()),
                 "metrics": metrics,
                 "drift_events": state.drift_events, "rollback": state.rollback,
                 **({"models": self.standings(partition),
                     "promotions": state.challenge.promotions} if state.challenge else {}),
                 "registry": {**self.registry_metadata, "cluster_id": self.cluster_id}},
                evicted,
            ))
        return snapshots

    def adopt(self, partition: int, state: PartitionState, models: dict[str, ModelSlot],
              rollback: dict[str, Any], evicted: dict[str, tuple[Path, int]]) -> None:
        """Replace partition ``partition``'s models, metrics and drift detector by ``state``'s
        and ``models`` (an earlier checkpoint's), keeping its offsets: the records since that
        checkpoint are not learned again. The keyed models that checkpoint had in files of
        their own, ``evicted`` (by key: a copy of the file, the records its model learned),
        become the store's, read when their key comes; the store's other keyed models are
        removed, so a key that checkpoint did not know starts afresh. ``rollback`` is
        recorded in the state."""
        current = self.states[partition]
        for key in current.stored.keys() - evicted.keys():
            self._keep_for_version(partition, key)
            self.store.replace_by_link(self._model_name(partition, key), None)
        for key, (path, _learned) in evicted.items():
            self._keep_for_version(partition, key)
            self.store.replace_by_link(self._model_name(partition, key), path)
        state.stored = {key: learned for key, (_path, learned) in evicted.items()}
        state.next_offsets = current.next_offsets
        state.waiting = current.waiting
        state.drift_events = current.drift_events
        state.records_since_checkpoint = current.records_since_checkpoint
        state.rollback = rollback
        for slot in models.values():
            slot.next_offsets = dict(current.next_offsets)
            if slot.background is None and self.settings.drift_policy == "swap":
                slot.background = slot.model.fresh()
        self.revoke(partition)
        self.states[partition] = state
        for key, slot in models.items():
            self.slots[(partition, key)] = slot
            self._line_up(partition, slot)

    # --- records --------------------------------------------------------------------------

    def _learn(self, slot: ModelSlot, topic: str, offset: int, features: Features,
               target: Any) -> int:
        """Learn one record unless this model already did before a restart; 1 if learned."""
        if offset < slot.next_offsets.get(topic, 0):
            return 0
        slot.model.learn(features, target)
        if slot.background is not None:
            slot.background.learn(features, target)
        slot.learned += 1
        slot.next_offsets[topic] = offset + 1
        return 1

    def _evaluate(self, state: PartitionState, slot: ModelSlot, model_key: str, offset: int,
                  target: Any, prediction: Prediction) -> None:
        for metric in state.metrics:
            metric.update(target, prediction)
        if state.detector is None or prediction.value is None:
            return
        if self.settings.task == "classification":
            error = float(prediction.value != target)
        else:
            error = abs(float(target) - float(prediction.value))
        state.detector.update(error)
        if not state.detector.drift_detected:
            return
        state.drift_events += 1
        policy = self.settings.drift_policy
        if policy == "reset":
            slot.model = slot.model.fresh()
        elif policy == "swap" and slot.background is not None:
            slot.model, slot.background = slot.background, slot.model.fresh()
        self._on_drift(DriftEvent(state.partition, offset, model_key, error, policy))

    def score(
        self,
        partition: int,
        offsets: list[int],
        keys: list[bytes | None],
        rows: list[Features],
        targets: list[Any],
        model_keys: list[str],
    ) -> ScoredRun:
        """Predict, evaluate and learn features records of one partition, in offset order.

        Records below the restored state's offset were fully handled before a restart; as
        offsets rise, they come first, and they are skipped.
        """
        state = self.states[partition]
        topic = self.settings.features_topic
        run = ScoredRun(bisect.bisect_left(offsets, state.next_offsets.get(topic, 0)))
        if run.first == len(offsets):
            return run
        one_model = self.settings.labels_topic is None and self.settings.key_field is None
        unsupervised = self.settings.task in ("anomaly", "clustering")
        if one_model and self.settings.mini_batch:
            self._score_batch(state, run, offsets, rows, targets)
        elif one_model and state.detector is None and (
            unsupervised or None not in targets[run.first:]
        ):
            self._score_progressively(state, run, offsets[-1] + 1, rows, targets)
        else:
            self._score_each(state, run, offsets, keys, rows, targets, model_keys)
        if state.challenge is not None:
            self._challenge(state, run, offsets, rows, targets)
        state.next_offsets[topic] = offsets[-1] + 1
        state.records_since_checkpoint += len(offsets) - run.first
        return run

    def _score_progressively(self, state: PartitionState, run: ScoredRun, next_offset: int,
                             rows: list[Features], targets: list[Any]) -> None:
        """The common case (one model, labels in the records, no drift detector): the model
        predicts and learns the run in one call, then the metrics take the predictions. Metrics
        never feed back into the model, so this equals :meth:`_score_each`."""
        slot = self.slot(state.partition, "")
        fresh_targets = targets[run.first:]
        run.predictions, errors = slot.model.progressive(rows[run.first:], fresh_targets)
        version = slot.learned
        if errors:
            for position in range(len(run.predictions)):
                run.versions.append(version)
                version += position not in errors
        else:
            run.versions = list(range(version, version + len(run.predictions)))
            version += len(run.predictions)
        run.errors = {run.first + position: error for position, error in errors.items()}
        for metric in state.metrics:
            metric.update_many(fresh_targets, run.predictions)
        learned = version - slot.learned
        slot.learned = version
        slot.next_offsets[self.settings.features_topic] = next_offset
        if learned:
            self._on_learned(learned)

    def _score_each(
        self,
        state: PartitionState,
        run: ScoredRun,
        offsets: list[int],
        keys: list[bytes | None],
        rows: list[Features],
        targets: list[Any],
        model_keys: list[str],
    ) -> None:
        """Record by record: keyed models, delayed labels, drift detection."""
        topic = self.settings.features_topic
        delayed = self.settings.labels_topic is not None
        unsupervised = self.settings.task in ("anomaly", "clustering")
        slot_key, slot = None, None
        learned = 0
        run.predictions = PredictionColumns.for_task(self.settings.task)
        for position in range(run.first, len(offsets)):
            offset, features, target = offsets[position], rows[position], targets[position]
            model_key = model_keys[position]
            if model_key != slot_key or slot is None:
                slot_key, slot = model_key, self.slot(state.partition, model_key)
            run.versions.append(slot.learned)  # the predicting model's version
            prediction: Prediction | None
            try:
                prediction = slot.model.predict(features)
                if delayed:
                    self._wait_for_label(state, keys[position], features, prediction, model_key)
                elif target is not None or unsupervised:
                    if target is not None:
                        self._evaluate(state, slot, model_key, offset, target, prediction)
                    learned += self._learn(slot, topic, offset, features, target)
            except Exception as exc:  # the record goes to the dead letters; the stage goes on
                prediction = None
                run.errors[position] = exc
            run.predictions.append(prediction)
        if learned:
            self._on_learned(learned)

    def _score_batch(self, state: PartitionState, run: ScoredRun, offsets: list[int],
                     rows: list[Features], targets: list[Any]) -> None:
        """Mini-batch mode: predict the whole run, then learn it with ``learn_many``."""
        slot = self.slot(state.partition, "")
        fresh = range(run.first, len(rows))
        predictions = slot.model.predict_batch(rows[run.first:])
        run.predictions = PredictionColumns.for_task(self.settings.task)
        for prediction in predictions:
            run.predictions.append(prediction)
        run.versions = [slot.learned] * len(fresh)
        labelled = [i for i in fresh if targets[i] is not None]
        for position, prediction in zip(fresh, predictions, strict=True):
            if targets[position] is not None and prediction is not None:
                self._evaluate(state, slot, "", offsets[position], targets[position], prediction)
        if labelled:
            slot.model.learn_batch([rows[i] for i in labelled], [targets[i] for i in labelled])
            slot.learned += len(labelled)
            self._on_learned(len(labelled))
        slot.next_offsets[self.settings.features_topic] = offsets[-1] + 1

    def _challenge(self, state: PartitionState, run: ScoredRun, offsets: list[int],
                   rows: list[Features], targets: list[Any]) -> None:
        """Have the challengers predict and learn the run the champion just did, measure every
        model on its own predictions and, every ``promotion.over`` evaluated records, judge
        them: at the end of the run, so a swap falls between two batches."""
        challenge = state.challenge
        slot = self.slot(state.partition, "")
        assert challenge is not None and slot.challengers is not None
        fresh_rows, fresh_targets = rows[run.first:], targets[run.first:]
        self._measure(challenge, slot.name, fresh_targets, run.predictions)
        for name, challenger in slot.challengers.items():
            predictions, errors = self._follow(challenger, fresh_rows, fresh_targets)
            self._measure(challenge, name, fresh_targets, predictions)
            if errors:
                position, error = next(iter(errors.items()))
                log.warning("partition %d: challenger %s could not take %d records of this "
                            "batch, the first at offset %d: %s: %s", state.partition, name,
                            len(errors), offsets[run.first + position], type(error).__name__,
                            error)
        rule = self.settings.promotion
        if rule is None:
            return
        challenge.since_evaluation += len(fresh_targets) - fresh_targets.count(None)
        if challenge.since_evaluation >= rule.over:
            challenge.since_evaluation = 0
            self._judge(state, slot, rule, offsets[-1] + 1)

    @staticmethod
    def _measure(challenge: Challenge, name: str, targets: list[Any],
                 predictions: PredictionColumns) -> None:
        for metric in challenge.metrics[name]:
            metric.update_many(targets, predictions)
        if name in challenge.judged:
            challenge.judged[name].update_many(targets, predictions)

    def _follow(self, challenger: ModelSlot, rows: list[Features],
                targets: list[Any]) -> tuple[PredictionColumns, dict[int, BaseException]]:
        """A challenger predicts and learns ``rows`` as the champion does: record by record
        (a mini-batch at once with ``mini_batch``), learning the records that have a target."""
        model, task = challenger.model, self.settings.task
        unsupervised = task in ("anomaly", "clustering")
        errors: dict[int, BaseException] = {}
        if self.settings.mini_batch:
            predictions = PredictionColumns.for_task(task)
            labelled = [i for i, target in enumerate(targets) if target is not None]
            try:
                for prediction in model.predict_batch(rows):
                    predictions.append(prediction)
                if labelled:
                    model.learn_batch([rows[i] for i in labelled], [targets[i] for i in labelled])
            except Exception as exc:  # the challenger misses the batch; the champion goes on
                predictions = PredictionColumns.for_task(task)
                for _row in rows:
                    predictions.append(None)
                return predictions, dict.fromkeys(range(len(rows)), exc)
            challenger.learned += len(labelled)
            return predictions, errors
        if unsupervised or None not in targets:
            predictions, errors = model.progressive(rows, targets)
            challenger.learned += len(rows) - len(errors)
            return predictions, errors
        predictions = PredictionColumns.for_task(task)
        for position, (row, target) in enumerate(zip(rows, targets, strict=True)):
            prediction: Prediction | None
            try:
                prediction = model.predict(row)
                if target is not None:
                    model.learn(row, target)
                    challenger.learned += 1
            except Exception as exc:
                prediction = None
                errors[position] = exc
            predictions.append(prediction)
        return predictions, errors

    def _judge(self, state: PartitionState, slot: ModelSlot, rule: PromotionRule,
               next_offset: int) -> None:
        """One evaluation: each challenger whose promotion metric beats the champion's by
        ``rule.by`` (in the metric's direction) wins it; the best of those that won
        ``rule.evaluations`` in a row becomes the champion from ``next_offset`` on."""
        challenge = state.challenge
        assert challenge is not None and slot.challengers is not None
        values = {name: tracked.rolling_value() for name, tracked in challenge.judged.items()}
        sign = 1.0 if challenge.judged[slot.name].cumulative.bigger_is_better else -1.0
        best: str | None = None
        for name in slot.challengers:
            margin = sign * (values[name] - values[slot.name])
            won = margin > 0 and margin >= rule.by  # False for NaN
            challenge.streaks[name] = challenge.streaks.get(name, 0) + 1 if won else 0
            if challenge.streaks[name] >= rule.evaluations and (
                    best is None or sign * values[name] > sign * values[best]):
                best = name
        if best is None:
            return
        promoted = slot.challengers.pop(best)
        demoted = ModelSlot(slot.model, learned=slot.learned, name=slot.name)
        slot.model, slot.learned, slot.name = promoted.model, promoted.learned, best
        slot.challengers[demoted.name] = demoted
        challenge.streaks = dict.fromkeys(slot.challengers, 0)
        challenge.promotions += 1
        self._on_promoted(Promotion(state.partition, next_offset, best, demoted.name, rule.metric,
                                    values[best], values[demoted.name], slot.learned))

    def _wait_for_label(self, state: PartitionState, key: bytes | None, features: Features,
                        prediction: Prediction, model_key: str) -> None:
        if key is None:
            raise ValueError("delayed labels join on the record key, and this record has none")
        if state.waiting.pop(key, None) is not None:
            self._on_expired(1)  # superseded by newer features for the same key
        state.waiting[key] = Waiting(
            features, prediction, model_key, time.time() + self.settings.labels_ttl_s
        )
        while len(state.waiting) > self.settings.max_waiting:
            state.waiting.popitem(last=False)
            self._on_expired(1)

    def expire(self, now: float | None = None) -> None:
        """Drop waiting features whose label did not come within the TTL."""
        now = time.time() if now is None else now
        for state in self.states.values():
            expired = 0
            while state.waiting:
                key, waiting = next(iter(state.waiting.items()))
                if waiting.expires_at > now:
                    break
                del state.waiting[key]
                expired += 1
            if expired:
                self._on_expired(expired)

    def label(
        self, partition: int, offset: int, key: bytes | None, target: Any
    ) -> BaseException | None:
        """A label arrived: evaluate the prediction made earlier and learn from it. Returns the
        error that evaluating or learning raised, for the label's dead letter."""
        state = self.states[partition]
        topic = self.settings.labels_topic
        assert topic is not None
        if offset < state.next_offsets.get(topic, 0):
            return None
        state.next_offsets[topic] = offset + 1
        state.records_since_checkpoint += 1
        waiting = state.waiting.pop(key, None) if key is not None else None
        if waiting is None or target is None:
            self._on_unmatched()
            return None
        slot = self.slot(partition, waiting.model_key)
        try:
            self._evaluate(state, slot, waiting.model_key, offset, target, waiting.prediction)
            if self._learn(slot, topic, offset, waiting.features, target):
                self._on_learned(1)
        except Exception as exc:  # the label goes to the dead letters; the stage goes on
            return exc
        return None

    def due_for_checkpoint(self, every_records: int) -> bool:
        return any(s.records_since_checkpoint >= every_records for s in self.states.values())
