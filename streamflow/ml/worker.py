"""A model stage's engine in a process of its own, so that learning gets a core to itself: the
stage's side of it, and the messages they exchange.

River learns in pure Python and holds the GIL while it does: in the stage's thread, Kafka I/O,
JSON and the model would take turns on one core. So the stage thread keeps Kafka and JSON, and
the :class:`~streamflow.ml.engine.ModelEngine` lives in a child process
(:mod:`streamflow.ml.host`) that takes requests over a pipe, in order. Batch requests are
pipelined (the stage decodes batch N+1 and produces the output of batch N-1 while the engine
learns batch N); every other call waits for its reply. Replies come back in request order, each
with the side effects (counts, drift events, log lines) of its request.

Only the worker imports river (and with it scipy, and pandas in mini-batch mode): this module and
the messages are plain data, so the stage's process stays without them. What only river can tell
of the spec (the task, the default metrics, the model's label) is the worker's first message, a
:class:`Started` (see :meth:`EngineWorker.started`); an estimator, metric or detector the spec
names that river does not have makes it a :class:`~streamflow.ml.errors.ModelSpecError`.

The child exits when the stage closes it; on Linux the kernel kills it when the stage's thread
ends (a SIGKILL of the stage's process included), elsewhere it exits when its pipe breaks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from streamflow.ml.checkpoint import Staged
from streamflow.ml.errors import ModelSpecError
from streamflow.ml.model import PredictionColumns
from streamflow.ml.settings import DriftEvent, EngineSettings, Promotion
from streamflow.plugins import TransientError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 30.0
_SEND_BUFFER_BYTES = 16 << 20


class ModelWorkerError(RuntimeError):
    """A request failed in the model worker process."""


class ModelWorkerExited(ModelWorkerError, TransientError):
    """The model worker process is gone (killed, out of memory): the supervisor restarts the
    stage, whose new worker resumes from the last checkpoint."""


class ModelRecordError(Exception):
    """A record's prediction or learning failed in the worker; subclasses carry the original
    error's class name, which the dead-letter headers report."""


@cache
def record_error_type(name: str) -> type[ModelRecordError]:
    """A :class:`ModelRecordError` subclass named like the worker's original error class."""
    return type(name, (ModelRecordError,), {})


@dataclass(frozen=True)
class EngineSpec:
    """Everything the worker needs to build the engine (picklable)."""

    settings: EngineSettings
    estimator: list[dict[str, dict[str, Any] | None]] | str
    checkpoint_root: str
    pipeline: str
    stage: str
    checkpoint_every_records: int
    keep_versions: int = 0  # registry versions kept; 0: checkpoints are not kept as versions
    config_hash: str = ""  # of the pipeline config, recorded in each version
    challengers: dict[str, list[dict[str, dict[str, Any] | None]] | str] = field(
        default_factory=dict)  # estimators by name, as settings.challengers orders them


@dataclass
class Effects:
    """What the engine did besides answering a request, for the stage's metrics and logs."""

    learned: int = 0
    evicted: int = 0
    expired: int = 0
    unmatched: int = 0
    drift: list[DriftEvent] = field(default_factory=list)
    logs: list[tuple[str, int, str]] = field(default_factory=list)  # logger, level, message
    rollbacks: list[int] = field(default_factory=list)  # per partition adopting one: its version
    promotions: list[Promotion] = field(default_factory=list)

    def take(self) -> Effects:
        """These effects, and start afresh."""
        taken = Effects(self.learned, self.evicted, self.expired, self.unmatched, self.drift,
                        self.logs, self.rollbacks, self.promotions)
        self.learned = self.evicted = self.expired = self.unmatched = 0
        self.drift, self.logs, self.rollbacks, self.promotions = [], [], [], []
        return taken


@dataclass
class BatchRequest:
    """One consumed micro-batch: features records to score, label records to learn from.

    Features come as a pickle of one dict per record (see :mod:`streamflow.ml.features`: the
    worker's unpickling builds the dicts faster than it could from columns) with, per row, its
    partition, offset and, as needed, target, record key (delayed labels join on it) and model
    key (keyed models).
    Labels come as (consumed-batch row, partition, offset, record key, label).
    """

    features: bytes | pa.Table | None = None  # a table is pickled when sent: EngineWorker.submit
    partitions: np.ndarray | None = None
    offsets: np.ndarray | None = None
    targets: list[Any] | None = None
    keys: list[bytes | None] | None = None
    model_keys: list[str] | None = None
    labels: list[tuple[int, int, int, bytes | None, Any]] = field(default_factory=list)
    metric_values: bool = False


MetricValue = tuple[int, str, float, float]  # partition, metric, cumulative, rolling
Standings = dict[int, dict[str, dict[str, Any]]]  # partition → ModelEngine.standings


@dataclass
class BatchReply:
    """Per scored features row (by position in the request): the prediction and the model
    version, as columns (one object per record would be slow to pickle). Failed rows come as
    (row, error class, message); rows handled before a restart are absent. Failed labels come
    as (consumed-batch row, error class, message)."""

    rows: list[int] = field(default_factory=list)
    predictions: PredictionColumns = field(default_factory=PredictionColumns)
    versions: list[int] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    label_errors: list[tuple[int, str, str]] = field(default_factory=list)
    metric_values: list[MetricValue] | None = None
    standings: Standings | None = None  # with metric_values, of partitions with challengers
    checkpoint_due: bool = False


@dataclass
class Checkpointed:
    """A checkpoint's reply: its files, staged; the offsets they cover, to commit once the files
    are in place; and the metric values."""

    committable: dict[tuple[str, int], int]
    metric_values: list[MetricValue]
    staged: list[Staged]
    standings: Standings = field(default_factory=dict)


@dataclass(frozen=True)
class Started:
    """The worker's reply to ``start``: what the stage's process cannot tell without river."""

    task: str  # regression, classification, anomaly or clustering
    metrics: list[str]  # the metrics the engine tracks
    label: str  # the estimator's label in metrics, e.g. StandardScaler|LinearRegression


class EngineWorker:
    """The stage's side of the worker: requests go out in order and replies come back in order.

    The worker's first message, before any reply, tells how building its engine went (see
    :meth:`started`). ``on_effects`` is called with each reply's :class:`Effects` before the
    reply is returned.
    """

    def __init__(self, spec: EngineSpec, name: str, on_effects: Callable[[Effects], None]) -> None:
        # A fresh interpreter, not fork (which would copy librdkafka's threads' locks) nor
        # multiprocessing's spawn (which would import the caller's __main__ script again).
        ours, theirs = socket.socketpair()
        # Room for whole requests where the system allows it (net.core.wmem_max): the stage's
        # send then returns at once, instead of trading wake-ups with the worker as it reads.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        self.name = name
        self._process = subprocess.Popen(
            [sys.executable, "-m", "streamflow.ml", str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self._connection = Connection(ours.detach())
        self._connection.send((spec, sys.path, logging.getLogger().getEffectiveLevel()))
        self._on_effects = on_effects
        self._started: tuple[str, Any] | None = None  # the worker's first message
        self.pending = 0  # requests sent whose reply was not received yet
        self._arrived: deque[Any] = deque()  # of those, replies read off the connection

    @property
    def pid(self) -> int:
        return self._process.pid

    def started(self) -> Started:
        """What the worker tells of its engine once built (waiting for that); raises
        :class:`ModelSpecError` if the spec names what river does not have, else
        :class:`ModelWorkerError` if the engine could not be built."""
        if self._started is None:
            try:
                self._started = self._connection.recv()
            except (EOFError, OSError) as exc:
                raise self._exited() from exc
        status, payload = self._started
        if status == "spec_error":
            raise ModelSpecError(payload)
        if status == "error":
            raise ModelWorkerError(f"model worker: {payload}")
        return payload

    def submit(self, method: str, *args: Any) -> None:
        """Send a request; its reply comes from a later :meth:`receive`. A batch request's
        feature table is sent as the pickle of its rows (:mod:`streamflow.ml.features`). The
        first request waits for the engine to be built (:meth:`started`)."""
        self.started()
        if method == "handle" and args[0].features is not None and not isinstance(
                args[0].features, bytes):
            from streamflow.ml.features import pickled_feature_rows  # pyarrow: not in the worker

            args = (replace(args[0], features=pickled_feature_rows(args[0].features)),)
        try:
            self._connection.send((method, args))
        except OSError as exc:
            raise self._exited() from exc
        self.pending += 1

    def ready(self) -> bool:
        """Whether the oldest pending reply has arrived."""
        return self.pending > 0 and (bool(self._arrived) or self._connection.poll())

    def unanswered(self) -> int:
        """How many requests sent the worker has not answered yet (its work queue)."""
        with contextlib.suppress(EOFError, OSError):  # an exit is raised by receive
            while self.pending > len(self._arrived) and self._connection.poll():
                self._arrived.append(self._connection.recv())
        return self.pending - len(self._arrived)

    def receive(self) -> Any:
        """The oldest pending reply (waiting for it); raises :class:`ModelWorkerError` if the
        request failed in the worker."""
        try:
            status, payload, effects = (
                self._arrived.popleft() if self._arrived else self._connection.recv())
        except (EOFError, OSError) as exc:
            raise self._exited() from exc
        self.pending -= 1
        self._on_effects(effects)
        if status == "error":
            raise ModelWorkerError(f"model worker: {payload}")
        return payload

    def call(self, method: str, *args: Any) -> Any:
        """Send a request and wait for its reply; nothing may be pending."""
        if self.pending:
            raise RuntimeError("receive the pending replies before a call")
        self.submit(method, *args)
        return self.receive()

    def _exited(self) -> ModelWorkerExited:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(1)
        return ModelWorkerExited(
            f"the model worker process exited (exit code {self._process.returncode})"
        )

    def close(self) -> None:
        """Stop the worker (it has nothing to save: checkpoints are explicit calls)."""
        if self._process.poll() is None:
            with contextlib.suppress(OSError):  # it is exiting already
                self._connection.send(("close", ()))
            try:
                self._process.wait(_CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("model worker %s did not stop: killing it", self.name)
                self._process.kill()
                self._process.wait()
        self._connection.close()
