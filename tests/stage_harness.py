"""Broker-free stage tests on the in-memory transport: an input topic loaded with numbered
records, and clients that crash at a chosen step of the commit sequence.

A crash is the stage's process dying: from the injected point on, its clients do nothing more
(no abort, no close); the group evicts its consumer after the session timeout and the cluster
aborts its open transaction after the transaction timeout, both short with ``FAST_FAILURE``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from streamflow.runtime.stages import StageRunner
from streamflow.transport import (
    Admin,
    ConsumedBatch,
    Consumer,
    OutgoingBatch,
    Producer,
    Reader,
    RebalanceListener,
    TopicPartition,
    TopicSpec,
    Transport,
    read_until,
)
from streamflow.transport.memory import MemoryTransport, drop_cluster

COUNT = 400
PARTITIONS = 4
POISON = 25  # every 25th record, from the 7th, is not JSON: a dead letter
TIMEOUT_S = 60.0
# A crashed member is evicted, and its open transaction aborted, within seconds.
FAST_FAILURE = {"session.timeout.ms": "2000", "transaction.timeout.ms": "3000"}
GUARANTEES = [pytest.param(False, id="at_least_once"), pytest.param(True, id="exactly_once")]
PER_BATCH = 0.0  # exactly_once: a transaction per batch, so that crash points count batches


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def value(number: int) -> bytes:
    """Record ``number``: its id, an event time 100 ms after the one before, a feature ``x``
    and a target ``y`` (``2x + 1``); or, for every ``POISON``-th, a value that is not JSON."""
    if number % POISON == 7:
        return f"not json {number}".encode()
    x = number % 10
    return json.dumps({"id": number, "ts": number * 100, "x": x, "y": 2 * x + 1}).encode()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@dataclass
class World:
    """An in-memory cluster with an input topic loaded, an output and a dead-letter topic."""

    bootstrap: str
    pipeline: str
    loaded: int = 0

    input: str = "in"
    output: str = "out"
    dead_letters: str = "dlq"

    def transport(self, settings: Mapping[str, str] | None = None) -> MemoryTransport:
        return MemoryTransport(self.bootstrap, settings)

    @property
    def cluster(self) -> Any:
        return self.transport().cluster

    def load(self, count: int) -> None:
        """``count`` more input records, numbered on from the last ones."""
        numbers = range(self.loaded, self.loaded + count)
        producer = self.transport().producer()
        producer.produce([OutgoingBatch(self.input, [value(n) for n in numbers],
                                        [str(n).encode() for n in numbers])])
        producer.close()
        self.loaded += count

    def read(self, topic: str) -> list[bytes | None]:
        """Every record of ``topic`` a read_committed reader sees, once no transaction is open
        (a crashed stage's open transaction hides what follows it until it times out)."""
        return [v for batch in self.read_batches(topic) for v in batch.values]

    def read_batches(self, topic: str) -> list[ConsumedBatch]:
        wait_until(lambda: self.cluster.open_transaction_count() == 0, "open transactions")
        partitions = self.cluster.high_watermarks(topic)
        return list(read_until(self.transport(), dict.fromkeys(partitions), timeout_s=10))

    def output_ids(self) -> Counter[int]:
        return Counter(json.loads(v or b"")["id"] for v in self.read(self.output))

    def dead_letter_values(self) -> Counter[bytes | None]:
        return Counter(self.read(self.dead_letters))

    def valid(self) -> set[int]:
        return {n for n in range(self.loaded) if n % POISON != 7}

    def poison(self) -> set[bytes]:
        return {value(n) for n in range(self.loaded) if n % POISON == 7}

    def all_committed(self, group: str) -> bool:
        return self.cluster.committed_offsets(group) == self.cluster.high_watermarks(self.input)

    def places(self) -> dict[int, tuple[int, int]]:
        """Input record number → (partition, offset)."""
        found = {}
        for batch in self.read_batches(self.input):
            for partition, offset, key in zip(batch.partitions, batch.offsets, batch.keys,
                                              strict=True):
                found[int(key or b"")] = (partition, offset)
        return found


def new_world(prefix: str, topics: Sequence[TopicSpec] = ()) -> Iterator[World]:
    """A fixture's body: a fresh cluster with the input (``COUNT`` records), output and
    dead-letter topics and ``topics``, dropped afterwards."""
    created = World(f"memory://{unique(prefix)}", unique("p"))
    admin = created.transport().admin()
    admin.create_topics([TopicSpec(created.input, PARTITIONS), TopicSpec(created.output, PARTITIONS),
                         TopicSpec(created.dead_letters), *topics])
    created.load(COUNT)
    yield created
    drop_cluster(created.bootstrap)


# --- Crash injection: clients that count the steps of the commit sequence ---------------------


class Crash(Exception):
    """The injected crash: the stage's process is gone from here on."""


class Injector:
    """Counts client calls by step ("produce", "begin_transaction", "send_offsets",
    "commit_transaction", "commit", "write", ...) and crashes before (or, with ``after``, right
    after) the ``at``-th call of ``step``; from then on every call raises :class:`Crash` and
    nothing more reaches the cluster. ``hook`` runs before that call instead of a crash.

    A produce whose records all go to a topic of ``topics`` counts as the step it names there
    (a window stage's changelog: "snapshot"), any other as "produce". Each reader opened is
    kept in ``readers`` (its start offsets)."""

    def __init__(self, step: str | None = None, at: int = 1, after: bool = False,
                 hook: Callable[[], None] | None = None,
                 topics: Mapping[str, str] | None = None) -> None:
        self.step, self.at, self.after, self.hook = step, at, after, hook
        self.topics = dict(topics or {})
        self.calls: Counter[str] = Counter()
        self.crashed_at: str | None = None
        # Each commit of the consumer: its partitions, and those the member had then.
        self.commits: list[tuple[set[TopicPartition], set[TopicPartition]]] = []
        self.readers: list[dict[TopicPartition, int | None]] = []
        self._lock = threading.Lock()

    def produce_step(self, batches: Sequence[OutgoingBatch]) -> str:
        steps = {self.topics.get(batch.topic, "produce") for batch in batches}
        return steps.pop() if len(steps) == 1 else "produce"

    def __call__(self, step: str, action: Callable[[], Any]) -> Any:
        with self._lock:
            if self.crashed_at is not None:
                if step == "close":
                    return None  # a dead process closes nothing, and nothing is left to raise
                raise Crash(f"the process crashed {self.crashed_at}")
            self.calls[step] += 1
            hit = step == self.step and self.calls[step] == self.at
        if hit and self.hook is not None:
            self.hook()
            return action()
        if hit and not self.after:
            self.crashed_at = f"before {step} #{self.at}"
            raise Crash(self.crashed_at)
        result = action()
        if hit:
            self.crashed_at = f"after {step} #{self.at}"
            raise Crash(self.crashed_at)
        return result


class InjectedProducer(Producer):
    def __init__(self, inner: Producer, inject: Injector) -> None:
        self.inner, self.inject = inner, inject

    def produce(self, batches: Sequence[OutgoingBatch]) -> None:
        self.inject(self.inject.produce_step(batches), lambda: self.inner.produce(batches))

    def begin_transaction(self) -> None:
        self.inject("begin_transaction", self.inner.begin_transaction)

    def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int],
                                    consumer: Consumer) -> None:
        inner = consumer.inner if isinstance(consumer, InjectedConsumer) else consumer
        self.inject("send_offsets", lambda: self.inner.send_offsets_to_transaction(offsets, inner))

    def commit_transaction(self) -> None:
        self.inject("commit_transaction", self.inner.commit_transaction)

    def abort_transaction(self) -> None:
        self.inject("abort_transaction", self.inner.abort_transaction)

    def close(self) -> None:
        self.inject("close", self.inner.close)


class InjectedConsumer(Consumer):
    def __init__(self, inner: Consumer, inject: Injector) -> None:
        self.inner, self.inject = inner, inject

    def consume_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        return self.inject("consume", lambda: self.inner.consume_batch(max_records, timeout_s))

    def commit(self, offsets: Mapping[TopicPartition, int], asynchronous: bool = False) -> None:
        if self.inject.crashed_at is None:
            self.inject.commits.append((set(offsets), set(self.inner.assignment())))
        self.inject("commit", lambda: self.inner.commit(offsets, asynchronous))

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        return self.inject("committed", lambda: self.inner.committed(partitions))

    def assignment(self) -> list[TopicPartition]:
        return self.inject("assignment", self.inner.assignment)

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return self.inject("end_offsets", lambda: self.inner.end_offsets(partitions))

    def lag(self) -> dict[TopicPartition, int]:
        return self.inject("lag", self.inner.lag)

    def close(self) -> None:
        self.inject("close", self.inner.close)


class InjectedTransport(Transport):
    """``inner``'s clients, each call going through ``inject``."""

    name = "memory"

    def __init__(self, inner: Transport, inject: Injector) -> None:
        super().__init__(inner.bootstrap, inner.client_config)
        self.inner, self.inject = inner, inject

    def producer(self, transactional_id: str | None = None) -> Producer:
        return InjectedProducer(self.inner.producer(transactional_id), self.inject)

    def consumer(self, group_id: str, topics: Sequence[str],
                 listener: RebalanceListener | None = None, read_committed: bool = True
                 ) -> Consumer:
        return InjectedConsumer(self.inner.consumer(group_id, topics, listener, read_committed),
                                self.inject)

    def reader(self, start: Mapping[TopicPartition, int | None], read_committed: bool = True
               ) -> Reader:
        self.inject.readers.append(dict(start))
        return self.inner.reader(start, read_committed)

    def admin(self) -> Admin:
        return self.inner.admin()


# --- Running stages -----------------------------------------------------------------------------


def group(world: World, stage: str = "copy") -> str:
    return f"{world.pipeline}.{stage}"


def records_in(stage: StageRunner) -> float:
    return float(stage.metrics.records_in._value.get())


def finish(*stages: StageRunner) -> None:
    """Stop ``stages`` gracefully and check they stopped without an error."""
    for stage in stages:
        stage.stop()
    for stage in stages:
        stage.thread.join(TIMEOUT_S)
        assert not stage.thread.is_alive(), f"stage {stage.name} did not stop"
        assert stage.error is None, f"stage {stage.name} failed: {stage.error!r}"


def crashed(stage: StageRunner, injector: Injector) -> None:
    """Wait for ``stage`` to die of the injected crash."""
    stage.thread.join(TIMEOUT_S)
    assert not stage.thread.is_alive(), "the stage did not crash"
    assert injector.crashed_at is not None, (
        f"the crash point was never reached; the stage failed of {stage.error!r}")
    assert isinstance(stage.error, Crash), f"the stage failed otherwise: {stage.error!r}"


def join_mid_batch(world: World, build: Callable[[Transport], StageRunner], stage: str,
                   topics: Mapping[str, str] | None = None,
                   settings: Mapping[str, str] | None = None,
                   ready: Callable[[Any], bool] = lambda _stage: True,
                   ) -> tuple[Any, Any, Injector]:
    """Start the stage ``build`` makes on a transport (with ``settings``) whose third produce
    waits until a second replica, started then, has joined group ``stage`` and is ``ready``;
    once the second has its partitions: the first, the second, and the first's injector (see
    :func:`foreign_commits`)."""
    transport = world.transport(settings)
    replicas: list[StageRunner] = []

    def join_second() -> None:
        second = build(transport)
        replicas.append(second)
        second.start()
        wait_until(lambda: len(world.cluster.members(group(world, stage))) == 2 and ready(second),
                   "the second member")

    injector = Injector("produce", 3, hook=join_second, topics=topics)
    first = build(InjectedTransport(transport, injector))
    first.start()
    wait_until(lambda: bool(replicas) and replicas[0].assigned, "the second member's partitions")
    return first, replicas[0], injector


def foreign_commits(injector: Injector) -> list[list[TopicPartition]]:
    """The partitions a member committed while it did not own them (each commit would rewind
    the partition's new owner)."""
    return [sorted(offsets - owned) for offsets, owned in injector.commits if offsets - owned]


def stopped_mid_stream(world: World, build: Callable[[Transport], StageRunner]) -> Any:
    """The stage ``build`` makes, started and stopped gracefully at its fifth produce (which
    goes on: the stop takes effect after that batch)."""
    stages: list[StageRunner] = []
    stage = build(InjectedTransport(world.transport(), Injector(
        "produce", 5, hook=lambda: stages[0].stop())))
    stages.append(stage)
    stage.start()
    stage.thread.join(TIMEOUT_S)
    assert not stage.thread.is_alive() and stage.error is None
    return stage
