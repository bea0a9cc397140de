"""A sink stage evicted from its group while its sink holds unflushed rows: those rows must never
be made durable, since the partitions' next owner writes them. A table sink keeps them in one
open transaction (DuckDB here), which a later flush would commit along with newer rows (here
DuckDB's offsets table refuses that commit, and the member failed, before the stage reopened
the sink of a member that lost its partitions)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from connectors.sinks.duckdb import DuckDBConfig, DuckDBSink
from streamflow.config.models import BatchConfig
from streamflow.metrics import PipelineMetrics
from streamflow.plugins import ComponentContext
from streamflow.runtime.stages import SinkStage, StageIdentity
from streamflow.transport import TopicPartition, Transport
from tests import stage_harness as harness
from tests.stage_harness import COUNT, PARTITIONS, World

BATCH = BatchConfig(max_records=25, max_wait_ms=10)


@pytest.fixture
def world() -> Iterator[World]:
    yield from harness.new_world("sinkloss")


class StallingSink(DuckDBSink):
    """A DuckDB sink that, at its third write (rows in its open transaction), lets ``stall``
    run: its stage polls no more meanwhile, and is evicted."""

    def __init__(self, config: DuckDBConfig, context: ComponentContext, stall: object) -> None:
        super().__init__(config, context)
        self.stall = stall
        self.writes = 0

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        super().write(table, partition, first_offset)
        self.writes += 1
        if self.writes == 3:
            self.stall()  # type: ignore[operator]


def sink_stage(world: World, transport: Transport, path: Path, stall: object = None) -> SinkStage:
    """A sink stage on the DuckDB file ``path``; with ``stall``, one that flushes only when it
    stops (so that it polls, and learns of its loss, before it flushes again)."""
    config = DuckDBConfig(path=str(path), table="events")
    context = ComponentContext(world.pipeline, "sink")
    sink = StallingSink(config, context, stall) if stall else DuckDBSink(config, context)
    metrics = PipelineMetrics(world.pipeline)
    return SinkStage(StageIdentity(world.pipeline, "sink", world.input, world.dead_letters),
                     transport, BATCH, metrics.stage("sink"), sink, metrics.sink("sink"),
                     3600 if stall else 0.2)


def caught_up(stage: SinkStage) -> bool:
    consumer = stage.consumer
    if consumer is None:
        return False
    lags = consumer.lag()
    return len(lags) == PARTITIONS and not any(lags.values())


def test_an_evicted_sink_member_never_commits_the_rows_it_had_not_flushed(
    world: World, tmp_path: Path
) -> None:
    """The first member stalls inside a write past its session; a second takes every partition,
    writes everything and stops. The first wakes, finds its partitions lost, joins again and
    writes the records loaded since: every record is in the table exactly once."""
    path = tmp_path / "sink.duckdb"
    with duckdb.connect(str(path)) as connection:  # no member creates it: DuckDB would refuse
        connection.execute("CREATE TABLE events (id BIGINT, ts BIGINT, x BIGINT, y BIGINT)")

    def stall() -> None:
        second = sink_stage(world, world.transport(), path)
        second.start()
        harness.wait_until(lambda: len(world.cluster.members(harness.group(world, "sink"))) == 1
                           and second.assigned, "the first member's eviction")
        harness.wait_until(lambda: caught_up(second), "the second member at the end")
        harness.finish(second)

    zombie = sink_stage(world, world.transport(harness.FAST_FAILURE), path, stall)
    zombie.start()
    harness.wait_until(lambda: isinstance(zombie.sink, StallingSink) and zombie.sink.writes >= 3
                       and (caught_up(zombie) or zombie.error is not None),
                       "the first member back at the end")
    assert zombie.error is None, zombie.error
    world.load(COUNT)  # more records, written by the first member after its loss
    harness.wait_until(lambda: caught_up(zombie), "the first member at the new end")
    harness.finish(zombie)
    with duckdb.connect(str(path)) as connection:
        ids = [row[0] for row in connection.execute("SELECT id FROM events").fetchall()]
    repeated = [record for record, count in collections.Counter(ids).items() if count > 1]
    assert repeated == [], f"{len(repeated)} records written twice"
    assert set(ids) == world.valid()
