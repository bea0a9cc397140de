"""Bounded runs (``streamflow run FILE --from ... --until ... --output-suffix S``): the pipeline's
stages over a fixed range of its entry topics, into outputs of their own (docs/backfills.md).

The entry topics are the topics the stages read that no stage writes (the sources' topics, and
external ones). The run reads them from ``--from`` up to ``--until`` (exclusive) through
:class:`BoundedTransport`, which hands out no record outside that range, and the stages stay as
they are. Everything else is renamed with the suffix (see :func:`backfill_config`): the pipeline
(so every consumer group, changelog, transactional id and model checkpoint store), every topic
the stages write, and every sink's output, so nothing of the live pipeline is touched. Sources
do not run. The run stops once every stage is idle with nothing left in its range.
"""

from __future__ import annotations

import gc
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamflow.config.models import (
    DURATION,
    SUFFIX,
    MetricsConfig,
    ModelConfig,
    PipelineConfig,
    parse_duration,
)
from streamflow.metrics import PipelineMetrics
from streamflow.runtime.pipeline import PipelineRunner, RunResult, config_hash
from streamflow.transport import Transport
from streamflow.transport.base import (
    Admin,
    ConsumedBatch,
    Consumer,
    Producer,
    Reader,
    RebalanceListener,
    TopicPartition,
)

DRAINED_S = 1.0  # every stage idle this long with nothing left in its range: the run is done
JOIN_TIMEOUT_S = 60.0
SUFFIX_PATTERN = re.compile(SUFFIX)
RELATIVE = re.compile(DURATION)
OFFSET_ITEM = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+):(?P<partition>\d+)=(?P<offset>\d+)$")
FRESH = "fresh"


class BackfillError(ValueError):
    """A bounded run that cannot be done as asked (bad bounds, a used suffix, an unfit pipeline)."""


@dataclass(frozen=True)
class Bound:
    """One end of a range: a moment, or an offset per topic-partition."""

    text: str
    moment: datetime | None = None
    offsets: Mapping[TopicPartition, int] | None = None


def parse_bound(text: str, now: datetime, offsets: bool = True) -> Bound:
    """``text`` as an ISO time (UTC unless it says otherwise), a time relative to ``now``
    (``-1d``, ``0d``) or, where ``offsets`` allows, ``topic:partition=offset,...``."""
    text = text.strip()
    if offsets and "=" in text:
        found: dict[TopicPartition, int] = {}
        for item in text.split(","):
            match = OFFSET_ITEM.match(item.strip())
            if match is None:
                raise ValueError(f"{item.strip()!r} is not topic:partition=offset")
            place = (match["topic"], int(match["partition"]))
            if place in found:
                raise ValueError(f"{place[0]}:{place[1]} is given twice")
            found[place] = int(match["offset"])
        return Bound(text, offsets=found)
    if RELATIVE.match(text):
        return Bound(text, moment=now + parse_duration(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        kinds = "an ISO time (2026-12-01T00:00:00Z) or a relative time (-1d, 0d)"
        raise ValueError(f"{text!r} is neither {kinds}"
                         + (" nor offsets (topic:partition=offset,...)" if offsets else "")) from None
    return Bound(text, moment=moment if moment.tzinfo else moment.replace(tzinfo=UTC))


@dataclass(frozen=True)
class BackfillPlan:
    """What a bounded run reads and where its outputs go."""

    start: Bound
    until: Bound | None  # None: the entry topics' ends when the run starts
    suffix: str
    model_checkpoint: str = FRESH  # or a checkpoint store's directory, or a registry version

    @classmethod
    def parse(cls, start: str | None, until: str | None, suffix: str | None,
              model_checkpoint: str | None = None, now: datetime | None = None) -> BackfillPlan:
        """From the command line's options; BackfillError naming the option at fault."""
        now = now or datetime.now(UTC)
        errors = []
        if not start:
            errors.append("--from: a bounded run needs a start")
        if not suffix:
            errors.append("--output-suffix: a bounded run writes to outputs of its own: name "
                          "their suffix")
        elif not SUFFIX_PATTERN.match(suffix):
            errors.append(f"--output-suffix: {suffix!r} must be letters, digits, '_' and '-' "
                          "(at most 100, starting with a letter or digit)")
        bounds: dict[str, Bound | None] = {"--from": None, "--until": None}
        for option, text in (("--from", start), ("--until", until)):
            if text:
                try:
                    bounds[option] = parse_bound(text, now)
                except ValueError as exc:
                    errors.append(f"{option}: {exc}")
        first, last = bounds["--from"], bounds["--until"]
        if first and last and first.moment and last.moment and last.moment < first.moment:
            errors.append(f"--until: {last.text} is before --from {first.text}")
        if errors:
            raise BackfillError("; ".join(errors))
        assert first is not None and suffix is not None
        return cls(first, last, suffix, model_checkpoint or FRESH)


def entry_topics(config: PipelineConfig) -> list[str]:
    """The topics the stages read that no stage writes."""
    read = {stage.input for stage in [*config.processors, *config.models, *config.sinks]}
    read |= {model.labels.topic for model in config.models if model.labels}
    written = {stage.output for stage in [*config.processors, *config.models]}
    written |= {config.dead_letter_topic(stage)
                for stage in [*config.processors, *config.models, *config.sinks]}
    written |= {config.drift_topic(model) for model in config.models if model.drift}
    written |= {config.models_topic(model) for model in config.models if model.promotion}
    written |= {config.late_topic(p.window) for p in config.processors if p.window}
    return sorted(read - written)


def _suffixed_path(path: str, suffix: str) -> str:
    return f"{path.rstrip('/')}.{suffix}"


def _suffixed_file(path: str, suffix: str) -> str:
    file = Path(path)
    return str(file.with_name(f"{file.stem}.{suffix}{file.suffix}"))


def _suffixed_table(table: str, suffix: str) -> str:
    return f"{table}_{suffix.replace('-', '_')}"


# How each sink type's output is renamed: the settings it changes.
SINK_OUTPUTS: dict[str, Any] = {
    "parquet": lambda s, x: {"path": _suffixed_path(s["path"], x)},
    "delta": lambda s, x: {"path": _suffixed_path(s["path"], x)},
    "duckdb": lambda s, x: {"path": _suffixed_file(s["path"], x)},
    "postgres": lambda s, x: {"table": _suffixed_table(s["table"], x), "offsets_table":
                              _suffixed_table(s.get("offsets_table", "streamflow_offsets"), x)},
    "iceberg": lambda s, x: {"table": _suffixed_table(s["table"], x)},
    "kafka": lambda s, x: {"topic": f"{s['topic']}.{x}"},
    "console": lambda s, x: {},
}


def backfill_errors(config: PipelineConfig) -> list[str]:
    """Why ``config`` cannot run bounded, each with its field path."""
    errors = []
    if config.kafka.bootstrap == "embedded":
        errors.append("kafka.bootstrap: a bounded run reads topics that outlive it; the embedded "
                      "broker keeps them in memory for one run only")
    for number, processor in enumerate(config.processors):
        if processor.type == "faust":
            errors.append(f"processors[{number}]: a faust stage reads Kafka itself, so its input "
                          "cannot be bounded")
        for step_number, step in enumerate(processor.steps):
            if step.output_topics():
                errors.append(f"processors[{number}].steps[{step_number}]: a {step.kind} step "
                              "writes topics of its own, which a bounded run cannot rename yet")
    for number, sink in enumerate(config.sinks):
        if sink.type not in SINK_OUTPUTS:
            errors.append(f"sinks[{number}].type: a bounded run does not know how to give a "
                          f"{sink.type} sink an output of its own (it knows "
                          f"{', '.join(sorted(SINK_OUTPUTS))})")
    if not entry_topics(config):
        errors.append("a bounded run needs a stage reading a topic that no stage writes")
    return errors


def backfill_config(config: PipelineConfig, suffix: str) -> PipelineConfig:
    """``config`` for a bounded run: no sources nor schedules; the pipeline, every topic the
    stages write and every sink's output renamed with ``suffix``; a metrics port of its own."""
    if errors := backfill_errors(config):
        raise BackfillError("; ".join(errors))
    keep = set(entry_topics(config))

    def rename(topic: str | None) -> str | None:
        return topic if topic is None or topic in keep else f"{topic}.{suffix}"

    data = config.model_dump(mode="json", by_alias=True)
    data["pipeline"] = f"{config.pipeline}.{suffix}"
    data["sources"], data["schedules"] = [], []
    data["metrics"]["port"] = 0
    for topic in data["topics"]:
        topic["name"] = rename(topic["name"])
    for processor in data["processors"]:
        for name in ("input", "output", "dead_letter"):
            processor[name] = rename(processor.get(name))
        if processor.get("window"):
            processor["window"]["late_topic"] = rename(processor["window"].get("late_topic"))
    for model in data["models"]:
        for name in ("input", "output", "dead_letter"):
            model[name] = rename(model.get(name))
        model["serving"] = None  # the live pipeline's server keeps its port
        for block in ("labels", "drift", "promotion"):
            if model.get(block):
                model[block]["topic"] = rename(model[block].get("topic"))
    for sink, original in zip(data["sinks"], config.sinks, strict=True):
        sink["input"], sink["dead_letter"] = rename(sink["input"]), rename(sink.get("dead_letter"))
        sink.update(SINK_OUTPUTS[original.type](original.connector_settings(), suffix))
    return PipelineConfig.model_validate(data)


class BoundedConsumer(Consumer):
    """``inner``, handing out no record of a bounded partition outside its range, and measuring
    the lag of such a partition up to its range's end."""

    def __init__(self, inner: Consumer, ranges: Mapping[TopicPartition, tuple[int, int]]) -> None:
        self.inner = inner
        self.ranges = ranges
        self._next: dict[TopicPartition, int] = {}  # past the last record seen, filtered or not

    def consume_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        batch = self.inner.consume_batch(max_records, timeout_s)
        self._next.update(batch.next_offsets())
        return _in_ranges(batch, self.ranges)

    def commit(self, offsets: Mapping[TopicPartition, int], asynchronous: bool = False) -> None:
        self.inner.commit(offsets, asynchronous)

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        return self.inner.committed(partitions)

    def assignment(self) -> list[TopicPartition]:
        return self.inner.assignment()

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        ends = self.inner.end_offsets(partitions)
        return {place: min(end, self.ranges[place][1]) if place in self.ranges else end
                for place, end in ends.items()}

    def lag(self) -> dict[TopicPartition, int]:
        """A bounded partition's records left in its range: none once the consumer is at the
        partition's end (its range ends there at the latest), else those after the last record
        seen (or the range's start)."""
        lag = self.inner.lag()
        for place, left in lag.items():
            if place in self.ranges and left:
                start, until = self.ranges[place]
                lag[place] = max(0, until - max(self._next.get(place, start), start))
        return lag

    def close(self) -> None:
        self.inner.close()


class BoundedReader(Reader):
    """``inner`` (started at the ranges' starts at the earliest), ending bounded partitions at
    their range's end."""

    def __init__(self, inner: Reader, ranges: Mapping[TopicPartition, tuple[int, int]]) -> None:
        self.inner = inner
        self.ranges = ranges

    def read_batch(self, max_records: int, timeout_s: float) -> ConsumedBatch:
        return _in_ranges(self.inner.read_batch(max_records, timeout_s), self.ranges)

    def position(self) -> dict[TopicPartition, int]:
        return self.inner.position()

    def end_offsets(self) -> dict[TopicPartition, int]:
        return {place: min(end, self.ranges[place][1]) if place in self.ranges else end
                for place, end in self.inner.end_offsets().items()}

    def offsets_for_times(self, timestamp_ms: int) -> dict[TopicPartition, int]:
        return self.inner.offsets_for_times(timestamp_ms)

    def close(self) -> None:
        self.inner.close()


def _in_ranges(batch: ConsumedBatch, ranges: Mapping[TopicPartition, tuple[int, int]]
               ) -> ConsumedBatch:
    rows = [row for row, (topic, partition, offset) in enumerate(
        zip(batch.topics, batch.partitions, batch.offsets, strict=True))
        if (bounds := ranges.get((topic, partition))) is None or bounds[0] <= offset < bounds[1]]
    return batch if len(rows) == len(batch) else batch.select(rows)


class BoundedTransport(Transport):
    """``inner``, with the partitions of ``ranges`` seen only within ``[from, until)``: their
    consumers and readers hand out nothing else, and readers start no earlier than ``from``."""

    def __init__(self, inner: Transport, ranges: Mapping[TopicPartition, tuple[int, int]]) -> None:
        super().__init__(inner.bootstrap, inner.client_config)
        self.inner = inner
        self.name = inner.name
        self.ranges = dict(ranges)
        self._topics = {topic for topic, _partition in ranges}

    def producer(self, transactional_id: str | None = None) -> Producer:
        return self.inner.producer(transactional_id)

    def consumer(self, group_id: str, topics: Sequence[str],
                 listener: RebalanceListener | None = None, read_committed: bool = True
                 ) -> Consumer:
        consumer = self.inner.consumer(group_id, topics, listener, read_committed)
        return BoundedConsumer(consumer, self.ranges) if self._topics & set(topics) else consumer

    def reader(self, start: Mapping[TopicPartition, int | None], read_committed: bool = True
               ) -> Reader:
        clamped = {place: max(offset or 0, self.ranges[place][0]) if place in self.ranges
                   else offset for place, offset in start.items()}
        return BoundedReader(self.inner.reader(clamped, read_committed), self.ranges)

    def admin(self) -> Admin:
        return self.inner.admin()

    def cluster_id(self) -> str:
        return self.inner.cluster_id()


def resolve_ranges(transport: Transport, plan: BackfillPlan, topics: Sequence[str]
                   ) -> dict[TopicPartition, tuple[int, int]]:
    """``[from, until)`` of every partition of ``topics``, times looked up in the broker."""
    admin = transport.admin()
    try:
        counts = admin.describe_topics(list(topics))
    finally:
        admin.close()
    if missing := sorted(set(topics) - set(counts)):
        raise BackfillError(f"entry topics {missing} do not exist: nothing to read")
    partitions = [(topic, number) for topic in topics for number in range(counts[topic])]
    reader = transport.reader(dict.fromkeys(partitions))
    try:
        ends = reader.end_offsets()
        firsts = reader.offsets_for_times(0)  # where each partition begins (after retention)
        start = _offsets(reader, plan.start, partitions, "--from")
        until = _offsets(reader, plan.until, partitions, "--until")
    finally:
        reader.close()
    if behind := [f"{t}:{p}" for (t, p) in partitions if until[(t, p)] < start[(t, p)]]:
        raise BackfillError(f"--until: before --from on {', '.join(behind)}")
    # A range holds only records that exist: from the partition's first record still kept, to
    # its end now at the latest (the run reads no later records, so it ends).
    ranges = {}
    for place in partitions:
        end = min(until[place], ends[place])
        ranges[place] = (min(max(start[place], firsts[place]), end), end)
    return ranges


def _offsets(reader: Reader, bound: Bound | None, partitions: list[TopicPartition], option: str
             ) -> dict[TopicPartition, int]:
    if bound is None:
        return reader.end_offsets()
    if bound.moment is not None:
        return reader.offsets_for_times(int(bound.moment.timestamp() * 1000))
    assert bound.offsets is not None
    if unknown := sorted(set(bound.offsets) - set(partitions)):
        raise BackfillError(f"{option}: {', '.join(f'{t}:{p}' for t, p in unknown)} is no "
                            f"partition of the entry topics "
                            f"({', '.join(sorted({t for t, _ in partitions}))})")
    if missing := [place for place in partitions if place not in bound.offsets]:
        raise BackfillError(f"{option}: give an offset for every partition of the entry topics; "
                            f"missing {', '.join(f'{t}:{p}' for t, p in missing)}")
    return dict(bound.offsets)


def start_groups(transport: Transport, groups: Mapping[str, Mapping[TopicPartition, int]]) -> None:
    """Commit each group's start offsets, so its stage begins at ``--from`` and not at the
    topic's beginning; BackfillError if a group has committed offsets already (the suffix was
    used before)."""
    for group, offsets in groups.items():
        consumer = transport.consumer(group, sorted({topic for topic, _ in offsets}))
        try:
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while not set(offsets) <= set(consumer.assignment()):
                if time.monotonic() > deadline:
                    raise BackfillError(f"group {group} got no assignment in {JOIN_TIMEOUT_S:g} s")
                consumer.consume_batch(1, 0.2)
            if used := {place for place, offset in consumer.committed(list(offsets)).items()
                        if offset is not None}:
                raise BackfillError(f"the output suffix was used before: group {group} has "
                                    f"committed offsets on {sorted(used)}; choose another "
                                    "--output-suffix")
            consumer.commit(offsets)
        finally:
            consumer.close()


Loaded = tuple[str, str, dict[str, Any], Any, Path]  # name, kind, header, payload, file


def _checkpoints(source: str, pipeline: str, model: ModelConfig) -> tuple[list[Loaded], str]:
    """The checkpoints of ``model``'s live stage that ``source`` names, and a description:
    the store under ``source`` when it is a directory (a ``checkpoint.path``), else the version
    of the stage's registry with that number or tag (or ``latest``)."""
    from streamflow.ml.checkpoint import CheckpointStore
    from streamflow.ml.registry import Registry, RegistryError

    if Path(source).is_dir():
        folder = Path(source) / pipeline / model.name
        if not folder.is_dir():
            raise BackfillError(f"--model-checkpoint: {folder} holds no checkpoint of model "
                                f"stage {model.name}")
        store = CheckpointStore(source, pipeline, model.name)
        found = []
        for name, kind in store.entries():
            if (loaded := store.load(name, kind)) is not None:
                found.append((name, kind, *loaded, store.path(name)))
        return found, f"store {source}"
    registry = Registry.of_stage(model.checkpoint.path, pipeline, model.name)
    try:
        number = registry.resolve(source)
        found = []
        for name, path in registry.files(number).items():
            if (loaded := registry.load_state(number, name)) is not None:
                found.append((name, "partition-state", *loaded, path))
            for model_path, _learned in registry.evicted_models(number, name).values():
                header, slot = registry.load_model(number, model_path)
                found.append((header["name"], "model", header, slot, model_path))
    except RegistryError as exc:
        raise BackfillError(f"--model-checkpoint: {source!r} is no directory, and model stage "
                            f"{model.name}'s registry says: {exc}") from None
    return found, f"version {number}"


def seed_model_checkpoints(original: PipelineConfig, config: PipelineConfig, source: str,
                           ranges: Mapping[TopicPartition, tuple[int, int]], cluster_id: str
                           ) -> str:
    """Fill the bounded run's checkpoint stores (empty: else the suffix was used) from
    ``source`` (see :func:`_checkpoints`), or leave them empty for ``fresh`` models; what was
    copied, with a digest of its files, or ``fresh``.

    A copied state's offsets belong to the live run: they are set to the range's start where
    the model reads an entry topic, else to nothing, so the copy learns from the range on."""
    from streamflow.ml.checkpoint import SUFFIX, CheckpointStore

    for model in config.models:
        store = Path(model.checkpoint.path) / config.pipeline / model.name
        if store.is_dir() and any(store.glob(f"*{SUFFIX}")):
            raise BackfillError(f"the output suffix was used before: {store} holds checkpoints; "
                                "choose another --output-suffix")
    if source == FRESH:
        return FRESH
    digest, described = hashlib.sha256(), set()
    for live, model in zip(original.models, config.models, strict=True):
        found, description = _checkpoints(source, original.pipeline, live)
        described.add(description)
        target = CheckpointStore(model.checkpoint.path, config.pipeline, model.name)
        for loaded in found:
            _copy_checkpoint(loaded, target, model, ranges, cluster_id)
            digest.update(loaded[4].read_bytes())
    return f"{', '.join(sorted(described))} (sha256 {digest.hexdigest()[:12]})"


def _copy_checkpoint(loaded: Loaded, target: Any, model: ModelConfig,
                     ranges: Mapping[TopicPartition, tuple[int, int]], cluster_id: str) -> None:
    name, kind, header, payload, _path = loaded
    head, _, rest = name.partition("/")
    partition = int(head.rpartition("+")[2])
    topics = [model.input, *([model.labels.topic] if model.labels else [])]
    offsets = {topic: ranges[(topic, partition)][0] for topic in topics
               if (topic, partition) in ranges}
    new_name = f"{model.input}+{partition}" + (f"/{rest}" if rest else "")
    if kind == "partition-state":
        state, models = payload
        state.next_offsets = dict(offsets)
        state.waiting.clear()
        state.records_since_checkpoint = 0
        for slot in models.values():
            slot.next_offsets = dict(offsets)
        metadata = {key: value for key, value in header.items()
                    if key not in ("format", "kind", "name", "saved_at")}
        target.save(new_name, kind, (state, models),
                    {**metadata, "next_offsets": offsets, "cluster_id": cluster_id})
    else:
        payload.next_offsets = dict(offsets)
        target.save(new_name, kind, payload)


class BackfillRunner(PipelineRunner):
    """Runs ``original`` bounded by ``plan`` (see the module's docstring), until drained."""

    def __init__(self, original: PipelineConfig, plan: BackfillPlan,
                 metrics_port: int | None = None, dead_letter_file: Path | None = None,
                 serve_metrics: bool = True) -> None:
        config = backfill_config(original, plan.suffix)
        if not serve_metrics:
            config = config.model_copy(update={"metrics": MetricsConfig(enabled=False)})
        super().__init__(config, until_idle_s=DRAINED_S, metrics_port=metrics_port,
                         dead_letter_file=dead_letter_file)
        self.original = original
        self.plan = plan
        self.config_hash = config_hash(original)  # the pipeline's: its outputs' lineage names it
        self.metrics = PipelineMetrics(config.pipeline, self.config_hash)
        self.ranges: dict[TopicPartition, tuple[int, int]] = {}
        self.model_checkpoint = plan.model_checkpoint

    def _build(self, transport: Transport) -> None:
        self.ranges = resolve_ranges(transport, self.plan, entry_topics(self.original))
        groups: dict[str, dict[TopicPartition, int]] = {}
        for stage in [*self.config.processors, *self.config.models, *self.config.sinks]:
            topics = {stage.input, *([stage.labels.topic] if isinstance(stage, ModelConfig)
                                     and stage.labels else [])}
            start = {place: bounds[0] for place, bounds in self.ranges.items()
                     if place[0] in topics}
            if start:
                groups[f"{self.config.pipeline}.{stage.name}"] = start
        self.model_checkpoint = seed_model_checkpoints(
            self.original, self.config, self.plan.model_checkpoint, self.ranges,
            transport.cluster_id())
        start_groups(transport, groups)
        super()._build(BoundedTransport(transport, self.ranges))

    def details(self) -> dict[str, Any]:
        """The range, config hash and model checkpoint of this run, for its summary."""
        return {"from": self.plan.start.text,
                "until": self.plan.until.text if self.plan.until else "the end at the start",
                "output_suffix": self.plan.suffix, "config_hash": self.config_hash,
                "model_checkpoint": self.model_checkpoint,
                "offsets": {f"{t}:{p}": list(bounds) for (t, p), bounds in sorted(self.ranges.items())}}

    def _open_lineage(self, stack: ExitStack) -> None:
        from streamflow.runtime.lineage import (  # openlineage, only with a lineage block
            CLOSE_TIMEOUT_S,
            StreamflowBackfillRunFacet,
            open_lineage,
        )

        assert self.bootstrap is not None
        failures = self.metrics.families["streamflow_lineage_emit_failures"].labels(
            self.config.pipeline)
        details = self.details()
        facet = StreamflowBackfillRunFacet(
            outputSuffix=self.plan.suffix, fromBound=details["from"], untilBound=details["until"],
            offsets=details["offsets"], modelCheckpoint=self.model_checkpoint)
        opened = open_lineage(self.config, self.bootstrap, self.config_hash, failures,
                              {"streamflow_backfill": facet})
        if opened is not None:
            self.lineage, emitter = opened
            stack.callback(emitter.close, CLOSE_TIMEOUT_S)

    def _shutdown(self) -> RunResult:
        result = super()._shutdown()
        if result.summary is not None:
            result.summary.backfill = self.details()
        return result


def run_backfill_job(config: PipelineConfig, start: str, until: str, suffix: str,
                     model_checkpoint: str, now: datetime | None = None) -> str:
    """A scheduled backfill: the bounded run of ``config`` over ``start``..``until`` relative
    to ``now``, into outputs suffixed ``suffix`` (``{date}``: ``now``'s UTC date), with no
    metrics endpoint of its own; what it did. BackfillError if it cannot start (a suffix used
    before: the same ``{date}`` again), RuntimeError if it failed."""
    now = now or datetime.now(UTC)
    plan = BackfillPlan.parse(start, until, suffix.format(date=now.date().isoformat()),
                              model_checkpoint, now)
    runner = BackfillRunner(config, plan, serve_metrics=False)
    # A daemon froze its objects out of the cyclic collector's reach (PipelineRunner.run); the
    # run unfreezes everything when it ends, so freeze again what is alive then.
    frozen = gc.get_freeze_count() > 0
    try:
        result = runner.run()
    finally:
        if frozen:
            gc.collect()
            gc.freeze()
    if result.exit_code != 0:
        raise RuntimeError(f"backfill {plan.suffix} failed: {result.reason}; "
                           f"{'; '.join(result.errors)}")
    records = sum(component.totals.records_in for component in result.summary.components
                  if component.kind == "sink") if result.summary else 0
    return (f"backfill {plan.suffix}: {records:.0f} records into the sinks, offsets "
            f"{runner.details()['offsets']}, config hash {runner.config_hash}")
