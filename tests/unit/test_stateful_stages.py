"""Window and model stages on the in-memory transport, without a broker, under both guarantees:
a member joining mid-batch (each partition's state moves with it), a graceful stop (drain), a
restart that restores the state (window: from the changelog; model: from the checkpoint store),
and a crash injected between any two steps of the commit sequence, then a restart, checked
record by record against the input (see tests/stage_harness.py for the crash injection).

The input records (tests.stage_harness.value) have an id, an event time ``ts`` 100 ms apart in
id order, a feature ``x`` and a target ``y``; every 25th is not JSON (a dead letter).

- Window: tumbling windows of 2 s per input partition counting the records and summing their
  ids; every window that its partition's watermark closed must come out with its exact count
  and sum (exactly once under exactly_once), and no record may be late.
- Model: a linear regression per partition, predicting then learning each record; a record's
  prediction carries the version of the model that made it, the number of records that model
  had learned: the record's rank among its partition's valid records if each was learned
  exactly once before it. The checkpoint headers' learned counts must add up to the number of
  valid records.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import streamflow.runtime.model_stage as model_stage_module
from streamflow.config.models import BatchConfig, ModelConfig, StateCheckpointConfig, WindowConfig
from streamflow.metrics import PipelineMetrics
from streamflow.ml.engine import EngineSettings
from streamflow.ml.worker import EngineSpec
from streamflow.plugins import ComponentContext
from streamflow.processing.dedupe import DedupeConfig, DedupeStep
from streamflow.processing.windows import PartitionWindows, iso_utc
from streamflow.runtime.changelog import PartitionSnapshot
from streamflow.runtime.model_stage import ModelStage
from streamflow.runtime.stages import StageIdentity, StageRunner, StepRunner, TopicStage
from streamflow.runtime.window_stage import WindowStage
from streamflow.transport import TopicSpec, Transport, TransportError
from tests import stage_harness as harness
from tests.stage_harness import (
    COUNT,
    GUARANTEES,
    PARTITIONS,
    PER_BATCH,
    InjectedTransport,
    Injector,
    World,
)

CHANGELOG = "changelog"
LATE = "late"
WINDOW_MS = 2000  # 20 records per window, about 5 per partition
SNAPSHOT_EVERY = 50  # records; batches are of 25 at most
CHECKPOINT_EVERY = 20  # records of one partition: about every batch
NEVER = 100_000  # records: only a stop or a rebalance checkpoints
BATCH = BatchConfig(max_records=25, max_wait_ms=10)
# A window stage polls every few milliseconds: a crashed one can be evicted sooner than one of
# a model stage, which starts its worker process between joining and polling (the in-memory
# group takes polls for heartbeats): seconds on a busy machine, on which 2 s evicted it.
QUICK_FAILURE = {"session.timeout.ms": "1000", "transaction.timeout.ms": "1500"}
MODEL_FAILURE = {"session.timeout.ms": "6000", "transaction.timeout.ms": "7000"}


@pytest.fixture
def world() -> Iterator[World]:
    yield from harness.new_world("stateful", [TopicSpec(CHANGELOG, 1), TopicSpec(LATE)])


def caught_up(*stages: StageRunner) -> bool:
    """Whether ``stages`` together hold every input partition and have consumed each to its
    end (a stage stopped now still handles what it consumed: its drain delivers it)."""
    lags: dict[Any, int] = {}
    for stage in stages:
        consumer = stage.consumer
        if consumer is None:
            return False
        lags.update(consumer.lag())
    return len(lags) == PARTITIONS and not any(lags.values())


def run_to_end(*stages: StageRunner) -> None:
    harness.wait_until(lambda: caught_up(*stages), "the input consumed to its end")
    harness.finish(*stages)


def input_readers(injector: Injector, world: World) -> list[dict[Any, int | None]]:
    """The readers of the input topic a stage opened (to replay records into its state)."""
    return [start for start in injector.readers if any(t == world.input for t, _p in start)]


def check_dead_letters(world: World, exactly_once: bool) -> None:
    letters = world.dead_letter_values()
    assert set(letters) == world.poison(), "a dead letter was lost"
    if exactly_once:
        assert [v for v, c in letters.items() if c > 1] == [], "dead letters produced twice"


# --- Window stages ------------------------------------------------------------------------------


WINDOW = WindowConfig.model_validate({
    "kind": "tumbling", "size_s": WINDOW_MS / 1000, "time_field": "ts", "time_unit": "ms",
    "aggregates": {"n": {"fn": "count"}, "total": {"fn": "sum", "field": "id"}},
})


def window_stage(world: World, transport: Transport, exactly_once: bool,
                 snapshot_every: int = SNAPSHOT_EVERY) -> WindowStage:
    metrics = PipelineMetrics(world.pipeline)
    checkpoint = StateCheckpointConfig(every_records=snapshot_every, every_seconds=3600)
    return WindowStage(StageIdentity(world.pipeline, "window", world.input, world.dead_letters),
                       transport, BATCH, metrics.stage("window"), world.output, [],
                       WINDOW, metrics.window("window"), LATE, CHANGELOG, checkpoint,
                       exactly_once, PER_BATCH)


def expected_windows(world: World) -> Counter[tuple[str, int, float]]:
    """(start, count, sum of ids) of every window its partition's watermark closed."""
    places = world.places()
    counts: Counter[tuple[int, int]] = Counter()
    totals: Counter[tuple[int, int]] = Counter()
    watermarks: dict[int, int] = {}
    for number in sorted(world.valid()):
        partition, time_ms = places[number][0], number * 100
        window = (partition, time_ms // WINDOW_MS * WINDOW_MS)
        counts[window] += 1
        totals[window] += number
        watermarks[partition] = max(watermarks.get(partition, 0), time_ms)
    return Counter((iso_utc(start), count, float(totals[(partition, start)]))
                   for (partition, start), count in counts.items()
                   if start + WINDOW_MS <= watermarks[partition])


def window_results(world: World) -> Counter[tuple[str, int, float]]:
    records = [json.loads(v or b"") for v in world.read(world.output)]
    return Counter((r["window_start"], r["n"], float(r["total"])) for r in records)


def check_windows(world: World, exactly_once: bool) -> None:
    """Every closed window with its exact count and sum: at least once, and with
    ``exactly_once`` exactly once; no record late, every dead letter out."""
    results, expected = window_results(world), expected_windows(world)
    assert len(expected) > 50
    missing, wrong = set(expected) - set(results), set(results) - set(expected)
    assert (sorted(missing)[:5], sorted(wrong)[:5]) == ([], []), \
        "windows missing, or with a wrong count or sum"
    if exactly_once:
        assert [w for w, c in results.items() if c > 1] == [], "window results produced twice"
    assert world.read(LATE) == [], "records were taken for late"
    check_dead_letters(world, exactly_once)


def snapshots(world: World) -> dict[int, tuple[int, PartitionWindows]]:
    """The newest changelog snapshot of each input partition: its offset and its windows."""
    latest: dict[bytes, bytes] = {}
    for batch in world.read_batches(CHANGELOG):
        latest.update((k, v) for k, v in zip(batch.keys, batch.values, strict=True)
                      if k is not None and v is not None)
    saved = {int(k): PartitionSnapshot.from_bytes(v) for k, v in latest.items()}
    return {p: (s.next_offset, PartitionWindows.from_bytes(WINDOW, p, s.states["windows"]))
            for p, s in saved.items()}


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_window_member_joining_mid_batch_takes_partitions_with_their_windows(
    world: World, exactly_once: bool
) -> None:
    """A second replica joins while the first produces a batch: the first finishes the batch,
    and each partition it loses goes with its open windows (at_least_once: snapshotted and
    committed on revoke; exactly_once: every batch committed, the second replays what the
    last snapshot misses). A graceful rebalance repeats nothing, whatever the guarantee."""
    first, second, injector = harness.join_mid_batch(
        world, lambda transport: window_stage(world, transport, exactly_once), "window",
        {CHANGELOG: "snapshot"})
    run_to_end(first, second)
    assert harness.records_in(first) > 0 and harness.records_in(second) > 0
    assert world.all_committed(harness.group(world, "window"))
    assert harness.foreign_commits(injector) == [], \
        "the first member committed offsets of partitions it no longer owned (a rewind)"
    check_windows(world, exactly_once=True)


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_window_stage_drains_on_stop_and_a_restart_restores_from_the_changelog(
    world: World, exactly_once: bool
) -> None:
    """Stopped mid-stream before any snapshot was due, the stage snapshots every partition and
    (at_least_once) commits the offsets the snapshots cover; under exactly_once the batches
    committed them. A restarted stage restores the snapshots and goes on from there without
    reading the input again: windows open across the stop come out whole."""
    first = harness.stopped_mid_stream(
        world, lambda t: window_stage(world, t, exactly_once, snapshot_every=NEVER))
    committed = world.cluster.committed_offsets(harness.group(world, "window"))
    saved = snapshots(world)
    assert {p: offset for p, (offset, _windows) in saved.items()} == {
        p: committed[(world.input, p)] for p in range(PARTITIONS)}, \
        "the snapshots do not cover the committed offsets"
    assert 0 < harness.records_in(first) < COUNT
    assert sum(w.window_count() for _offset, w in saved.values()) > 0, "no open window to restore"
    restarts = Injector()
    restarted = window_stage(world, InjectedTransport(world.transport(), restarts), exactly_once,
                             snapshot_every=NEVER)
    restarted.start()
    run_to_end(restarted)
    assert input_readers(restarts, world) == [], "the restarted stage replayed input records"
    assert harness.records_in(first) + harness.records_in(restarted) == COUNT
    assert world.all_committed(harness.group(world, "window"))
    check_windows(world, exactly_once=True)


WINDOW_AT_LEAST_ONCE_POINTS = [
    pytest.param("produce", 3, False, id="before-produce"),
    pytest.param("snapshot", 2, False, id="between-produce-and-snapshot"),
    pytest.param("snapshot", 2, True, id="between-snapshot-and-commit"),
    pytest.param("commit", 2, True, id="after-commit"),
]
EXACTLY_ONCE_POINTS = [
    pytest.param("produce", 3, False, id="before-produce"),
    pytest.param("produce", 3, True, id="between-produce-and-send-offsets"),
    pytest.param("send_offsets", 3, True, id="between-send-offsets-and-commit"),
    pytest.param("commit_transaction", 3, True, id="after-commit"),
]


def crash_and_restart(world: World, build: Callable[..., TopicStage], stage: str,
                      exactly_once: bool, step: str, at: int, after: bool) -> Injector:
    """Crash a stateful stage that ``build`` makes at the step, restart it and run it to the
    end; the restarted stage's injector (nothing injected: it records the readers)."""
    injector = Injector(step, at=at, after=after, topics={CHANGELOG: "snapshot"})
    first = build(world, InjectedTransport(world.transport(QUICK_FAILURE), injector), exactly_once)
    first.start()
    harness.crashed(first, injector)
    restarts = Injector()
    restarted = build(world, InjectedTransport(world.transport(), restarts), exactly_once)
    restarted.start()
    run_to_end(restarted)
    assert world.all_committed(harness.group(world, stage))
    return restarts


@pytest.mark.parametrize(("step", "at", "after"), WINDOW_AT_LEAST_ONCE_POINTS)
def test_a_window_stage_at_least_once_loses_nothing_across_a_crash(
    world: World, step: str, at: int, after: bool
) -> None:
    crash_and_restart(world, window_stage, "window", False, step, at, after)
    check_windows(world, exactly_once=False)


@pytest.mark.parametrize(("step", "at", "after"), EXACTLY_ONCE_POINTS)
def test_a_window_stage_exactly_once_holds_across_a_crash(
    world: World, step: str, at: int, after: bool
) -> None:
    restarts = crash_and_restart(world, window_stage, "window", True, step, at, after)
    check_windows(world, exactly_once=True)
    if step == "commit_transaction":  # batches were committed after the last snapshot
        assert input_readers(restarts, world), "no input record was replayed into the state"


# --- Dedupe steps ------------------------------------------------------------------------------
# A processor stage with a dedupe step keyed by x (ten values): in each input partition, only the
# first record of each x passes. Its state is the stage core's, like the windows'.


def dedupe_stage(world: World, transport: Transport, exactly_once: bool,
                 snapshot_every: int = SNAPSHOT_EVERY) -> TopicStage:
    metrics = PipelineMetrics(world.pipeline)
    dedupe = DedupeStep(DedupeConfig(key=["x"], window_s=1e6, time_field="ts"),
                        ComponentContext(world.pipeline, "dedupe"))
    return TopicStage(StageIdentity(world.pipeline, "dedupe", world.input, world.dead_letters),
                      transport, BATCH, metrics.stage("dedupe"), world.output, [StepRunner(dedupe)],
                      exactly_once, CHANGELOG,
                      StateCheckpointConfig(every_records=snapshot_every, every_seconds=3600),
                      transaction_interval_s=PER_BATCH)


def first_of_each_x(world: World) -> set[int]:
    """The records that pass: the first valid one of each x in each partition."""
    firsts: dict[tuple[int, int], tuple[int, int]] = {}
    for number, (partition, offset) in world.places().items():
        if number in world.valid():
            key = (partition, number % 10)
            firsts[key] = min(firsts.get(key, (offset, number)), (offset, number))
    return {number for _offset, number in firsts.values()}


def check_deduplicated(world: World, exactly_once: bool) -> None:
    """No repeat passed and no first record was lost; under exactly_once each passed once."""
    passed = world.output_ids()
    assert set(passed) == first_of_each_x(world), "a repeat passed or a first record was lost"
    if exactly_once:
        assert [n for n, count in passed.items() if count > 1] == [], "a record passed twice"
    check_dead_letters(world, exactly_once)


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_dedupe_member_joining_mid_batch_takes_partitions_with_their_keys(
    world: World, exactly_once: bool
) -> None:
    first, second, injector = harness.join_mid_batch(
        world, lambda transport: dedupe_stage(world, transport, exactly_once), "dedupe",
        {CHANGELOG: "snapshot"})
    run_to_end(first, second)
    assert harness.records_in(first) > 0 and harness.records_in(second) > 0
    assert world.all_committed(harness.group(world, "dedupe"))
    assert harness.foreign_commits(injector) == []
    check_deduplicated(world, exactly_once=True)


@pytest.mark.parametrize(("step", "at", "after"), WINDOW_AT_LEAST_ONCE_POINTS)
def test_a_dedupe_stage_at_least_once_lets_no_repeat_through_across_a_crash(
    world: World, step: str, at: int, after: bool
) -> None:
    crash_and_restart(world, dedupe_stage, "dedupe", False, step, at, after)
    check_deduplicated(world, exactly_once=False)


@pytest.mark.parametrize(("step", "at", "after"), EXACTLY_ONCE_POINTS)
def test_a_dedupe_stage_exactly_once_holds_across_a_crash(
    world: World, step: str, at: int, after: bool
) -> None:
    crash_and_restart(world, dedupe_stage, "dedupe", True, step, at, after)
    check_deduplicated(world, exactly_once=True)


# --- Model stages -------------------------------------------------------------------------------


def model_stage(world: World, transport: Transport, exactly_once: bool, checkpoints: Path,
                checkpoint_every: int = CHECKPOINT_EVERY) -> ModelStage:
    config = ModelConfig.model_validate({
        "name": "model", "input": world.input, "output": world.output, "target": "y",
        "features": ["x"], "estimator": [{"linear_model.LinearRegression": {}}],
        "checkpoint": {"path": str(checkpoints), "every_records": checkpoint_every,
                       "every_seconds": 3600},
    })
    settings = EngineSettings(task="regression", target="y", metrics=["MAE"], rolling_window=100,
                              key_field=None, max_models=10, features_topic=world.input)
    spec = EngineSpec(settings, config.estimator, str(checkpoints), world.pipeline, "model",
                      checkpoint_every)
    metrics = PipelineMetrics(world.pipeline)
    return ModelStage(StageIdentity(world.pipeline, "model", world.input, world.dead_letters),
                      transport, BATCH, metrics.stage("model", ("model",)),
                      partial(metrics.model, "model"), config, spec, None, exactly_once,
                      PER_BATCH)


def checkpoint_headers(checkpoints: Path) -> dict[str, dict[str, Any]]:
    """The header of each partition state in the checkpoint store, by name (``in+<p>``; not
    the registry's versions)."""
    headers = {}
    for path in checkpoints.rglob("*.ckpt"):
        if "versions" in path.relative_to(checkpoints).parts:
            continue
        with open(path, "rb") as handle:
            handle.readline()
            header = json.loads(handle.readline())
        if header["kind"] == "partition-state":
            headers[header["name"]] = header
    return headers


def learned(checkpoints: Path) -> int:
    """Records learned by the checkpointed partition states (see test_exactly_once.py)."""
    return sum(sum(h["learned"].values()) for h in checkpoint_headers(checkpoints).values())


def expected_versions(world: World) -> dict[int, int]:
    """Valid record → the version of the model predicting it: its rank in its partition."""
    places = world.places()
    ranks: defaultdict[int, int] = defaultdict(int)
    versions = {}
    for number in sorted(world.valid(), key=places.__getitem__):
        partition = places[number][0]
        versions[number] = ranks[partition]
        ranks[partition] += 1
    return versions


def check_predictions(world: World, checkpoints: Path, exactly_once: bool) -> None:
    """Every valid record predicted (exactly once under ``exactly_once``) by a model that had
    learned each record before it once; every record learned once by the checkpointed
    states; every dead letter out."""
    records = [json.loads(v or b"") for v in world.read(world.output)]
    ids = Counter(r["id"] for r in records)
    assert set(ids) == world.valid(), f"lost: {sorted(world.valid() - set(ids))[:10]}"
    if exactly_once:
        assert [n for n, c in ids.items() if c > 1] == [], "predictions produced twice"
    versions = expected_versions(world)
    wrong = sorted((r["id"], r["model_version"], versions[r["id"]]) for r in records
                   if r["model_version"] != versions[r["id"]])
    assert wrong[:5] == [], "(id, model version, expected): records learned twice or skipped"
    assert learned(checkpoints) == len(world.valid()), "records learned twice, or skipped"
    check_dead_letters(world, exactly_once)


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_model_member_joining_mid_batch_takes_partitions_with_their_models(
    world: World, exactly_once: bool, tmp_path: Path
) -> None:
    """A second replica joins while the first produces a batch: the first checkpoints (only
    then: no checkpoint is due before) and hands its partitions over; the second restores their
    models and goes on. Nothing is
    predicted twice or learned twice, whatever the guarantee."""
    first, second, injector = harness.join_mid_batch(
        world, lambda transport: model_stage(world, transport, exactly_once, tmp_path,
                                             checkpoint_every=NEVER), "model",
        # Neither member is evicted while the first waits for the second's worker process.
        settings={"session.timeout.ms": "30000"}, ready=lambda second: second.worker is not None)
    run_to_end(first, second)
    assert harness.records_in(first) > 0 and harness.records_in(second) > 0
    assert world.all_committed(harness.group(world, "model"))
    assert harness.foreign_commits(injector) == [], \
        "the first member committed offsets of partitions it no longer owned (a rewind)"
    check_predictions(world, tmp_path, exactly_once=True)


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_model_stage_checkpoints_on_stop_and_a_restart_restores_its_models(
    world: World, exactly_once: bool, tmp_path: Path
) -> None:
    """Stopped mid-stream before any checkpoint was due, the stage checkpoints every partition
    at the offsets committed (at_least_once: by the checkpoint; exactly_once: by the batches).
    A restarted stage restores the models from the store and goes on without learning any
    record again: the versions of its predictions go on from the first stage's."""
    first = harness.stopped_mid_stream(
        world, lambda t: model_stage(world, t, exactly_once, tmp_path, checkpoint_every=NEVER))
    committed = world.cluster.committed_offsets(harness.group(world, "model"))
    headers = checkpoint_headers(tmp_path)
    assert {name: header["next_offsets"] for name, header in headers.items()} == {
        f"{world.input}+{p}": {world.input: committed[(world.input, p)]}
        for p in range(PARTITIONS)}, "the checkpoint does not cover the committed offsets"
    handled = sum(committed.values())
    assert 0 < handled < COUNT
    assert learned(tmp_path) == len(world.output_ids()) > 0
    restarts = Injector()
    restarted = model_stage(world, InjectedTransport(world.transport(), restarts), exactly_once,
                            tmp_path, checkpoint_every=NEVER)
    restarted.start()
    run_to_end(restarted)
    assert input_readers(restarts, world) == [], "the restarted stage learned records again"
    assert harness.records_in(first) + harness.records_in(restarted) == COUNT
    assert world.all_committed(harness.group(world, "model"))
    check_predictions(world, tmp_path, exactly_once=True)


MODEL_AT_LEAST_ONCE_POINTS = [
    ("produce", 3, False),  # before produce
    ("checkpoint", 2, False),  # between produce and checkpoint
    ("checkpoint", 2, True),  # between checkpoint and commit
    ("commit", 2, True),  # after commit
]
MODEL_EXACTLY_ONCE_POINTS = [
    ("produce", 3, False),  # before produce
    ("produce", 3, True),  # between produce and send_offsets
    ("send_offsets", 3, True),  # between send_offsets and commit
    ("commit_transaction", 3, True),  # after commit
    ("checkpoint", 2, True),  # between checkpoint and the next batch's commit
]


def crash_in_turn(world: World, exactly_once: bool, points: list[tuple[str, int, bool]],
                  checkpoints: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash a model stage at each point in turn (the ``at``-th call of the step since it
    started; before it, or with ``after`` right after it), each time restarted and given
    ``COUNT`` more input records; then run a last restart to the end.

    One model stage after the other rather than a test per point: each starts a worker process
    (about 2 s). A checkpoint counts as the step "checkpoint": its files put in place."""
    injectors: dict[threading.Thread, Injector] = {}
    publish = model_stage_module.publish

    def injected(staged: Any) -> None:
        injector = injectors.get(threading.current_thread())
        if injector is None:
            publish(staged)
        else:
            injector("checkpoint", lambda: publish(staged))

    monkeypatch.setattr(model_stage_module, "publish", injected)
    for number, (step, at, after) in enumerate(points):
        if number:
            world.load(COUNT)
        injector = Injector(step, at=at, after=after)
        stage = model_stage(world, InjectedTransport(world.transport(MODEL_FAILURE), injector),
                            exactly_once, checkpoints)
        injectors[stage.thread] = injector
        stage.start()
        harness.crashed(stage, injector)
    restarted = model_stage(world, world.transport(), exactly_once, checkpoints)
    restarted.start()
    run_to_end(restarted)
    assert world.all_committed(harness.group(world, "model"))


def test_a_model_stage_at_least_once_loses_nothing_across_crashes(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crashes before the output's produce, between it and the checkpoint, between the
    checkpoint and the commit of its offsets, and after that commit."""
    crash_in_turn(world, False, MODEL_AT_LEAST_ONCE_POINTS, tmp_path, monkeypatch)
    check_predictions(world, tmp_path, exactly_once=False)


def test_a_model_stage_exactly_once_holds_across_crashes(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crashes before a batch's produce, between it and send_offsets, between send_offsets and
    commit_transaction, after the commit, and right after a checkpoint's files were put in
    place (which under exactly_once commits nothing)."""
    crash_in_turn(world, True, MODEL_EXACTLY_ONCE_POINTS, tmp_path, monkeypatch)
    check_predictions(world, tmp_path, exactly_once=True)


def crash_before_any_checkpoint(world: World, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> StageRunner:
    """An exactly_once model stage that consumed (and committed) the whole input and crashed
    publishing its first checkpoint, on stop."""
    publish = model_stage_module.publish
    crashing: set[threading.Thread] = set()

    def refused(staged: Any) -> None:
        if threading.current_thread() in crashing:
            raise harness.Crash("checkpoint")
        publish(staged)

    monkeypatch.setattr(model_stage_module, "publish", refused)
    first = model_stage(world, world.transport(), True, tmp_path, checkpoint_every=NEVER)
    crashing.add(first.thread)
    first.start()
    harness.wait_until(lambda: caught_up(first), "the input consumed to its end")
    first.stop()
    first.thread.join(harness.TIMEOUT_S)
    return first


def test_a_model_stage_exactly_once_catches_up_a_partition_with_nothing_left_to_read(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its input all committed by batches (exactly_once) but no checkpoint in place, a stage
    crashes; the one restarted after it gets no record, yet learns the committed records
    again at assignment, so its checkpoint on stop covers every record once."""
    first = crash_before_any_checkpoint(world, tmp_path, monkeypatch)
    assert isinstance(first.error, harness.Crash) and learned(tmp_path) == 0
    assert world.all_committed(harness.group(world, "model"))
    restarted = model_stage(world, world.transport(), True, tmp_path, checkpoint_every=NEVER)
    restarted.start()
    run_to_end(restarted)
    assert harness.records_in(restarted) == 0
    assert learned(tmp_path) == len(world.valid())


def test_a_model_stage_exactly_once_catches_up_once_unknown_committed_offsets_are_known(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but a crashed producer's open transaction holds the group's offsets while the
    restarted stage is assigned its partitions, none of which has a record left: the stage asks
    again until the transaction times out, then learns the committed records."""
    crash_before_any_checkpoint(world, tmp_path, monkeypatch)
    group = harness.group(world, "model")
    committed = world.cluster.committed_offsets(group)
    zombie = world.transport().consumer(group, [world.input])

    def zombie_assigned() -> bool:
        zombie.consume_batch(1, 0.05)
        return bool(zombie.assignment())

    harness.wait_until(zombie_assigned, "the zombie's partitions")
    producer = world.transport({"transaction.timeout.ms": "12000"}).producer("crashed")
    producer.begin_transaction()
    producer.send_offsets_to_transaction({(world.input, 0): committed[(world.input, 0)]}, zombie)
    zombie.close()  # its transaction stays open until it times out
    restarted = model_stage(world, world.transport(), True, tmp_path, checkpoint_every=NEVER)
    restarted.start()
    run_to_end(restarted)
    assert harness.records_in(restarted) == 0
    assert learned(tmp_path) == len(world.valid())


def zombie_stalls(world: World, build: Callable[[Transport], StageRunner], stage: str,
                  exactly_once: bool) -> None:
    """The stage ``build`` makes stalls inside its third produce past its session: a second
    replica takes every partition, runs to the end and stops. The zombie then wakes and finds
    its partitions lost: under exactly_once its transaction is fenced by the group generation
    and it fails; else it joins again, gets every partition and is stopped."""
    # Evicted quickly, but its transaction must outlive the stall so that the fencing shows.
    transport = world.transport({**harness.FAST_FAILURE, "transaction.timeout.ms": "60000"})

    def stall() -> None:
        second = build(world.transport())
        second.start()
        harness.wait_until(lambda: len(world.cluster.members(harness.group(world, stage))) == 1
                           and second.assigned, "the zombie's eviction")
        run_to_end(second)

    zombie = build(InjectedTransport(transport, Injector("produce", 3, hook=stall,
                                                          topics={CHANGELOG: "snapshot"})))
    zombie.start()
    harness.wait_until(lambda: zombie.error is not None or caught_up(zombie), "the zombie")
    zombie.stop()
    zombie.thread.join(harness.TIMEOUT_S)
    assert not zombie.thread.is_alive()
    if exactly_once:
        assert zombie.error is not None and "generation" in str(zombie.error)
    else:
        assert zombie.error is None


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_window_zombie_evicted_mid_batch_leaves_a_state_to_restore(
    world: World, exactly_once: bool
) -> None:
    """After the zombie (see zombie_stalls), the changelog may hold its stale snapshots; a
    restarted stage must still restore and replay into each partition's windows exactly the
    records before its committed offset: every window whole, and under exactly_once once."""
    zombie_stalls(world, lambda t: window_stage(world, t, exactly_once), "window", exactly_once)
    world.load(COUNT)
    restarted = window_stage(world, world.transport(), exactly_once)
    restarted.start()
    run_to_end(restarted)
    check_windows(world, exactly_once)


@pytest.mark.parametrize("exactly_once", [
    pytest.param(False, id="at_least_once"),
    pytest.param(True, id="exactly_once"),
])
def test_a_model_zombie_evicted_mid_batch_leaves_the_new_owners_checkpoint_alone(
    world: World, exactly_once: bool, tmp_path: Path
) -> None:
    """The first replica stalls inside a produce past its session; the second takes every
    partition, runs to the end and stops, checkpointing them. When the zombie wakes, its
    partitions are lost (exactly_once: its transaction is fenced by the group generation and
    the stage fails); the checkpoint store must still hold the second's states, which cover
    the committed offsets, with every record learned once."""
    zombie_stalls(world, lambda t: model_stage(world, t, exactly_once, tmp_path), "model",
                  exactly_once)
    committed = world.cluster.committed_offsets(harness.group(world, "model"))
    assert {name: header["next_offsets"] for name, header in checkpoint_headers(tmp_path).items()
            } == {f"{world.input}+{p}": {world.input: committed[(world.input, p)]}
                  for p in range(PARTITIONS)}, "the checkpoint does not cover the committed offsets"
    check_predictions(world, tmp_path, exactly_once)


def test_a_model_stage_whose_checkpoint_on_revoke_fails_restarts(world: World, tmp_path: Path
                                                                  ) -> None:
    """A second replica joins while the first has a batch in flight (its replies held back),
    and the first's produce of that batch, in the checkpoint before its partitions go, fails
    (a broker error: transient). The stage must fail of that error, for the supervisor to
    restart it, not of asking its worker to forget the partitions with replies still pending
    (a fatal error, which stopped the pipeline)."""
    transport = world.transport({"session.timeout.ms": "30000"})
    first_replies_held: list[bool] = []
    second_started: list[bool] = []
    refused: list[str] = []

    class RefusedOnRevoke(Injector):
        """Holds the first's replies back from its third produce on; at its next poll with a
        batch in flight, starts the second; refuses its produce in the revoke that follows."""

        def __call__(self, step: str, action: Callable[[], Any]) -> Any:
            if step == "consume" and first_replies_held and first._in_flight and not second_started:
                second_started.append(True)
                second.start()
            elif step == "produce" and first_replies_held and any(
                    frame.function == "on_revoke" for frame in inspect.stack()):
                refused.append(step)
                raise TransportError("refused by the broker")
            return super().__call__(step, action)

    def hold_replies() -> None:
        assert first.worker is not None
        first.worker.ready = lambda: False
        first_replies_held.append(True)

    first = model_stage(world, InjectedTransport(transport, RefusedOnRevoke(
        "produce", 3, hook=hold_replies)), True, tmp_path, checkpoint_every=NEVER)
    second = model_stage(world, transport, True, tmp_path, checkpoint_every=NEVER)
    first.start()
    first.thread.join(harness.TIMEOUT_S)
    second.stop()
    second.thread.join(harness.TIMEOUT_S)
    assert refused, "no produce was refused in the revoke: nothing was in flight"
    assert isinstance(first.error, TransportError), f"the stage failed of {first.error!r}"
