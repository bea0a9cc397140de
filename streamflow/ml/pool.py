"""A model stage's engine over several worker processes, one per core: each input partition is
learned by one worker, so partitions learn in parallel and each one's records still go through
one engine in offset order (its predictions are those of a single worker).

:class:`EngineWorkers` speaks :class:`~streamflow.ml.worker.EngineWorker`'s protocol. A batch
request is split by partition into one request per worker holding rows of it, and their replies
are merged back, in request order. A checkpoint goes to every worker; the registry version each
worker prepared is merged into one, so that a version holds every partition. The first worker
starts with the pool (its engine tells the stage what it runs: :meth:`EngineWorkers.started`),
the others as partitions are assigned to them (a one-partition stage runs one), and a new
partition goes to the worker holding the fewest.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from streamflow.ml.registry import merge_prepared
from streamflow.ml.worker import (
    BatchReply,
    BatchRequest,
    Checkpointed,
    Effects,
    EngineSpec,
    EngineWorker,
    Started,
)

Parts = list[tuple[int, np.ndarray | None]]  # (worker, its feature rows in the request)


class EngineWorkers:
    """Up to ``count`` engine workers sharing a stage's partitions."""

    def __init__(self, spec: EngineSpec, name: str, on_effects: Callable[[Effects], None],
                 count: int) -> None:
        self._spec, self._name, self._on_effects = spec, name, on_effects
        self._count = count
        self._workers: list[EngineWorker] = []
        self._owner: dict[int, int] = {}  # partition → worker
        self._pending: deque[tuple[str, Parts]] = deque()
        self._cluster_id: str | None = None
        self._handled = False  # records went to the workers since the last checkpoint
        self._add_worker()  # the first one at once: its engine tells what the stage runs

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    def started(self) -> Started:
        """What the first worker tells of its engine (see :meth:`EngineWorker.started`)."""
        return self._workers[0].started()

    def _add_worker(self) -> EngineWorker:
        worker = EngineWorker(self._spec, f"{self._name}-{len(self._workers)}", self._on_effects)
        self._workers.append(worker)
        return worker

    def _worker(self, index: int) -> EngineWorker:
        while len(self._workers) <= index:
            self._add_worker().call("start", self._cluster_id)
        return self._workers[index]

    def call(self, method: str, *args: Any) -> Any:
        """Send a request and wait for its reply; nothing may be pending."""
        if self._pending:
            raise RuntimeError("receive the pending replies before a call")
        if method == "start":
            self._cluster_id = args[0]
            return self._workers[0].call(method, *args)
        if method == "assign":
            restored: dict[int, int] = {}
            for index, partitions in self._spread(args[0]).items():
                restored.update(self._worker(index).call("assign", partitions))
            return restored
        if method == "revoke":
            owned: dict[int, list[int]] = {}
            for partition in args[0]:
                if partition in self._owner:
                    owned.setdefault(self._owner.pop(partition), []).append(partition)
            for index, partitions in owned.items():
                self._workers[index].call("revoke", partitions)
            return None
        self.submit(method, *args)
        return self.receive()

    def _spread(self, partitions: list[int]) -> dict[int, list[int]]:
        """Owners for ``partitions``: a new one to the worker holding the fewest (workers start
        only when there are partitions for them), one a worker holds to that worker."""
        loads = [0] * self._count
        for index in self._owner.values():
            loads[index] += 1
        spread: dict[int, list[int]] = {}
        for partition in partitions:
            if partition in self._owner:  # its worker has it already (and skips restoring it)
                spread.setdefault(self._owner[partition], []).append(partition)
                continue
            index = min(range(self._count), key=lambda i: (loads[i], i))
            loads[index] += 1
            self._owner[partition] = index
            spread.setdefault(index, []).append(partition)
        return spread

    def submit(self, method: str, *args: Any) -> None:
        """Send a request; its reply comes from a later :meth:`receive`."""
        if method == "handle":
            self._submit_batch(args[0])
        elif method == "checkpoint":
            # one registry version of all partitions: with several workers, each takes one if
            # any records came in (a lone worker decides by its own state's changes)
            everyone = list(range(len(self._workers)))
            versioned = self._handled if len(everyone) > 1 else None
            for index in everyone:
                self._workers[index].submit("checkpoint", versioned)
            self._pending.append(("checkpoint", [(index, None) for index in everyone]))
            self._handled = False
        else:
            raise ValueError(f"no pooled request {method!r}")

    def _submit_batch(self, request: BatchRequest) -> None:
        rows: dict[int, np.ndarray] = {}
        if request.partitions is not None:
            partitions, row_partition = np.unique(request.partitions, return_inverse=True)
            owners = np.asarray([self._owner.get(int(p), 0) for p in partitions],
                                dtype=np.int64)[row_partition]
            rows = {int(index): np.flatnonzero(owners == index) for index in np.unique(owners)}
        labels: dict[int, list[Any]] = {}
        for label in request.labels:  # a labels topic shares the features topic's partitioning
            labels.setdefault(self._owner.get(label[1], 0), []).append(label)
        involved = sorted({*rows, *labels} if not request.metric_values
                          else range(len(self._workers)))
        if len(involved) <= 1:  # the whole request to one worker
            index = involved[0] if involved else 0
            self._worker(index).submit("handle", request)
            self._pending.append(("handle", [(index, None)]))
        else:
            parts: Parts = []
            for index in involved:
                part = _part(request, rows.get(index), labels.get(index, []))
                self._worker(index).submit("handle", part)
                parts.append((index, rows.get(index)))
            self._pending.append(("handle", parts))
        self._handled = True

    def ready(self) -> bool:
        """Whether the oldest pending request's replies have all arrived."""
        if not self._pending:
            return False
        return all(self._workers[index].ready() for index, _rows in self._pending[0][1])

    def saturated(self) -> bool:
        """Whether every worker holding partitions has a request queued behind the one it is
        working on: reading further ahead would keep none of them from waiting."""
        holding = set(self._owner.values()) or {0}
        return all(self._workers[index].unanswered() >= 2 for index in holding
                   if index < len(self._workers))

    def receive(self) -> Any:
        """The oldest pending request's reply, merged from its workers' (waiting for them)."""
        method, parts = self._pending.popleft()
        replies = [self._workers[index].receive() for index, _rows in parts]
        if method == "checkpoint":
            return _merged_checkpoint(replies)
        if len(parts) == 1 and parts[0][1] is None:
            return replies[0]
        return _merged_batch(replies, [rows for _index, rows in parts])

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


def _part(request: BatchRequest, rows: np.ndarray | None, labels: list[Any]) -> BatchRequest:
    """The part of ``request`` with its feature ``rows`` (None: none) and ``labels``."""
    part = BatchRequest(labels=labels, metric_values=request.metric_values)
    if rows is None or request.features is None:
        return part
    assert request.partitions is not None and request.offsets is not None
    assert not isinstance(request.features, bytes), "a pooled request carries a feature table"
    part.features = request.features.take(pa.array(rows))
    part.partitions, part.offsets = request.partitions[rows], request.offsets[rows]

    def pick(values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [values[row] for row in rows.tolist()]

    part.targets, part.keys, part.model_keys = (pick(request.targets), pick(request.keys),
                                                pick(request.model_keys))
    return part


def _merged_batch(replies: list[BatchReply], rows: list[np.ndarray | None]) -> BatchReply:
    """One reply from the parts' replies, their feature rows numbered as in the whole request."""
    merged = BatchReply()
    for reply, part_rows in zip(replies, rows, strict=True):
        if part_rows is not None:
            merged.rows += part_rows[reply.rows].tolist()
            merged.errors += [(int(part_rows[row]), kind, message)
                              for row, kind, message in reply.errors]
        merged.versions += reply.versions
        merged.predictions.extend(reply.predictions)
        merged.label_errors += reply.label_errors
        if reply.metric_values is not None:
            merged.metric_values = (merged.metric_values or []) + reply.metric_values
        if reply.standings is not None:
            merged.standings = {**(merged.standings or {}), **reply.standings}
        merged.checkpoint_due |= reply.checkpoint_due
    return merged


def _merged_checkpoint(replies: list[Checkpointed]) -> Checkpointed:
    """One checkpoint from the workers': their files, offsets and values, and one registry
    version of them all."""
    staged = [file for reply in replies for file in reply.staged]
    versions = list(dict.fromkeys(file.version for file in staged if file.version is not None))
    if len(versions) > 1:
        version = merge_prepared(versions)
        staged = [dataclasses.replace(file, version=version) if file.version is not None else file
                  for file in staged]
    return Checkpointed(
        {offset: value for reply in replies for offset, value in reply.committable.items()},
        [value for reply in replies for value in reply.metric_values], staged,
        {partition: standing for reply in replies for partition, standing in reply.standings.items()})
