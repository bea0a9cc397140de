"""OpenLineage run events for a pipeline's sources, stages and sinks (docs/lineage.md).

Building events (``describe_jobs``, ``run_event``) is kept apart from sending them
(``LineageEmitter``, a background thread) and from following the runners' lives
(``LineageTracker``, called from the supervising loop), so that each is testable alone and a
slow or failing lineage backend never holds a stage up.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    JobFacet,
    RunFacet,
    column_lineage_dataset,
    error_message_run,
    job_type_job,
    processing_engine_run,
    schema_dataset,
    source_code_job,
)
from openlineage.client.uuid import generate_new_uuid

from streamflow import __version__
from streamflow.config.lineage import (
    FileLineageTransport,
    HttpLineageTransport,
    KafkaLineageTransport,
    LineageConfig,
)
from streamflow.config.models import ModelConfig, PipelineConfig, ProcessorConfig, SinkConfig
from streamflow.ml.registry import Registry, RegistryError
from streamflow.processing.python_step import import_function
from streamflow.runtime.sql_lineage import sql_columns
from streamflow.runtime.stage import Stage

log = logging.getLogger(__name__)

OPENLINEAGE_VERSION = version("openlineage-python")
PRODUCER = f"https://pypi.org/project/streamflow/{__version__}"
CONFIG_FACET_SCHEMA = "https://streamflow.dev/spec/facets/StreamflowConfigJobFacet.json"
MODEL_FACET_SCHEMA = "https://streamflow.dev/spec/facets/StreamflowModelJobFacet.json"
BACKFILL_FACET_SCHEMA = "https://streamflow.dev/spec/facets/StreamflowBackfillRunFacet.json"
MODEL_VERSION_FACET_SCHEMA = (
    "https://streamflow.dev/spec/facets/StreamflowModelVersionRunFacet.json")
# steps that keep every field as it is (they filter, fill or check rows)
FIELD_PRESERVING_STEPS = frozenset({"fill_null", "normalize", "validate", "filter"})
QUEUE_SIZE = 1000
CLOSE_TIMEOUT_S = 5.0  # the longest a stop waits for the events still queued
SCHEMA_TYPES = {"string": "string", "int": "int64", "float": "double", "bool": "boolean",
                "timestamp": "timestamp"}


@attr.define
class StreamflowConfigJobFacet(JobFacet):
    """Custom job facet: the hash of the validated pipeline config and the streamflow version."""

    configHash: str
    streamflowVersion: str

    @staticmethod
    def _get_schema() -> str:
        return CONFIG_FACET_SCHEMA


@attr.define
class StreamflowModelJobFacet(JobFacet):
    """Custom job facet of a model stage: its estimator as configured, and its task."""

    estimator: str
    task: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return MODEL_FACET_SCHEMA


@attr.define
class StreamflowBackfillRunFacet(RunFacet):
    """Custom run facet of a bounded run (``streamflow run --from``): the range it read, per
    topic-partition ``[from, until)``, the suffix of its outputs and the model checkpoint."""

    outputSuffix: str
    fromBound: str
    untilBound: str
    offsets: dict[str, list[int]]
    modelCheckpoint: str

    @staticmethod
    def _get_schema() -> str:
        return BACKFILL_FACET_SCHEMA


@attr.define
class StreamflowModelVersionRunFacet(RunFacet):
    """Custom run facet of a model stage: the newest version in its checkpoint registry when the
    event was sent (no field before its first checkpoint that learned something) and, when that
    version continues from a rollback (``streamflow models rollback``), the rollback: the
    version adopted (``rollbackTo``), the newest version when it was adopted (``rollbackFrom``)
    and the request's id."""

    version: int | None = None
    createdAt: str | None = None
    recordsLearned: int | None = None
    rollbackFrom: int | None = None
    rollbackTo: int | None = None
    rollbackId: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return MODEL_VERSION_FACET_SCHEMA


def model_version_facet(registry: Registry) -> StreamflowModelVersionRunFacet:
    """The newest version of ``registry``; none if it has none, or cannot be read (logged: a
    damaged store must not stop the lineage of a running pipeline)."""
    try:
        newest = registry.latest()
        if newest is None:
            return StreamflowModelVersionRunFacet(producer=PRODUCER)
        created = datetime.fromtimestamp(float(newest.metadata["created_at"]), UTC)
        rollbacks = [part["rollback"] for part in newest.metadata.get("partitions", {}).values()
                     if part.get("rollback")]
        rollback = max(rollbacks, key=lambda r: float(r["adopted_at"]), default=None)
        return StreamflowModelVersionRunFacet(
            version=newest.number, createdAt=created.isoformat(),
            recordsLearned=newest.records_learned, producer=PRODUCER,
            **({"rollbackFrom": rollback.get("from_version"), "rollbackTo": int(rollback["version"]),
                "rollbackId": str(rollback["id"])} if rollback else {}))
    except (OSError, RegistryError, LookupError, TypeError, ValueError, OverflowError) as exc:
        log.warning("lineage: the versions in %s cannot be read (%s)", registry.store, exc)
        return StreamflowModelVersionRunFacet(producer=PRODUCER)


@dataclass
class JobLineage:
    """What an OpenLineage job (one source, stage or sink) reads and writes."""

    name: str
    kind: str  # SOURCE, PROCESSOR, MODEL or SINK
    inputs: list[InputDataset] = field(default_factory=list)
    outputs: list[OutputDataset] = field(default_factory=list)
    facets: dict[str, JobFacet] = field(default_factory=dict)


def kafka_namespace(bootstrap: str) -> str:
    return f"kafka://{bootstrap}"


def _split_uri(location: str) -> tuple[str, str]:
    """Namespace and name of a file location by the OpenLineage conventions: ``file`` and the
    absolute path of a local one, ``scheme://authority`` and the path of a remote one."""
    parts = urlsplit(location)
    if parts.scheme in ("", "file"):
        return "file", os.path.abspath(parts.path if parts.scheme else location)
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"


def _postgres_dataset(settings: dict[str, Any]) -> tuple[str, str]:
    dsn = str(settings.get("dsn", "postgresql://postgres@127.0.0.1:5432/postgres"))
    if "://" in dsn:
        parts = urlsplit(dsn)
        host, port, database = parts.hostname or "localhost", parts.port or 5432, parts.path.lstrip("/")
    else:
        pairs = dict(item.split("=", 1) for item in dsn.split() if "=" in item)
        host, port = pairs.get("host", "localhost"), pairs.get("port", 5432)
        database = pairs.get("dbname", "")
    schema = settings.get("schema", "public")
    return f"postgres://{host}:{port}", f"{database or 'postgres'}.{schema}.{settings['table']}"


def sink_dataset(sink: SinkConfig, bootstrap: str) -> OutputDataset:
    """Where a sink writes, named by the OpenLineage conventions where the sink kind is known;
    otherwise the sink kind and the sink's name."""
    settings = sink.connector_settings()
    if sink.type in ("parquet", "delta") and "path" in settings:
        namespace, name = _split_uri(str(settings["path"]))
    elif sink.type == "postgres" and "table" in settings:
        namespace, name = _postgres_dataset(settings)
    elif sink.type == "duckdb" and "path" in settings and "table" in settings:
        namespace, name = f"duckdb://{os.path.abspath(str(settings['path']))}", str(settings["table"])
    elif sink.type == "kafka" and "topic" in settings:
        cluster = settings.get("cluster") or {}
        namespace = kafka_namespace(str(cluster.get("bootstrap", bootstrap)))
        name = str(settings["topic"])
    else:
        namespace, name = sink.type, sink.name
    return OutputDataset(namespace, name)


@dataclass
class _Fields:
    """The fields of a stage's output as far as its steps tell: each known output field's input
    fields and type (None when unknown), which of them are computed (not one input field as it
    was), and whether the known fields are all there are."""

    origin: dict[str, tuple[str, ...]] = field(default_factory=dict)
    types: dict[str, str | None] = field(default_factory=dict)
    complete: bool = False
    computed: frozenset[str] = frozenset()

    def inputs(self, name: str) -> tuple[str, ...]:
        """The input fields of output field ``name`` (itself, unchanged, if not known)."""
        return self.origin.get(name, (name,))

    def kept(self, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """The origin of the fields of ``names`` that may exist here."""
        return {name: self.inputs(name) for name in names
                if not self.complete or name in self.origin}


def _trace_steps(stage: ProcessorConfig) -> tuple[dict[str, str | None] | None, _Fields | None]:
    """The input fields the stage declares (its first step's schema) and its output's fields;
    the latter None once a step changes fields in ways not derived here (parse, python, a sql
    statement other than a plain SELECT over ``batch``, ...)."""
    declared: dict[str, str] | None = None
    fields = _Fields()
    for index, step in enumerate(stage.steps):
        kind, settings = step.kind, step.settings
        if kind == "schema":
            types: dict[str, str | None] = {name: SCHEMA_TYPES[spec["type"]]
                                            for name, spec in settings.items()}
            if index == 0:
                declared = types
            fields = _Fields(fields.kept(types), types, True, fields.computed & set(types))
        elif kind == "select":
            fields = _Fields(fields.kept(settings),
                             {name: fields.types.get(name) for name in settings}, True,
                             fields.computed & set(settings))
        elif kind == "rename":
            renamed = {settings.get(name, name): source for name, source in fields.origin.items()}
            types = {settings.get(name, name): type_ for name, type_ in fields.types.items()}
            if not fields.complete:
                renamed |= {new: (old,) for old, new in settings.items()
                            if old not in fields.origin}
            fields = _Fields(renamed, types, fields.complete,
                             frozenset(settings.get(name, name) for name in fields.computed))
        elif kind == "drop":
            fields = _Fields({k: v for k, v in fields.origin.items() if k not in settings},
                             {k: v for k, v in fields.types.items() if k not in settings},
                             fields.complete, fields.computed - set(settings))
        elif kind == "sql":
            traced = _trace_sql(settings, fields)
            if traced is None:
                return declared, None
            fields = traced
        elif kind not in FIELD_PRESERVING_STEPS:
            return declared, None
    return declared, fields


def _trace_sql(query: str, fields: _Fields) -> _Fields | None:
    """``fields`` after a sql step running ``query`` (None if DuckDB's parse does not tell)."""
    columns = sql_columns(query, list(fields.origin) if fields.complete else None)
    if columns is None:
        return None
    passed = ({name: inputs for name, inputs in fields.origin.items()
               if name not in columns.excluded} if columns.passes_unknown else {})
    origin = passed | {
        name: tuple(dict.fromkeys(source for ref in refs for source in fields.inputs(ref)))
        for name, refs in columns.inputs.items()}
    computed = {name for name, refs in columns.inputs.items()
                if name in columns.computed or any(ref in fields.computed for ref in refs)}
    computed |= fields.computed & (set(passed) - set(columns.inputs))
    types = {name: fields.types.get(name) for name in passed} | {
        name: fields.types.get(refs[0]) if name not in computed and len(refs) == 1 else None
        for name, refs in columns.inputs.items()}
    return _Fields(origin, types, not columns.passes_unknown, frozenset(computed))


def _schema_facet(types: dict[str, str | None]) -> schema_dataset.SchemaDatasetFacet:
    return schema_dataset.SchemaDatasetFacet(
        fields=[schema_dataset.SchemaDatasetFacetFields(name=name, type=type_)
                for name, type_ in types.items()],
        producer=PRODUCER,
    )


def _column_lineage(fields: _Fields, source: InputDataset
                    ) -> column_lineage_dataset.ColumnLineageDatasetFacet:
    """Each output field's input fields: DIRECT, IDENTITY (as it was) or TRANSFORMATION."""
    how = {subtype: column_lineage_dataset.Transformation(type="DIRECT", subtype=subtype,
                                                          description="", masking=False)
           for subtype in ("IDENTITY", "TRANSFORMATION")}
    return column_lineage_dataset.ColumnLineageDatasetFacet(
        fields={
            output: column_lineage_dataset.Fields(inputFields=[
                column_lineage_dataset.InputField(source.namespace, source.name, input_field,
                                                  transformations=[how[
                                                      "TRANSFORMATION" if output in fields.computed
                                                      else "IDENTITY"]])
                for input_field in inputs])
            for output, inputs in fields.origin.items() if inputs
        },
        producer=PRODUCER,
    )


def _source_code(stage: ProcessorConfig) -> source_code_job.SourceCodeJobFacet | None:
    """The code a processor stage runs beyond its declared steps: its Faust agent's or python
    steps' functions (Python), else its sql statements (SQL); None if it has neither."""
    functions = ([stage.agent] if stage.agent else
                 [step.settings["function"] for step in stage.steps if step.kind == "python"])
    sources = []
    for path in functions:
        try:
            sources.append(f"# {path}\n{inspect.getsource(import_function(path))}")
        except (OSError, TypeError, ValueError) as exc:
            sources.append(f"# {path}: source not available ({exc})\n")
    if sources:
        return source_code_job.SourceCodeJobFacet(language="python", sourceCode="\n".join(sources),
                                                  producer=PRODUCER)
    statements = [str(step.settings).strip().rstrip(";") for step in stage.steps
                  if step.kind == "sql"]
    if statements:
        return source_code_job.SourceCodeJobFacet(
            language="sql", sourceCode=";\n".join(statements) + ";", producer=PRODUCER)
    return None


def _processor_lineage(stage: ProcessorConfig, kafka: str) -> JobLineage:
    source = InputDataset(kafka, stage.input)
    target = OutputDataset(kafka, stage.output)
    if stage.type == "native" and not stage.window:
        declared, fields = _trace_steps(stage)
        if declared is not None:
            source.facets = {"schema": _schema_facet(declared)}
        if fields is not None and fields.complete:
            target.facets = {"schema": _schema_facet(fields.types)}
        if fields is not None and any(fields.origin.values()):
            target.facets = {**(target.facets or {}),
                             "columnLineage": _column_lineage(fields, source)}
    code = _source_code(stage)
    return JobLineage(stage.name, "PROCESSOR", [source], [target],
                      {"sourceCode": code} if code is not None else {})


def _model_lineage(model: ModelConfig, kafka: str, pipeline: PipelineConfig) -> JobLineage:
    inputs = [InputDataset(kafka, model.input)]
    if model.labels:
        inputs.append(InputDataset(kafka, model.labels.topic))
    outputs = [OutputDataset(kafka, model.output)]
    if model.drift:
        outputs.append(OutputDataset(kafka, pipeline.drift_topic(model)))
    if model.promotion:
        outputs.append(OutputDataset(kafka, pipeline.models_topic(model)))
    estimator = (model.estimator if isinstance(model.estimator, str)
                 else " | ".join(name for step in model.estimator for name in step))
    facet = StreamflowModelJobFacet(estimator=estimator, task=model.task, producer=PRODUCER)
    return JobLineage(model.name, "MODEL", inputs, outputs, {"streamflow_model": facet})


def describe_jobs(config: PipelineConfig, bootstrap: str) -> dict[str, JobLineage]:
    """Each source, stage and sink of the pipeline with its input and output datasets."""
    kafka = kafka_namespace(bootstrap)
    jobs = [JobLineage(source.name, "SOURCE", [], [OutputDataset(kafka, source.topic)])
            for source in config.sources]
    jobs += [_processor_lineage(stage, kafka) for stage in config.processors]
    jobs += [_model_lineage(model, kafka, config) for model in config.models]
    jobs += [JobLineage(sink.name, "SINK", [InputDataset(kafka, sink.input)],
                        [sink_dataset(sink, bootstrap)]) for sink in config.sinks]
    return {job.name: job for job in jobs}


def run_event(
    state: RunState, run_id: str, job: JobLineage, pipeline: str, namespace: str,
    config_hash: str, error: BaseException | str | None = None,
    extra_run_facets: Mapping[str, RunFacet] | None = None,
) -> RunEvent:
    """One run event of ``job``; FAIL events carry the error message."""
    run_facets: dict[str, Any] = {
        **(extra_run_facets or {}),
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=__version__, name="streamflow", openlineageAdapterVersion=OPENLINEAGE_VERSION,
            producer=PRODUCER)}
    if error is not None:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=message, programmingLanguage="python", producer=PRODUCER)
    job_facets: dict[str, Any] = {
        **job.facets,
        "jobType": job_type_job.JobTypeJobFacet(
            processingType="STREAMING", integration="STREAMFLOW", jobType=job.kind,
            producer=PRODUCER),
        "streamflow_config": StreamflowConfigJobFacet(configHash=config_hash,
                                                      streamflowVersion=__version__,
                                                      producer=PRODUCER),
    }
    return RunEvent(
        eventType=state,
        eventTime=datetime.now(UTC).isoformat(),
        run=Run(runId=run_id, facets=run_facets),
        job=Job(namespace=namespace, name=f"{pipeline}.{job.name}", facets=job_facets),
        inputs=list(job.inputs),
        outputs=list(job.outputs),
        producer=PRODUCER,
    )


def create_client(config: LineageConfig, bootstrap: str) -> Any:
    """An OpenLineage client on the configured transport (imported here: the Kafka and HTTP
    transports pull in their clients only when used)."""
    from openlineage.client import OpenLineageClient

    transport = config.transport
    if isinstance(transport, FileLineageTransport):
        from openlineage.client.transport.file import FileConfig, FileTransport

        return OpenLineageClient(transport=FileTransport(
            FileConfig(log_file_path=transport.path, append=True)))
    if isinstance(transport, HttpLineageTransport):
        from openlineage.client.transport.http import HttpConfig, HttpTransport

        settings: dict[str, Any] = {"url": transport.url, "endpoint": transport.endpoint,
                                    "timeout": transport.timeout_s, "retry": {"total": 1}}
        if transport.api_key:
            settings["auth"] = {"type": "api_key", "apiKey": transport.api_key}
        return OpenLineageClient(transport=HttpTransport(HttpConfig.from_dict(settings)))
    assert isinstance(transport, KafkaLineageTransport)
    from openlineage.client.transport.kafka import KafkaConfig, KafkaTransport

    producer = {"bootstrap.servers": transport.bootstrap or bootstrap,
                "message.timeout.ms": "10000", **transport.config}
    return OpenLineageClient(transport=KafkaTransport(
        KafkaConfig(config=producer, topic=transport.topic, flush=True)))


class LineageEmitter:
    """Sends events from a thread of its own through a bounded queue: ``emit`` never blocks.
    A failed or dropped event is counted (``failures``) and the first failure logged."""

    _STOP = object()

    def __init__(self, send: Callable[[RunEvent], None], failures: Any,
                 close: Callable[[], Any] | None = None) -> None:
        self._send = send
        self._close = close
        self.failures = failures
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self._logged = False
        self._queued = 0  # written by the callers of emit only
        self._tried = 0  # written by the sending thread only
        self._thread = threading.Thread(target=self._run, name="lineage", daemon=True)
        self._thread.start()

    def emit(self, event: RunEvent) -> None:
        try:
            self._queue.put_nowait(event)
            self._queued += 1
        except queue.Full:
            self._failed(f"queue of {QUEUE_SIZE} events full")

    def _failed(self, reason: str) -> None:
        self.failures.inc()
        if not self._logged:
            self._logged = True
            log.warning("lineage: an OpenLineage event could not be sent (%s); further failures "
                        "are only counted in streamflow_lineage_emit_failures_total", reason)

    def _run(self) -> None:
        while (event := self._queue.get()) is not self._STOP:
            try:
                self._send(event)
            except Exception as exc:  # any transport failure: lineage must not stop the pipeline
                self._failed(f"{type(exc).__name__}: {exc}")
            finally:
                self._tried += 1

    def close(self, timeout_s: float) -> None:
        """Send what is queued, waiting at most ``timeout_s``; events left are counted."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._queue.put(self._STOP, timeout=timeout_s)
        self._thread.join(max(deadline - time.monotonic(), 0))
        if self._thread.is_alive():
            left = self._queued - self._tried
            log.warning("lineage: %d OpenLineage events not sent within %gs of the stop", left,
                        timeout_s)
            self.failures.inc(left)
        elif self._close is not None:
            self._close()


@dataclass
class _Run:
    run_id: str
    runner: Stage
    last_event: float
    ended: bool = False
    rollback_id: str | None = None  # of the rollback its last model version facet showed


class LineageTracker:
    """Turns the runners' lives into run events: START for each runner (a restarted one is a new
    run), RUNNING every ``running_interval_s`` and, for a model stage, as soon as its newest
    registry version continues from a rollback its events have not shown yet (the checkpoint
    that follows an adoption), FAIL when a runner ends with an error, COMPLETE (or FAIL, if it
    failed or hung) at the pipeline's stop."""

    def __init__(self, config: PipelineConfig, bootstrap: str, config_hash: str,
                 emit: Callable[[RunEvent], None],
                 run_facets: Mapping[str, RunFacet] | None = None) -> None:
        assert config.lineage is not None
        self.pipeline = config.pipeline
        self.namespace = config.lineage.namespace or config.pipeline
        self.interval_s = config.lineage.running_interval_s
        self.jobs = describe_jobs(config, bootstrap)
        self.config_hash = config_hash
        self.run_facets = dict(run_facets or {})  # added to every run event (a backfill's range)
        self.registries = {model.name: Registry.of_stage(model.checkpoint.path, config.pipeline,
                                                         model.name) for model in config.models}
        self._emit = emit
        self._runs: dict[int, _Run] = {}

    def _event(self, state: RunState, run: _Run, error: BaseException | str | None = None,
               version: StreamflowModelVersionRunFacet | None = None) -> None:
        facets = self.run_facets
        registry = self.registries.get(run.runner.name)
        if registry is not None:
            version = version or model_version_facet(registry)
            run.rollback_id = version.rollbackId
            facets = {**facets, "streamflow_model_version": version}
        self._emit(run_event(state, run.run_id, self.jobs[run.runner.name], self.pipeline,
                             self.namespace, self.config_hash, error, facets))
        run.last_event = time.monotonic()

    def _new_rollback(self, run: _Run) -> StreamflowModelVersionRunFacet | None:
        """The version facet of ``run``'s model stage if it shows a rollback the run's events
        have not shown yet."""
        registry = self.registries.get(run.runner.name)
        if registry is None:
            return None
        version = model_version_facet(registry)
        return version if version.rollbackId not in (None, run.rollback_id) else None

    def observe(self, runners: Iterable[Stage]) -> None:
        """Called from the supervising loop after the supervisor's check."""
        now = time.monotonic()
        for runner in runners:
            run = self._runs.get(id(runner))
            if run is None:
                run = self._runs[id(runner)] = _Run(str(generate_new_uuid()), runner, now)
                self._event(RunState.START, run)
            if run.ended:
                continue
            if runner.error is not None and not runner.is_alive():
                run.ended = True
                self._event(RunState.FAIL, run, runner.error)
            elif rollback := self._new_rollback(run):
                self._event(RunState.RUNNING, run, version=rollback)
            elif now - run.last_event >= self.interval_s:
                self._event(RunState.RUNNING, run)

    def finish(self) -> None:
        """Called once the runners were stopped and joined: ends every open run."""
        for run in self._runs.values():
            if run.ended:
                continue
            run.ended = True
            runner = run.runner
            if runner.error is not None:
                self._event(RunState.FAIL, run, runner.error)
            elif runner.is_alive():
                self._event(RunState.FAIL, run, "did not stop within the shutdown timeout")
            else:
                self._event(RunState.COMPLETE, run)


def open_lineage(config: PipelineConfig, bootstrap: str, config_hash: str, failures: Any,
                 run_facets: Mapping[str, RunFacet] | None = None,
                 ) -> tuple[LineageTracker, LineageEmitter] | None:
    """The tracker and emitter of a pipeline with a ``lineage:`` block; None, logged and counted,
    when its transport cannot be set up (the pipeline runs without lineage then)."""
    assert config.lineage is not None
    try:
        client = create_client(config.lineage, bootstrap)
    except Exception as exc:  # a transport's own setup error: lineage must not stop the pipeline
        failures.inc()
        log.warning("lineage: no OpenLineage events this run: the %s transport could not be set "
                    "up (%s: %s)", config.lineage.transport.type, type(exc).__name__, exc)
        return None
    emitter = LineageEmitter(client.emit, failures, close=lambda: client.close(CLOSE_TIMEOUT_S))
    return LineageTracker(config, bootstrap, config_hash, emitter.emit, run_facets), emitter
