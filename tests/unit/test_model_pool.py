"""A model stage's engine over two worker processes (streamflow.ml.pool): partitions spread over
them, each one's predictions those of a single worker, one registry version per checkpoint."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from streamflow.ml.checkpoint import publish
from streamflow.ml.pool import EngineWorkers
from streamflow.ml.registry import Registry
from streamflow.ml.worker import BatchReply, BatchRequest, EngineSpec, EngineWorker
from tests.estimators import Slow
from tests.model_versions import TOPIC, settings

PARTITIONS = 4


def spec(root: Path) -> EngineSpec:
    return EngineSpec(settings(), [{"preprocessing.StandardScaler": {}},
                                   {"linear_model.LinearRegression": {}}],
                      str(root), "p", "model", 10_000, keep_versions=5, config_hash="c0ffee")


def request(first: int, count: int, bad: int | None = None) -> BatchRequest:
    """Rows ``first`` .. ``first + count`` round-robin over the partitions (each partition's
    offsets rising); y = 3x + partition; the row ``bad`` has a target river cannot learn."""
    rows = np.arange(first, first + count)
    partitions = rows % PARTITIONS
    x = (rows * 7 % 13).astype(float)
    targets: list[object] = (3 * x + partitions).tolist()
    if bad is not None:
        targets[bad] = "not a number"
    return BatchRequest(features=pa.table({"x": x}), partitions=partitions,
                        offsets=rows // PARTITIONS, targets=targets, metric_values=True)


def start(worker: EngineWorker | EngineWorkers) -> None:
    worker.call("start", None)
    worker.call("assign", list(range(PARTITIONS)))


def run(worker: EngineWorker | EngineWorkers, batches: list[BatchRequest]) -> list[BatchReply]:
    """The requests sent ahead of their replies, as the stage pipelines them."""
    for batch in batches:
        worker.submit("handle", batch)
    return [worker.receive() for _ in batches]


def checkpoint(worker: EngineWorker | EngineWorkers) -> list[int]:
    worker.submit("checkpoint")
    return publish(worker.receive().staged)


def batches() -> list[BatchRequest]:
    return [request(0, 40), request(40, 37, bad=5), request(80, 48)]


def by_row(reply: BatchReply) -> dict[int, tuple[object, int]]:
    return {row: (value, version) for row, value, version in
            zip(reply.rows, reply.predictions.values, reply.versions, strict=True)}


def without(batch: BatchRequest, partition: int) -> BatchRequest:
    keep = np.flatnonzero(batch.partitions != partition)
    assert isinstance(batch.features, pa.Table) and batch.targets is not None
    return BatchRequest(features=batch.features.take(pa.array(keep)),
                        partitions=batch.partitions[keep], offsets=batch.offsets[keep],
                        targets=[batch.targets[i] for i in keep.tolist()])


def test_two_workers_predict_as_one_and_checkpoint_one_version(tmp_path: Path) -> None:
    single = EngineWorker(spec(tmp_path / "one"), "one", lambda effects: None)
    learned: list[int] = []
    pool = EngineWorkers(spec(tmp_path / "two"), "two", lambda e: learned.append(e.learned), 2)
    try:
        start(single)
        start(pool)
        assert len(set(pool.pids)) == 2
        for one, two in zip(run(single, batches()), run(pool, batches()), strict=True):
            assert by_row(two) == by_row(one)  # the same rows, predictions and versions
            assert sorted(two.errors) == sorted(one.errors)
            assert sorted(two.metric_values or []) == sorted(one.metric_values or [])
        assert sum(learned) == 40 + 37 + 48 - 1  # the bad target is an error, not learned

        assert checkpoint(single) == [1]
        assert checkpoint(pool) == [1]  # one version, not one per worker
        version = Registry.of_stage(tmp_path / "two", "p", "model").version(1)
        assert sorted(version.metadata["partitions"]) == [f"{TOPIC}+{p}" for p in range(PARTITIONS)]
        assert version.records_learned == 124

        # partition 0 leaves and comes back (to the worker with fewer partitions), restored
        # from the version; partition 2 stays away
        for worker in (single, pool):
            worker.call("revoke", [0, 2])
            worker.call("assign", [0])
        later = [without(request(128, 40), 2), without(request(168, 40), 2)]
        for one, two in zip(run(single, later), run(pool, later), strict=True):
            assert by_row(two) == by_row(one) and len(two.rows) == 30
    finally:
        single.close()
        pool.close()


def records_of(partition: int, offsets: list[int]) -> BatchRequest:
    """Records of one partition at ``offsets``, with x = 1 and y = 3."""
    count = len(offsets)
    return BatchRequest(features=pa.table({"x": [1.0] * count}),
                        partitions=np.full(count, partition), offsets=np.asarray(offsets),
                        targets=[3.0] * count)


def test_saturated_once_every_worker_holding_partitions_has_a_request_queued(
        tmp_path: Path) -> None:
    """The stage reads ahead while a worker has nothing queued: saturated() tells when not to."""
    slow = replace(spec(tmp_path), estimator="tests.estimators:slow")  # 0.3 s a record learned
    pool = EngineWorkers(slow, "slow", lambda effects: None, 2)
    try:
        start(pool)  # worker 0 holds partitions 0 and 2, worker 1 holds 1 and 3
        pool.submit("handle", records_of(1, [0]))
        pool.submit("handle", records_of(1, [1]))
        assert not pool.saturated()  # worker 0 has nothing to do
        pool.submit("handle", records_of(0, [0]))
        assert not pool.saturated()  # nor anything queued behind this one
        pool.submit("handle", records_of(0, [1, 2]))
        assert pool.saturated()
        replies = [pool.receive() for _ in range(4)]
        assert [reply.rows for reply in replies] == [[0], [0], [0], [0, 1]]
        assert not pool.saturated()

        # answered requests are not queued work, though their replies are not received yet
        pool.submit("handle", records_of(1, [2, 3]))
        pool.submit("handle", records_of(1, [4]))
        pool.submit("handle", records_of(0, [3]))
        pool.submit("handle", records_of(0, [4]))
        time.sleep(6 * Slow.LEARN_S)
        assert not pool.saturated()
        assert [pool.receive().rows for _ in range(4)] == [[0, 1], [0], [0], [0]]
    finally:
        pool.close()
