"""The plugin API: the contracts of sources, sinks and processor steps, and their discovery.

Built-in connectors (``connectors/``) use exactly this API and register through the same entry
point groups a third-party package uses::

    [project.entry-points."streamflow.sinks"]
    mysink = "my_package.sink:MySink"
"""

from __future__ import annotations

import functools
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from streamflow.transport.base import TopicPartition, Transport

if TYPE_CHECKING:  # in annotations only: the model worker imports this module, not pyarrow
    import pyarrow as pa

SOURCE_GROUP = "streamflow.sources"
SINK_GROUP = "streamflow.sinks"
PROCESSOR_GROUP = "streamflow.processors"

ConfigT = TypeVar("ConfigT", bound=BaseModel)


@dataclass(frozen=True)
class ComponentContext:
    """Where a component runs: its pipeline and its own name (also the metrics labels), and the
    pipeline's Kafka transport for connectors that talk to Kafka themselves (None outside a run)."""

    pipeline: str
    name: str
    transport: Transport | None = None


@dataclass
class SourceBatch:
    """Records a source emits: serialized values with optional keys and event timestamps (ms)."""

    values: list[bytes]
    keys: list[bytes | None] = field(default_factory=list)
    timestamps_ms: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class SettingProblem:
    """A setting that would make a run fail or do nothing, found before the run: the setting's
    name, what is wrong and how to fix it (``streamflow validate`` reports it as an error)."""

    setting: str
    message: str
    hint: str


class Source(ABC, Generic[ConfigT]):
    """Reads an external system and emits records to the source's topic.

    Contract:
    - :meth:`open` receives the last checkpointed position (None on the first run) and resumes
      from it, so that nothing is skipped or repeated.
    - :meth:`poll` returns the next records, an empty batch when nothing is ready yet, or None
      once a bounded source is exhausted. It never blocks much longer than ``timeout_s``.
    - :meth:`position` describes the point just after the last polled record, as JSON-able data.
      The runtime checkpoints it only after Kafka has acknowledged every record polled before it.
    - :meth:`acknowledged` is then called with that same position: every record polled before it
      is in Kafka and the position is checkpointed. Sources that cannot replay (a webhook, an
      MQTT subscription) answer or acknowledge their senders only here, which makes them
      at-least-once; replayable sources can ignore it (e.g. to commit an upstream cursor).
    - :meth:`dead_lettered` is called before that, from the same thread, when records of the
      batch last polled went to the dead-letter topic instead (Kafka refused them for their size):
      a source that answers its senders can tell them (the webhook answers 413).
    - :meth:`problems` (optional, a class method) names settings that would make a run fail or
      read nothing, such as a file that does not exist; ``streamflow validate`` and ``streamflow
      run`` refuse the pipeline with them.
    """

    config_model: ClassVar[type[BaseModel]]

    def __init__(self, config: ConfigT, context: ComponentContext) -> None:
        self.config = config
        self.context = context

    @abstractmethod
    def open(self, position: Any | None) -> None:
        """Prepare to read, resuming after ``position``."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float) -> SourceBatch | None:
        """Up to ``max_records`` new records; None when a bounded source has nothing more."""

    @abstractmethod
    def position(self) -> Any:
        """The resume point after the last record returned by :meth:`poll`."""

    def acknowledged(self, position: Any) -> None:
        """Every record polled before ``position`` (a value :meth:`position` returned) is durable
        in Kafka and ``position`` is checkpointed. Called from the thread that polls."""

    def dead_lettered(self, indices: list[int], topic: str) -> None:
        """The records at ``indices`` of the batch last returned by :meth:`poll` are in the
        dead-letter ``topic``, not the source's topic: Kafka refused them for their size (the
        others of the batch are in the source's topic). Called from the thread that polls, after
        the batch is durable and before :meth:`acknowledged`; the default does nothing."""

    def close(self) -> None:
        """Release resources."""

    @classmethod
    def problems(cls, config: ConfigT) -> list[SettingProblem]:
        """What in settings ``config`` would make a run fail or read nothing, found without
        reading (a file that does not exist); none by default."""
        return []


class TransientError(Exception):
    """A failure worth retrying (a service briefly unreachable, a timeout): the runtime restarts
    the component with exponential backoff instead of stopping the pipeline."""


class SinkRecordError(Exception):
    """Raised by a sink for records it cannot write; they are dead-lettered, the rest goes on.

    ``rows`` index the table given to :meth:`Sink.write`; ``error`` is the reason for all of
    them, or a sequence with one reason per row.
    """

    def __init__(self, rows: Sequence[int], error: BaseException | Sequence[BaseException]) -> None:
        self.rows = list(rows)
        self.errors = [error] * len(self.rows) if isinstance(error, BaseException) else list(error)
        if len(self.errors) != len(self.rows):
            raise ValueError("SinkRecordError needs one error per row, or a single error")
        super().__init__("; ".join(dict.fromkeys(str(error) for error in self.errors)))


class Sink(ABC, Generic[ConfigT]):
    """Makes records durable outside Kafka.

    Contract:
    - :meth:`write` receives consecutive records of one topic-partition as an Arrow table, in
      offset order. It may buffer them; records it cannot write raise :class:`SinkRecordError`
      (they are dead-lettered); a failure worth retrying raises :class:`TransientError`.
    - :meth:`flush` makes everything written so far durable. ``offsets`` holds, per partition
      written since the last flush, the next offset to read: every record before it was written,
      dead-lettered or skipped. The runtime commits these offsets to Kafka only after
      :meth:`flush` returns, so a crash before then replays the records (at-least-once); a sink
      that names its output by topic, partition and first offset turns replays into overwrites.
      The runtime flushes every ``runtime.commit_interval_s``, and earlier whenever
      :meth:`should_flush` says so (a file reached its size, for example).
    - Exactly-once: a sink that stores ``offsets`` (with ``cluster_id``, the Kafka cluster they
      belong to) atomically with its data implements :meth:`resume_offsets`. On assignment the
      runtime asks it where each partition stands and skips records below the returned offset
      (they count as filtered), so a replay after a crash between the sink's commit and Kafka's
      writes nothing twice.
    - :meth:`revoke` is called before partitions move to another replica: drop their buffers,
      never flush them (the runtime flushes and commits first, so dropping is safe; when the
      stage was evicted from its group, the partitions are lost and their rows must not be
      made durable: they replay at the next owner; the runtime then also closes the sink and
      opens it again, which discards whatever was written and not flushed).
    - :meth:`close` releases resources; anything written but not flushed (after a failure) is
      discarded, to be replayed.
    - Row-level lineage (docs/lineage.md), when the sink's ``lineage_columns`` or
      ``lineage_manifest`` is on: the tables :meth:`write` gets end with lineage columns (their
      count is in the schema's metadata: ``streamflow.runtime.row_lineage.lineage_count``), and
      during each :meth:`flush` ``lineage_manifest`` holds that commit's manifest (a JSON-able
      mapping), which a sink that can stores with the commit.
    """

    config_model: ClassVar[type[BaseModel]]
    lineage_manifest: Mapping[str, Any] | None = None  # set by the runtime during flush

    def __init__(self, config: ConfigT, context: ComponentContext) -> None:
        self.config = config
        self.context = context

    def open(self) -> None:
        """Connect, create directories or tables."""

    @abstractmethod
    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        """Accept records of ``partition`` starting at ``first_offset``."""

    @abstractmethod
    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int | None:
        """Make every record passed to :meth:`write` durable; return the bytes written if known."""

    def should_flush(self) -> bool:
        """True when buffered records should be flushed now, before the commit interval."""
        return False

    def resume_offsets(
        self, partitions: Sequence[TopicPartition], cluster_id: str
    ) -> dict[TopicPartition, int]:
        """For sinks that store offsets with their data: the next offset stored for each of
        ``partitions`` by flushes on ``cluster_id`` (partitions without one are left out)."""
        return {}

    def revoke(self, partitions: Sequence[TopicPartition]) -> None:
        """Forget state and buffered rows of partitions that are moving away, without writing."""

    def close(self) -> None:
        """Release resources, discarding records written since the last :meth:`flush`."""


@dataclass
class StepResult:
    """What a processor step returns.

    ``table`` holds the records that go on. ``failures`` lists input rows (indices into the table
    the step received) that must be dead-lettered, each with its error. Rows that are neither in
    ``table`` nor in ``failures`` count as filtered.
    """

    table: pa.Table
    failures: list[tuple[int, BaseException]] = field(default_factory=list)


class PartitionedState(ABC):
    """State kept per input partition, which the stage core restores, snapshots and revokes.

    A processor step that keeps state across batches (``dedupe`` does) implements this beside
    :class:`Processor`; the stage's event-time windows do too. The core of a stage with such
    state owns its lifecycle, the same for every kind:

    - Each row the step gets carries its input partition in the column :data:`PARTITION_COLUMN`.
    - :meth:`restore` is called for each partition assigned to this member before its first
      record is handled, with the bytes :meth:`snapshot` last returned for it (from the stage's
      compacted changelog topic) or None to start empty. The core then replays the input records
      between the snapshot and where the consumer resumed, output discarded, so that the state
      is exactly as if nothing had stopped.
    - :meth:`snapshot` is called every ``checkpoint.every_records`` records or ``every_seconds``,
      on revoke and on shutdown, for each partition handled since the last one; the core writes
      the bytes to the changelog, and commits the input offsets they cover only after that.
    - :meth:`revoke` forgets a partition this member no longer owns (after a snapshot of it,
      unless the member lost it by eviction).
    """

    @abstractmethod
    def restore(self, partition: int, snapshot: bytes | None) -> None:
        """Take ``partition`` from ``snapshot`` (None: start empty); raise ValueError for a
        snapshot this state cannot read, which then starts empty."""

    @abstractmethod
    def snapshot(self, partition: int) -> bytes:
        """The state of ``partition``, as bytes that :meth:`restore` takes back."""

    @abstractmethod
    def revoke(self, partition: int) -> None:
        """Forget ``partition``."""


class Processor(ABC, Generic[ConfigT]):
    """A step of a processor stage, on Arrow micro-batches.

    Contract: :meth:`process` gets a table whose column ``_sf_row`` identifies each record; every
    output row must keep the ``_sf_row`` of the input row it came from (vectorised operations and
    ``SELECT *`` do this by themselves). It raises only for failures of the whole batch, which
    then fail as a whole under the step's ``on_error`` policy.

    ``config_model`` validates the step's settings (the value under its kind in YAML; use a
    pydantic ``RootModel`` for a scalar or a plain mapping). ``input_schema``, when a step sets
    it and is the first of its stage, makes the stage parse records straight into that schema.

    Capabilities a step may declare:

    - ``reads_raw_records = True``: as the first step of its stage, the step gets the record values
      undecoded, as a binary ``value`` column (with ``_sf_row``), and decodes them itself; values
      it cannot decode are its own per-record failures (the ``parse`` step does this).
    - Routing: a step may set a string column named :data:`TOPIC_COLUMN` (``_sf_topic``); each
      row then goes to that topic instead of the stage's ``output`` (null: the output). The
      column is the runtime's: it never reaches the records. :meth:`output_topics` names the
      topics a step can choose, so that the pipeline creates them (the ``route`` step does this).
    - State kept across batches: a step that is also a :class:`PartitionedState` keeps it per
      input partition, checkpointed and restored by its stage (the ``dedupe`` step does this).
    """

    name: str = "step"
    config_model: ClassVar[type[BaseModel]]
    input_schema: pa.Schema | None = None
    reads_raw_records: ClassVar[bool] = False

    def __init__(self, config: ConfigT, context: ComponentContext) -> None:
        self.config = config
        self.context = context

    @abstractmethod
    def process(self, table: pa.Table) -> StepResult:
        """Transform one micro-batch."""

    @classmethod
    def output_topics(cls, config: ConfigT) -> list[str]:
        """The topics a step with settings ``config`` can send rows to through
        :data:`TOPIC_COLUMN`, besides its stage's output; none by default."""
        return []


ROW_ID = "_sf_row"
PARTITION_COLUMN = "_sf_partition"  # a row's input partition, for a PartitionedState step
TOPIC_COLUMN = "_sf_topic"  # a row's output topic, when a step set it (see Processor)
GROUP_BASES: dict[str, type] = {SOURCE_GROUP: Source, SINK_GROUP: Sink, PROCESSOR_GROUP: Processor}


class PluginNotFoundError(LookupError):
    """No installed connector has the requested name."""


def discover(group: str) -> dict[str, Any]:
    """Installed plugins of an entry point group, by name (loaded lazily by :func:`load`)."""
    return dict(_installed(group))


@functools.cache
def _installed(group: str) -> dict[str, Any]:
    """The entry points of ``group``, read once a process (a scan of every installed package
    takes milliseconds, and building a pipeline looks plugins up dozens of times): like Kafka
    Connect's plugin path, a plugin installed later is seen by the next process."""
    return {entry.name: entry for entry in entry_points(group=group)}


_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load(group: str, name: str) -> type[Any]:
    """The class registered as ``name`` in ``group``, or named directly as ``module:Class``
    (as Kafka Connect names ``connector.class``) for plugins not packaged with entry points."""
    if _CLASS_PATH.match(name):
        module_name, class_name = name.split(":")
        try:
            plugin = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise PluginNotFoundError(f"cannot import {name!r}: {exc}") from None
        base = GROUP_BASES[group]
        if not (isinstance(plugin, type) and issubclass(plugin, base)):
            raise PluginNotFoundError(f"{name!r} is not a {base.__name__} subclass")
        return plugin
    found = discover(group)
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise PluginNotFoundError(f"unknown type {name!r} (installed: {known})")
    return found[name].load()


__all__ = [
    "PARTITION_COLUMN",
    "PROCESSOR_GROUP",
    "ROW_ID",
    "SINK_GROUP",
    "SOURCE_GROUP",
    "TOPIC_COLUMN",
    "ComponentContext",
    "PartitionedState",
    "PluginNotFoundError",
    "Processor",
    "SettingProblem",
    "Sink",
    "SinkRecordError",
    "Source",
    "SourceBatch",
    "StepResult",
    "TransientError",
    "discover",
    "load",
]
