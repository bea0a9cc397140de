"""The model worker process: the :class:`~streamflow.ml.engine.ModelEngine` serving the requests
of a stage's :class:`~streamflow.ml.worker.EngineWorker` (``python -m streamflow.ml FD``). This is
where river is imported; the stage's process never imports this module.

The worker ignores SIGINT and SIGTERM, since its stage checkpoints through it on the way out.

Checkpoints are pickled and written by a forked child of the worker, which sees the state as it
was when forked, while the worker learns on. Pickling never touches the worker's own objects:
on CPython 3.11 that would leave every object of the model with a materialized ``__dict__``,
and learning about 9% slower from the first checkpoint on. The files are staged (written under
temporary names); the stage puts them in place once it has produced the output of every record
they cover, and only then commits their offsets, so no record's output is skipped after a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from streamflow import __version__
from streamflow.ml.checkpoint import CheckpointError, CheckpointStore, Snapshot, Staged
from streamflow.ml.engine import ModelEngine
from streamflow.ml.errors import ModelSpecError
from streamflow.ml.model import Features, RiverModel
from streamflow.ml.registry import (
    Registry,
    RegistryError,
    RollbackRequest,
    open_version,
    prepare_version,
)
from streamflow.ml.settings import DriftEvent, EngineSettings, Promotion
from streamflow.ml.spec import (
    DEFAULT_METRICS,
    build_detector,
    build_estimator,
    build_metric,
    infer_task,
    model_label,
)
from streamflow.ml.worker import (
    BatchReply,
    BatchRequest,
    Checkpointed,
    Effects,
    EngineSpec,
    MetricValue,
    ModelWorkerError,
    Standings,
    Started,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
ROLLBACK_CHECK_S = 1.0  # how often the worker looks for a rollback request between batches


@dataclass
class Durable:
    """A checkpoint's reply, to be sent once ``snapshots`` are written to its staged files."""

    reply: Checkpointed
    snapshots: list[Snapshot]


class EngineHost:
    """The worker's side: the engine and the requests it serves."""

    def __init__(self, spec: EngineSpec, effects: Effects) -> None:
        estimator = build_estimator(spec.estimator)
        settings = self.resolved(spec.settings, estimator)
        task = settings.task
        self.started = Started(task, settings.metrics, model_label(estimator))
        self.every_records = spec.checkpoint_every_records
        self.keep_versions = spec.keep_versions
        self.config_hash = spec.config_hash
        self.checkpoints = 0  # taken so far: they number their staged files
        self.effects = effects
        self.registry = Registry.of_stage(spec.checkpoint_root, spec.pipeline, spec.stage)
        self._rollback_check_at = 0.0
        self._request_error: str | None = None  # the last one logged
        self._rollbacks_passed: set[tuple[str, int]] = set()  # (request, partition) not adopted

        def learned(count: int) -> None:
            effects.learned += count

        def evicted() -> None:
            effects.evicted += 1

        def expired(count: int) -> None:
            effects.expired += count

        def unmatched() -> None:
            effects.unmatched += 1

        def drifted(event: DriftEvent) -> None:
            effects.drift.append(event)  # not a bound append: take() replaces the list

        def promoted(event: Promotion) -> None:
            effects.promotions.append(event)
            state = self.engine.states[event.partition]  # a version at the swap
            state.records_since_checkpoint = max(state.records_since_checkpoint,
                                                 self.every_records)

        challengers = {name: build_estimator(estimator)
                       for name, estimator in spec.challengers.items()}
        self.engine = ModelEngine(
            settings,
            lambda: RiverModel(estimator.clone(), task),
            CheckpointStore(spec.checkpoint_root, spec.pipeline, spec.stage),
            on_learned=learned,
            on_drift=drifted,
            on_evicted=evicted,
            on_expired=expired,
            on_unmatched=unmatched,
            new_challengers={
                name: lambda challenger=challenger: RiverModel(challenger.clone(), task)
                for name, challenger in challengers.items()},
            on_promoted=promoted,
        )
        self.engine.registry_metadata = {
            "pipeline": spec.pipeline, "stage": spec.stage, "config_hash": spec.config_hash,
            "river_version": importlib.metadata.version("river"),
            "streamflow_version": __version__,
        }

    @staticmethod
    def resolved(settings: EngineSettings, estimator: Any) -> EngineSettings:
        """``settings`` with their task (unless set, ``estimator``'s) and metrics (unless set,
        the task's defaults). Each metric and the drift detector are built once (and dropped),
        so that one river does not have fails the engine's build, which the stage hears before
        any request (:meth:`EngineWorker.started`), rather than a partition's assignment."""
        task = settings.task or infer_task(estimator)
        metrics = DEFAULT_METRICS[task] if settings.metrics is None else settings.metrics
        for name in [*metrics, *([settings.promotion.metric] if settings.promotion else [])]:
            build_metric(name)
        if settings.drift_detector:
            build_detector(settings.drift_detector)
        return replace(settings, task=task, metrics=metrics)

    def start(self, cluster_id: str | None) -> None:
        self.engine.cluster_id = cluster_id

    def assign(self, partitions: list[int]) -> dict[int, int]:
        """Restore ``partitions``; the next features offset each restored state covers."""
        topic = self.engine.settings.features_topic
        for partition in partitions:
            if partition not in self.engine.states:
                self.engine.assign(partition)
        self.adopt_requested(force=True)  # a rollback requested while the pipeline was stopped
        return {partition: self.engine.states[partition].next_offsets.get(topic, 0)
                for partition in partitions}

    def revoke(self, partitions: list[int]) -> None:
        for partition in partitions:
            self.engine.revoke(partition)

    def checkpoint(self, versioned: bool | None = None) -> Durable:
        """Snapshot every partition; once written, the offsets that may be committed, and the
        metric values. ``versioned`` says whether the snapshots make a registry version (the
        stage decides for all its workers: see streamflow.ml.pool); by default, whether
        anything changed."""
        self.adopt_requested()
        # a registry version only when something changed: an idle stage checkpoints every
        # every_seconds, and its versions would push the others out
        if versioned is None:
            versioned = any(state.records_since_checkpoint
                            for state in self.engine.states.values())
        snapshots = self.engine.snapshots()
        self.checkpoints += 1
        keep = self.keep_versions if versioned else 0
        staged = [snapshot.staged(self.checkpoints, keep) for snapshot in snapshots]
        self.engine.version_links = None
        if keep and any(snapshot.evicted for snapshot in snapshots):
            # the forked child links the evicted models' files; one the worker replaces
            # meanwhile is linked by the worker first (ModelEngine.version_links)
            directory = staged[0].version
            assert directory is not None
            open_version(directory)
            self.engine.version_links = (directory, {
                partition: snapshot.evicted
                for partition, snapshot in zip(self.engine.states, snapshots, strict=True)})
        return Durable(Checkpointed(self.engine.committable(), self.metric_values(), staged,
                                    self.standings()), snapshots)

    def metric_values(self) -> list[MetricValue]:
        return [
            (partition, metric.name, float(metric.cumulative.get()), metric.rolling_value())
            for partition, state in self.engine.states.items()
            for metric in state.metrics
        ]

    def standings(self) -> Standings:
        """The standings of each partition with challengers."""
        if not self.engine.settings.challengers:
            return {}
        return {partition: standings for partition in self.engine.states
                if (standings := self.engine.standings(partition))}

    def adopt_requested(self, force: bool = False) -> None:
        """Have each partition adopt the version of a rollback request it has not adopted yet
        (looked for at most every :data:`ROLLBACK_CHECK_S` unless ``force``)."""
        now = time.monotonic()
        if not force and now < self._rollback_check_at:
            return
        self._rollback_check_at = now + ROLLBACK_CHECK_S
        try:
            request = self.registry.rollback_request()
        except (RegistryError, CheckpointError, OSError) as exc:
            if str(exc) != self._request_error:  # once, not every second
                log.error("cannot read the rollback request: %s", exc)
            self._request_error = str(exc)
            return
        self._request_error = None
        if request is None:
            return
        for partition, state in list(self.engine.states.items()):
            adopted = state.rollback is not None and state.rollback.get("id") == request.id
            if not adopted and (request.id, partition) not in self._rollbacks_passed:
                self._adopt(partition, request)

    def _adopt(self, partition: int, request: RollbackRequest) -> None:
        current = self.engine.states[partition]
        name = self.engine._state_name(partition)
        try:
            loaded = self.registry.load_state(request.version, name)
            evicted = self.registry.evicted_models(request.version, name)
        except Exception as exc:  # refused, gone, or not unpicklable here: the model stays
            self._rollbacks_passed.add((request.id, partition))
            log.error("rollback of partition %d to version %d failed: %s: %s", partition,
                      request.version, type(exc).__name__, exc)
            return
        if loaded is None:
            self._rollbacks_passed.add((request.id, partition))
            log.warning("rollback to version %d: it holds no state of partition %d, which keeps "
                        "its model", request.version, partition)
            return
        header, (state, models) = loaded
        in_memory = {key: slot.learned for (p, key), slot in self.engine.slots.items()
                     if p == partition}
        learned_before = sum({**current.stored, **in_memory}.values())
        newest = self.registry.latest()
        self.engine.adopt(partition, state, models, {
            "id": request.id, "version": request.version, "adopted_at": time.time(),
            "at_offsets": dict(current.next_offsets), "learned_before": learned_before,
            "from_version": newest.number if newest else None,
        }, evicted)
        state.records_since_checkpoint = max(state.records_since_checkpoint, self.every_records)
        self.effects.rollbacks.append(request.version)
        log.warning("partition %d rolled back to version %d at offsets %s: its model had learned "
                    "%d records, version %d's %d%s", partition, request.version,
                    current.next_offsets, learned_before, request.version,
                    header.get("records_learned", 0),
                    "" if header.get("registry", {}).get("config_hash") in (None, self.config_hash)
                    else " (that version was taken with another pipeline config)")

    def handle(self, request: BatchRequest) -> BatchReply:
        self.adopt_requested()
        reply = BatchReply()
        if request.features is not None:
            self._score(request, reply)
        for row, partition, offset, key, label in request.labels:
            error = self.engine.label(partition, offset, key, label)
            if error is not None:
                reply.label_errors.append((row, type(error).__name__, str(error)))
        self.engine.expire()
        if request.metric_values:
            reply.metric_values = self.metric_values()
            reply.standings = self.standings()
        reply.checkpoint_due = self.engine.due_for_checkpoint(self.every_records)
        return reply

    def _score(self, request: BatchRequest, reply: BatchReply) -> None:
        assert request.features is not None and request.partitions is not None
        assert request.offsets is not None
        rows: list[Features] = pickle.loads(request.features)
        count = len(rows)
        offsets: list[int] = request.offsets.tolist()
        targets = request.targets or [None] * count
        keys = request.keys or [None] * count
        model_keys = request.model_keys or [""] * count
        partitions = np.unique(request.partitions)
        for partition in partitions:
            members = (np.arange(count) if len(partitions) == 1
                       else np.flatnonzero(request.partitions == partition)).tolist()

            def pick(values: list[Any], members: list[int] = members) -> list[Any]:
                return values if len(partitions) == 1 else [values[m] for m in members]

            run = self.engine.score(int(partition), pick(offsets), pick(keys), pick(rows),
                                    pick(targets), pick(model_keys))
            rows_scored, versions, predictions = members[run.first:], run.versions, run.predictions
            if run.errors:
                for position, error in run.errors.items():
                    reply.errors.append((members[position], type(error).__name__, str(error)))
                kept = [i for i in range(len(versions)) if run.first + i not in run.errors]
                rows_scored = [rows_scored[i] for i in kept]
                versions = [versions[i] for i in kept]
                predictions = predictions.take(kept)
            reply.rows += rows_scored
            reply.versions += versions
            reply.predictions.extend(predictions)


class _EffectsLogHandler(logging.Handler):
    """Keeps the worker's log lines for the stage's process to log."""

    def __init__(self, effects: Effects) -> None:
        super().__init__()
        self.effects = effects

    def emit(self, record: logging.LogRecord) -> None:
        self.effects.logs.append((record.name, record.levelno, record.getMessage()))


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when the thread that started it ends, so
    that a worker never outlives a stage killed with SIGKILL (elsewhere, it exits at EOF)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Replies:
    """Sends replies in request order. A checkpoint's reply is sent by a thread once a forked
    child has written the checkpoint's files (pickling and fsync take milliseconds), while the
    requests after it are served; their replies wait for it."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.writer: threading.Thread | None = None

    def send(self, reply: tuple[str, Any, Effects], durable: Durable | None) -> None:
        """Send ``reply``, once ``durable``'s snapshots (if any) are written."""
        self.wait()
        if durable is None or not durable.snapshots:
            self.connection.send(reply)
            return
        try:
            written = _write_in_child(durable.snapshots, durable.reply.staged)
        except Exception:
            self.connection.send(("error", traceback.format_exc(), reply[2]))
            return
        self.writer = threading.Thread(target=self._send_when_written, args=(reply, written),
                                       daemon=True)
        self.writer.start()

    def _send_when_written(self, reply: tuple[str, Any, Effects],
                           written: Callable[[], None]) -> None:
        try:
            written()
        except Exception:
            reply = ("error", traceback.format_exc(), reply[2])
        with contextlib.suppress(OSError):  # the stage is gone: the main thread exits at EOF
            self.connection.send(reply)

    def wait(self) -> None:
        """Until the reply of a checkpoint being written has been sent."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None


def _write_in_child(snapshots: list[Snapshot], staged: list[Staged]) -> Callable[[], None]:
    """Start writing ``snapshots`` to ``staged`` files from a forked child (in this process
    where fork is missing); returns a function that waits until they are written, and raises
    if writing failed."""
    if not hasattr(os, "fork"):
        for snapshot, file in zip(snapshots, staged, strict=True):
            snapshot.write_staged(file)
        if staged and staged[0].version is not None:
            prepare_version(snapshots, staged)
        return lambda: None
    errors, error_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only this thread runs here; write, report, and leave at once
        exit_code = 1
        try:
            os.close(errors)
            for snapshot, file in zip(snapshots, staged, strict=True):
                snapshot.write_staged(file)
            if staged and staged[0].version is not None:
                prepare_version(snapshots, staged)
            exit_code = 0
        except BaseException:
            os.write(error_end, traceback.format_exc().encode())
        finally:
            os._exit(exit_code)
    os.close(error_end)

    def written() -> None:
        with os.fdopen(errors, "rb") as pipe:
            error = pipe.read().decode(errors="replace")
        _pid, status = os.waitpid(pid, 0)
        if status:
            raise ModelWorkerError(f"writing the checkpoint failed (wait status {status}): "
                                   f"{error or 'no error reported'}")

    return written


def serve(connection: Connection) -> None:
    """The worker process: take the spec, then answer requests until told to close or until
    the pipe breaks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    spec, search_path, log_level = connection.recv()
    sys.path[:] = search_path  # to import the user's estimator factory as the stage would
    effects = Effects()
    root = logging.getLogger()
    root.addHandler(_EffectsLogHandler(effects))
    root.setLevel(log_level)
    host: EngineHost | None = None
    first: tuple[str, Any]  # how building the engine went (EngineWorker.started)
    try:
        host = EngineHost(spec, effects)
        first = ("started", host.started)
    except ModelSpecError as exc:  # the spec names what river does not have
        first = ("spec_error", str(exc))
    except Exception:
        first = ("error", f"the model engine could not be built:\n{traceback.format_exc()}")
    try:
        connection.send(first)
    except OSError:
        os._exit(0)  # the stage's process died while the engine was built (SIGKILL, say)
    gc.collect()  # then keep what exists now (modules, the engine) out of full collections,
    gc.freeze()  # which each batch's thousands of feature dicts would otherwise trigger
    replies = _Replies(connection)
    while True:
        try:
            method, args = connection.recv()
        except (EOFError, OSError):
            os._exit(0)  # the stage's process is gone: nothing left to do or to clean up
        if method == "close":
            replies.wait()
            gc.unfreeze()  # native extensions report objects never collected at exit as leaks
            return
        durable: Durable | None = None
        try:
            assert host is not None, "no request goes to a worker whose engine was not built"
            result = getattr(host, method)(*args)
            if isinstance(result, Durable):
                durable, result = result, result.reply
            reply = ("ok", result, effects.take())
        except Exception:
            reply = ("error", traceback.format_exc(), effects.take())
        replies.send(reply, durable)


