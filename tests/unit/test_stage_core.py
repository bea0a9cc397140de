"""Topic stages, sink stages and source runners on the in-memory transport, without a broker:
a member joining mid-batch, a graceful stop, a sink's restore, and a crash injected between any
two steps of the commit sequence (see tests/stage_harness.py), checked record by record
against the input.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pytest

from streamflow.config.models import BatchConfig
from streamflow.metrics import PipelineMetrics
from streamflow.plugins import ComponentContext, Sink, Source, SourceBatch
from streamflow.runtime import stages
from streamflow.runtime.sources import POSITIONS_TOPIC_SPEC, SourceRunner, read_positions
from streamflow.runtime.stages import COMMIT_INTERVAL_S, SinkStage, StageIdentity, TopicStage
from streamflow.transport import (
    OutgoingBatch,
    RecordTooLargeError,
    TopicPartition,
    TopicSpec,
    Transport,
)
from streamflow.transport.memory import MemoryProducer
from tests.stage_harness import (
    COUNT,
    FAST_FAILURE,
    GUARANTEES,
    PARTITIONS,
    PER_BATCH,
    TIMEOUT_S,
    Crash,
    InjectedTransport,
    Injector,
    World,
    crashed,
    finish,
    foreign_commits,
    group,
    join_mid_batch,
    new_world,
    records_in,
    stopped_mid_stream,
    wait_until,
)


@pytest.fixture
def world() -> Iterator[World]:
    yield from new_world("stages", [POSITIONS_TOPIC_SPEC])


# --- Stages -------------------------------------------------------------------------------------


def topic_stage(world: World, transport: Transport, exactly_once: bool,
                transaction_interval_s: float = PER_BATCH, max_records: int = 25,
                max_wait_ms: int = 10) -> TopicStage:
    """A processor stage with no steps: each valid input goes out as it came, each other one to
    the dead letters."""
    metrics = PipelineMetrics(world.pipeline).stage("copy")
    batch = BatchConfig(max_records=max_records, max_wait_ms=max_wait_ms)
    return TopicStage(StageIdentity(world.pipeline, "copy", world.input, world.dead_letters),
                      transport, batch, metrics,
                      world.output, [], exactly_once=exactly_once,
                      transaction_interval_s=transaction_interval_s)


def check_topic_outputs(world: World, exactly_once: bool) -> None:
    """Every valid input in the output and every other one in the dead letters: at least once,
    and with ``exactly_once`` exactly once."""
    ids, letters = world.output_ids(), world.dead_letter_values()
    assert set(ids) == world.valid(), f"lost: {sorted(world.valid() - set(ids))[:10]}"
    assert set(letters) == world.poison(), "a dead letter was lost"
    if exactly_once:
        assert [n for n, c in ids.items() if c > 1] == [], "outputs produced twice"
        assert [v for v, c in letters.items() if c > 1] == [], "dead letters produced twice"


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_topic_stage_copies_every_record_once(world: World, exactly_once: bool) -> None:
    stage = topic_stage(world, world.transport(), exactly_once)
    stage.start()
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(stage)
    check_topic_outputs(world, exactly_once=True)
    assert records_in(stage) == COUNT


def test_small_batches_commit_their_offsets_at_most_every_interval(world: World) -> None:
    """At least once, a stage of one-record batches commits the acknowledged offsets every
    COMMIT_INTERVAL_S, not once a batch (which got members evicted on Kafka), and commits the
    last ones while idle, without waiting for a stop."""
    injector = Injector()
    stage = topic_stage(world, InjectedTransport(world.transport(), injector), False,
                        max_records=1)
    started = time.monotonic()
    stage.start()
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    elapsed = time.monotonic() - started
    commits = injector.calls["commit"]
    finish(stage)
    check_topic_outputs(world, exactly_once=False)
    [batches] = [sample.value for sample in stage.metrics.batch_seconds.collect()[0].samples
                 if sample.name.endswith("_count")]
    assert batches == COUNT  # one a record
    assert commits <= elapsed / COMMIT_INTERVAL_S + 2, f"{commits} commits in {elapsed:.2f} s"


def test_small_batches_go_out_before_those_sent_earlier_are_acknowledged(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At least once, a stage waits for the acknowledgement of the batches it sent only once
    they hold MAX_UNACKNOWLEDGED_BATCHES batches' worth of records or the oldest was sent
    MAX_UNACKNOWLEDGED_S ago: one-record batches, from a producer that never says all are
    acknowledged, go out one after another until the oldest is that old."""
    monkeypatch.setattr(MemoryProducer, "acknowledged", lambda _producer: False)
    monkeypatch.setattr(stages, "MAX_UNACKNOWLEDGED_S", TIMEOUT_S)
    # No wait for a batch ends empty (which would acknowledge what was sent, idle).
    stage = topic_stage(world, world.transport(), False, max_records=COUNT,
                        max_wait_ms=int(TIMEOUT_S * 1000))
    waits: list[int] = []  # the records loaded at each wait for acknowledgements
    flush = MemoryProducer.flush

    def counted(producer: MemoryProducer) -> None:
        if producer is stage.producer:
            waits.append(world.loaded)
        flush(producer)

    def all_out() -> bool:
        return len(world.read(world.output)) + len(world.read(world.dead_letters)) == world.loaded

    monkeypatch.setattr(MemoryProducer, "flush", counted)
    stage.start()
    wait_until(all_out, "the first records out")
    for _ in range(2 * stages.MAX_UNACKNOWLEDGED_BATCHES):
        world.load(1)
        wait_until(all_out, f"record {world.loaded - 1} out")
    assert waits == []
    assert not world.cluster.committed_offsets(group(world))
    monkeypatch.setattr(stages, "MAX_UNACKNOWLEDGED_S", 0.0)
    world.load(1)
    wait_until(lambda: waits, "a wait for acknowledgements")
    assert waits == [world.loaded]
    stage.stop()
    world.load(1)  # ends the wait for a batch
    finish(stage)
    assert world.all_committed(group(world))
    check_topic_outputs(world, exactly_once=True)


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_member_joining_mid_batch_takes_partitions_without_loss_or_repeat(
    world: World, exactly_once: bool
) -> None:
    """A second replica joins while the first is producing a batch: the first finishes the
    batch, commits the revoked partitions and hands them over (eager rebalance). Then more input
    arrives and the first stops: its drain must not commit offsets of partitions it no longer
    owns over the second's (they would rewind)."""
    first, second, injector = join_mid_batch(
        world, lambda transport: topic_stage(world, transport, exactly_once), "copy")
    wait_until(lambda: world.all_committed(group(world)), "the first input")
    world.load(COUNT)
    wait_until(lambda: world.all_committed(group(world)), "the second input")
    wait_until(lambda: records_in(first) + records_in(second) >= 2 * COUNT, "the counts")
    finish(first)
    finish(second)
    assert world.all_committed(group(world))
    assert foreign_commits(injector) == [], \
        "the first member committed offsets of partitions it no longer owned (a rewind)"
    assert records_in(first) > 0 and records_in(second) > 0
    # A graceful rebalance repeats nothing, whatever the guarantee.
    check_topic_outputs(world, exactly_once=True)


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_stop_mid_stream_drains_and_a_restart_goes_on(world: World, exactly_once: bool) -> None:
    transport = world.transport()
    stopped_mid_stream(world, lambda t: topic_stage(world, t, exactly_once))
    # What the first produced is exactly what its committed offsets cover.
    committed = world.cluster.committed_offsets(group(world))
    covered = {number for number, (partition, offset) in world.places().items()
               if offset < committed.get((world.input, partition), 0)}
    assert 0 < len(covered) < COUNT
    produced = world.output_ids()
    assert set(produced) == covered & world.valid() and max(produced.values()) == 1
    assert world.cluster.open_transaction_count() == 0
    second = topic_stage(world, transport, exactly_once)
    second.start()
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(second)
    check_topic_outputs(world, exactly_once=True)


AT_LEAST_ONCE_POINTS = [
    pytest.param("produce", 3, False, id="before-produce"),
    pytest.param("produce", 3, True, id="between-produce-and-commit"),
    # the first commit: the next come every COMMIT_INTERVAL_S, maybe after the input's end
    pytest.param("commit", 1, True, id="after-commit"),
]
EXACTLY_ONCE_POINTS = [
    pytest.param("produce", False, id="before-produce"),
    pytest.param("produce", True, id="between-produce-and-send-offsets"),
    pytest.param("send_offsets", True, id="between-send-offsets-and-commit"),
    pytest.param("commit_transaction", True, id="after-commit"),
]


def crash_and_restart(world: World, exactly_once: bool, step: str, after: bool, at: int = 3
                      ) -> None:
    transport = world.transport(FAST_FAILURE)
    injector = Injector(step, at=at, after=after)
    first = topic_stage(world, InjectedTransport(transport, injector), exactly_once)
    first.start()
    crashed(first, injector)
    restarted = topic_stage(world, transport, exactly_once)
    restarted.start()
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(restarted)


@pytest.mark.parametrize(("step", "at", "after"), AT_LEAST_ONCE_POINTS)
def test_at_least_once_loses_nothing_across_a_crash(world: World, step: str, at: int, after: bool
                                                    ) -> None:
    crash_and_restart(world, False, step, after, at)
    check_topic_outputs(world, exactly_once=False)


@pytest.mark.parametrize(("step", "after"), EXACTLY_ONCE_POINTS)
def test_exactly_once_holds_across_a_crash(world: World, step: str, after: bool) -> None:
    crash_and_restart(world, True, step, after)
    check_topic_outputs(world, exactly_once=True)


SPANNING = 1.0  # exactly_once: a transaction spans the batches of a second (these runs take less)


@pytest.mark.parametrize(("step", "at", "after"), [
    pytest.param("produce", 6, True, id="mid-transaction"),
    pytest.param("commit_transaction", 1, False, id="before-its-commit"),
])
def test_exactly_once_holds_across_a_crash_in_a_transaction_spanning_batches(
    world: World, step: str, at: int, after: bool
) -> None:
    transport = world.transport(FAST_FAILURE)
    injector = Injector(step, at=at, after=after)
    first = topic_stage(world, InjectedTransport(transport, injector), True, SPANNING)
    first.start()
    crashed(first, injector)
    assert injector.calls["begin_transaction"] == 1 and injector.calls["produce"] >= 6, \
        "the batches did not share a transaction"
    restarted = topic_stage(world, transport, True, SPANNING)
    restarted.start()
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(restarted)
    check_topic_outputs(world, exactly_once=True)


def test_a_stop_commits_the_open_transaction_spanning_batches(world: World) -> None:
    stage = stopped_mid_stream(world, lambda t: topic_stage(world, t, True, SPANNING))
    assert world.cluster.open_transaction_count() == 0
    committed = world.cluster.committed_offsets(group(world))
    covered = {number for number, (partition, offset) in world.places().items()
               if offset < committed.get((world.input, partition), 0)}
    assert records_in(stage) == len(covered) > 0
    produced = world.output_ids()
    assert set(produced) == covered & world.valid() and max(produced.values()) == 1


def oversize_output_stage(world: World, max_records: int = 25, after: int = 0, **options: Any
                          ) -> tuple[TopicStage, str, bytes]:
    """A started copy stage whose output topic takes records of up to 2,000 bytes, and whose
    input has one record over that (``big``), followed by ``after`` more: the stage, its output
    topic and ``big``."""
    small = "small-out"
    admin = world.transport().admin()
    admin.create_topics([TopicSpec(small, PARTITIONS, config={"max.message.bytes": "2000"})])
    big = json.dumps({"id": -1, "pad": "p" * 3000}).encode()
    producer = world.transport().producer()
    producer.produce([OutgoingBatch(world.input, [big], [b"-1"])])
    world.load(after)
    metrics = PipelineMetrics(world.pipeline).stage("copy")
    stage = TopicStage(StageIdentity(world.pipeline, "copy", world.input, world.dead_letters),
                       world.transport(), BatchConfig(max_records=max_records, max_wait_ms=10),
                       metrics, small, [], **options)
    stage.start()
    return stage, small, big


def test_a_record_the_broker_refuses_after_it_was_sent_is_dead_lettered_and_counted(
    world: World
) -> None:
    """At least once, a batch is acknowledged while the next is handled: an output record over
    the output topic's size limit is found refused then, its input goes to the dead letters
    once, and the batch is counted once, without it."""
    stage, small, big = oversize_output_stage(world, exactly_once=False)
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(stage)
    ids = Counter(json.loads(v or b"")["id"] for v in world.read(small))
    assert set(ids) == world.valid()
    letters = world.dead_letter_values()
    assert set(letters) == {*world.poison(), big} and max(letters.values()) == 1
    assert stage.metrics.records_in._value.get() == COUNT + 1
    assert stage.metrics.records_out._value.get() == sum(ids.values())
    assert stage.metrics.records_dead_lettered._value.get() == len(letters)


def test_a_refusal_among_several_unacknowledged_batches_dead_letters_its_own_input(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At least once, several batches go out before one acknowledgement (a producer that never
    says all are acknowledged makes the stage wait only once MAX_UNACKNOWLEDGED_BATCHES are out): a
    record refused for its size is traced to its own batch among them, whose input goes to the
    dead letters once, and every batch is counted once."""
    monkeypatch.setattr(MemoryProducer, "acknowledged", lambda _producer: False)
    found: list[tuple[int, int]] = []  # (batches acknowledged together, position of the refused)
    split = TopicStage._dead_letter_refused_of_each

    def recorded(stage: TopicStage, refused: RecordTooLargeError, sent: list[Any]) -> list[int]:
        oversizes = split(stage, refused, sent)
        found.extend((len(sent), position) for position, n in enumerate(oversizes) if n)
        return oversizes

    monkeypatch.setattr(TopicStage, "_dead_letter_refused_of_each", recorded)
    stage, small, big = oversize_output_stage(world, exactly_once=False, max_records=5,
                                              after=100)
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(stage)
    assert len(found) == 1 and found[0][0] > 1 and found[0][1] > 0, found
    ids = Counter(json.loads(v or b"")["id"] for v in world.read(small))
    assert set(ids) == world.valid() and max(ids.values()) == 1
    letters = world.dead_letter_values()
    assert set(letters) == {*world.poison(), big} and max(letters.values()) == 1
    assert stage.metrics.records_in._value.get() == world.loaded + 1
    assert stage.metrics.records_out._value.get() == sum(ids.values())
    assert stage.metrics.records_dead_lettered._value.get() == len(letters)


def test_a_record_the_broker_refuses_sends_its_whole_transaction_again(world: World) -> None:
    """An output record over the output topic's size limit, handled after several batches of
    the same open transaction: the refusal aborts the transaction, so every record sent in it
    goes again in a new one, and the big record's input goes to the dead letters."""
    stage, small, big = oversize_output_stage(world, exactly_once=True,
                                              transaction_interval_s=SPANNING)
    wait_until(lambda: world.all_committed(group(world)), "the input's offsets committed")
    finish(stage)
    ids = Counter(json.loads(v or b"")["id"] for v in world.read(small))
    assert set(ids) == world.valid() and max(ids.values()) == 1
    letters = world.dead_letter_values()
    assert set(letters) == {*world.poison(), big} and max(letters.values()) == 1


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_zombie_that_stalls_mid_batch_is_fenced(world: World, exactly_once: bool) -> None:
    """The first replica stalls inside a produce for longer than its session: the group evicts
    it and the second replica takes every partition. When the zombie wakes, its commit is
    refused (exactly_once: its transaction is fenced by the group generation and aborted)."""
    # Evicted quickly, but its transaction must outlive the stall so that the fencing shows.
    transport = world.transport({**FAST_FAILURE, "transaction.timeout.ms": "60000"})
    replicas: list[TopicStage] = []

    def stall() -> None:
        second = topic_stage(world, transport, exactly_once)
        replicas.append(second)
        second.start()
        wait_until(lambda: second.assigned and len(world.cluster.members(group(world))) == 1,
                   "the zombie's eviction")

    zombie = topic_stage(world, InjectedTransport(transport, Injector("produce", 3, hook=stall)),
                         exactly_once)
    zombie.start()
    wait_until(lambda: bool(replicas) and world.all_committed(group(world)), "the input")
    finish(replicas[0])
    zombie.stop()
    zombie.thread.join(TIMEOUT_S)
    if exactly_once:
        assert zombie.error is not None and "generation" in str(zombie.error)
    check_topic_outputs(world, exactly_once)


# --- Sink stages --------------------------------------------------------------------------------


@dataclass
class Ledger:
    """The sink's durable store: ids by partition, and the offsets flushed with them."""

    rows: Counter[int] = field(default_factory=Counter)
    offsets: dict[tuple[str, TopicPartition], int] = field(default_factory=dict)  # by cluster
    flushes: int = 0


class LedgerSink(Sink[Any]):
    """Buffers rows until flush, which stores them with their offsets atomically; with
    ``resumes`` it reports those offsets (exactly-once), else the runtime replays. With
    ``eager`` it asks for a flush (and so a commit) after every batch."""

    def __init__(self, ledger: Ledger, resumes: bool, eager: bool = False,
                 on_write: Callable[[int], None] | None = None) -> None:
        super().__init__(None, ComponentContext("p", "ledger"))
        self.ledger, self.resumes, self.eager, self.on_write = ledger, resumes, eager, on_write
        self.buffer: dict[TopicPartition, list[int]] = {}
        self.writes = 0

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        self.writes += 1
        if self.on_write is not None:
            self.on_write(self.writes)
        self.buffer.setdefault(partition, []).extend(table.column("id").to_pylist())

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int | None:
        for ids in self.buffer.values():
            self.ledger.rows.update(ids)
        self.buffer = {}
        self.ledger.offsets.update({(cluster_id, p): o for p, o in offsets.items()})
        self.ledger.flushes += 1
        return None

    def should_flush(self) -> bool:
        return self.eager and bool(self.buffer)

    def resume_offsets(self, partitions: Sequence[TopicPartition], cluster_id: str
                       ) -> dict[TopicPartition, int]:
        if not self.resumes:
            return {}
        return {p: self.ledger.offsets[(cluster_id, p)] for p in partitions
                if (cluster_id, p) in self.ledger.offsets}

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            assert not self.buffer.get(partition), "revoked before its rows were flushed"
            self.buffer.pop(partition, None)

    def close(self) -> None:
        self.buffer = {}  # unflushed rows are discarded, to be replayed


def sink_stage(world: World, transport: Transport, sink: LedgerSink,
               commit_interval_s: float = 0.05) -> SinkStage:
    metrics = PipelineMetrics(world.pipeline)
    return SinkStage(StageIdentity(world.pipeline, "ledger", world.input, world.dead_letters),
                     transport, BatchConfig(max_records=25, max_wait_ms=10),
                     metrics.stage("ledger"), sink, metrics.sink("ledger"), commit_interval_s)


def check_ledger(world: World, ledger: Ledger, exactly_once: bool) -> None:
    assert set(ledger.rows) == world.valid(), f"lost: {sorted(world.valid() - set(ledger.rows))[:10]}"
    if exactly_once:
        assert [n for n, c in ledger.rows.items() if c > 1] == [], "rows written twice"
    letters = world.dead_letter_values()
    assert set(letters) == world.poison()


def test_a_sink_stage_drains_its_buffer_on_stop(world: World) -> None:
    ledger = Ledger()
    stage = sink_stage(world, world.transport(), LedgerSink(ledger, resumes=True),
                       commit_interval_s=3600)
    stage.start()
    wait_until(lambda: records_in(stage) == COUNT, "every record handed to the sink")
    assert ledger.flushes == 0 and world.cluster.committed_offsets(group(world, "ledger")) == {}
    finish(stage)
    assert ledger.flushes == 1
    assert world.all_committed(group(world, "ledger"))
    check_ledger(world, ledger, exactly_once=True)


@pytest.mark.parametrize("resumes", [True, False], ids=["resume-offsets", "replay"])
def test_a_sink_restores_after_a_crash_between_flush_and_commit(world: World, resumes: bool
                                                                 ) -> None:
    """The sink made rows and offsets durable, then the stage died before Kafka's commit: the
    restarted stage skips what the sink reports written (a sink without resume_offsets gets the
    rows again: at least once)."""
    ledger = Ledger()
    transport = world.transport(FAST_FAILURE)
    injector = Injector("commit", at=2)
    first = sink_stage(world, InjectedTransport(transport, injector),
                       LedgerSink(ledger, resumes, eager=True))
    first.start()
    crashed(first, injector)
    flushed_before_crash = ledger.flushes
    assert flushed_before_crash == 2 and ledger.rows, "the crash came after the second flush"
    restarted = sink_stage(world, transport, LedgerSink(ledger, resumes))
    restarted.start()
    wait_until(lambda: world.all_committed(group(world, "ledger")), "the input's offsets")
    finish(restarted)
    check_ledger(world, ledger, exactly_once=resumes)
    if resumes:
        assert float(restarted.metrics.records_filtered._value.get()) > 0, "nothing was skipped"


@pytest.mark.parametrize(("step", "after"), [
    pytest.param("write", False, id="before-write"),
    pytest.param("commit", False, id="between-flush-and-commit"),
    pytest.param("commit", True, id="after-commit"),
])
def test_a_sink_without_resume_offsets_loses_nothing_across_a_crash(
    world: World, step: str, after: bool
) -> None:
    ledger = Ledger()
    transport = world.transport(FAST_FAILURE)
    injector = Injector(step, at=3, after=after)
    sink = LedgerSink(ledger, resumes=False, eager=True,
                      on_write=lambda _n: injector("write", lambda: None))
    first = sink_stage(world, InjectedTransport(transport, injector), sink)
    first.start()
    crashed(first, injector)
    restarted = sink_stage(world, transport, LedgerSink(ledger, resumes=False))
    restarted.start()
    wait_until(lambda: world.all_committed(group(world, "ledger")), "the input's offsets")
    finish(restarted)
    check_ledger(world, ledger, exactly_once=False)


@pytest.mark.parametrize("resumes", [True, False], ids=["resume-offsets", "replay"])
def test_a_sink_member_joining_mid_batch_gets_flushed_partitions(world: World, resumes: bool
                                                                 ) -> None:
    """The second replica joins while the first is inside the sink's write: the first flushes
    and commits on revoke before its partitions move, so no row is written twice."""
    ledger = Ledger()
    transport = world.transport()
    replicas: list[SinkStage] = []

    def join_second(writes: int) -> None:
        if writes != 3:
            return
        second = sink_stage(world, transport, LedgerSink(ledger, resumes), commit_interval_s=3600)
        replicas.append(second)
        second.start()
        wait_until(lambda: len(world.cluster.members(group(world, "ledger"))) == 2, "the join")

    first = sink_stage(world, transport, LedgerSink(ledger, resumes, on_write=join_second),
                       commit_interval_s=3600)
    first.start()
    wait_until(lambda: bool(replicas) and records_in(first) + records_in(replicas[0]) >= COUNT,
               "every record handed to a sink")
    finish(first, replicas[0])
    assert records_in(replicas[0]) > 0
    assert world.all_committed(group(world, "ledger"))
    check_ledger(world, ledger, exactly_once=True)


class ZombieSink(LedgerSink):
    """Its stage loses its partitions with rows unflushed: revoke drops them."""

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        for partition in partitions:
            self.buffer.pop(partition, None)


def test_a_sink_zombie_evicted_mid_write_flushes_nothing_of_its_lost_partitions(world: World
                                                                                ) -> None:
    """The first replica stalls inside the sink's write past its session; the second takes
    every partition and writes and commits everything. When the zombie wakes, its partitions
    are lost: its buffered rows are discarded, not flushed, so no row is written twice."""
    ledger = Ledger()
    transport = world.transport(FAST_FAILURE)
    replicas: list[SinkStage] = []

    def stall(writes: int) -> None:
        if writes != 3:
            return
        second = sink_stage(world, transport, LedgerSink(ledger, resumes=True))
        replicas.append(second)
        second.start()
        wait_until(lambda: world.all_committed(group(world, "ledger")), "the second's commits")

    zombie = sink_stage(world, transport, ZombieSink(ledger, resumes=True, on_write=stall),
                        commit_interval_s=3600)
    zombie.start()
    wait_until(lambda: bool(replicas) and world.all_committed(group(world, "ledger")),
               "the input")
    finish(replicas[0])
    finish(zombie)
    assert zombie.error is None
    check_ledger(world, ledger, exactly_once=True)


# --- Source runners -----------------------------------------------------------------------------


class CountingSource(Source[Any]):
    """Emits numbers ``0 .. total - 1`` as JSON, ``batch`` at a time; its position is the next."""

    def __init__(self, total: int, batch: int = 10) -> None:
        super().__init__(None, ComponentContext("p", "numbers"))
        self.total, self.batch, self.next = total, batch, 0
        self.opened_at: Any = "never"

    def open(self, position: Any | None) -> None:
        self.opened_at = position
        self.next = position or 0

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch | None:
        if self.next >= self.total:
            return None
        numbers = range(self.next, min(self.next + self.batch, self.total))
        self.next = numbers[-1] + 1
        return SourceBatch([json.dumps({"id": n}).encode() for n in numbers])

    def position(self) -> Any:
        return self.next

    def acknowledged(self, position: Any) -> None:
        """Nothing to confirm upstream."""


def source_runner(world: World, transport: Transport, source: CountingSource) -> SourceRunner:
    metrics = PipelineMetrics(world.pipeline).source("numbers")
    return SourceRunner(world.pipeline, source, world.output, transport, metrics, 100,
                        world.dead_letters)


@pytest.mark.parametrize(("step", "after"), [
    pytest.param("produce", False, id="before-produce"),
    pytest.param("produce", True, id="between-produce-and-commit"),
    pytest.param("commit_transaction", True, id="after-commit"),
])
def test_a_source_resumes_exactly_after_a_crash(world: World, step: str, after: bool) -> None:
    transport = world.transport(FAST_FAILURE)
    injector = Injector(step, at=3, after=after)
    first = source_runner(world, InjectedTransport(transport, injector), CountingSource(100))
    first.start()
    first.thread.join(TIMEOUT_S)
    assert injector.crashed_at is not None and isinstance(first.error, Crash)
    source = CountingSource(100)
    restarted = source_runner(world, transport, source)  # fences the first's transactional id
    restarted.start()
    restarted.thread.join(TIMEOUT_S)
    assert restarted.finished and restarted.error is None
    assert source.opened_at == (30 if after and step == "commit_transaction" else 20)
    assert sorted(world.output_ids().elements()) == list(range(100))
    assert read_positions(transport, world.pipeline) == {"numbers": 100}
