"""Semantic checks of a loaded pipeline, run by ``streamflow validate`` and before ``streamflow
run``: what the file's structure allows but a run would get wrong.

- SQL (``sql``, ``filter``, ``route``) is run by DuckDB, through the step itself, over an empty
  table of the fields the earlier steps produce, with no access to files or URLs; so are the
  other built-in steps that need no data (``schema``, ``select``, ...), which gives each step's
  output fields. No step that reads or connects (``enrich``, ``python``, a plugin's) is built.
  Fields flow from stage to stage through their topics.
- Fields a step, window or model names must exist where they are used.
- Sources' settings are checked by their plugin (:meth:`Source.problems`: a file that is not
  there), and every topic a stage or sink reads must be written by the pipeline or be external.

Where the fields are known exactly (after a ``schema`` or ``select`` step, or a ``SELECT`` that
names its columns), an unknown field is an error. Where records may carry fields nobody declared
(as a source writes them), a field used but never declared is a warning. After a step whose
output cannot be known without data (``python``, ``enrich``, a plugin's), fields are not checked.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from streamflow.config import ConfigError, PipelineConfig
from streamflow.config.loader import connector_settings, format_location, step_settings
from streamflow.config.models import WINDOW_FIELDS, ModelConfig, ProcessorConfig, default_dead_letter_topic
from streamflow.plugins import ROW_ID, SOURCE_GROUP, ComponentContext, Processor
from streamflow.processing.dedupe import DedupeStep
from streamflow.processing.enrich import EnrichStep
from streamflow.processing.fields import (
    DropStep,
    FillNullStep,
    NormalizeStep,
    RenameStep,
    SelectStep,
)
from streamflow.processing.parse import RAW_VALUE, ParseConfig, ParseStep
from streamflow.processing.routing import RouteStep
from streamflow.processing.steps import HIDDEN_PREFIX, BatchQuery, SchemaCheck, SqlTransform
from streamflow.processing.validation import FilterStep, ValidateStep

if TYPE_CHECKING:
    import duckdb

Severity = Literal["error", "warning"]
Where = tuple[str | int, ...]


@dataclass(frozen=True)
class Finding:
    """One semantic problem: how bad, in which file, at which field path, what, and the fix."""

    severity: Severity
    file: str
    path: str
    message: str
    hint: str

    def line(self) -> str:
        """``path: message (hint: ...)``, as config errors are listed."""
        return f"{self.path}: {self.message} (hint: {self.hint})"


def finding(severity: Severity, where: Where, message: str, hint: str) -> Finding:
    """A finding at ``where``; :func:`check_pipeline` fills in the file."""
    return Finding(severity, "", format_location(where), message, hint)


Kind = Literal["closed", "open", "unknown"]


@dataclass(frozen=True)
class Shape:
    """What is known of records at some point of the pipeline: fields that exist (typed, ``null``
    where the type is unknown), and whether others may: ``closed`` (exactly these), ``open``
    (others nobody declared) or ``unknown`` (after a step whose output needs data to be known)."""

    fields: pa.Schema
    kind: Kind

    @staticmethod
    def of(kind: Kind, names: list[str] | None = None) -> Shape:
        return Shape(pa.schema([pa.field(name, pa.null()) for name in names or []]), kind)


OPEN_PROBE = "streamflow_validate_probe"  # a column only a step that passes every field keeps
MISSING_COLUMN = re.compile(r'Referenced column "([^"]+)" not found|does not have a column named "([^"]+)"')
MAX_UNDECLARED = 100  # undeclared columns added to one SQL step's input before giving up
PASS_THROUGH = (DedupeStep,)  # steps whose output fields are their input's
RUN_EMPTY = (SchemaCheck, SqlTransform, SelectStep, RenameStep, DropStep, FillNullStep,
             NormalizeStep, ValidateStep, FilterStep, RouteStep)  # pure: run on an empty table


def suggestion(name: str, known: list[str]) -> str:
    """Did-you-mean text for ``name`` among ``known``, else the known names."""
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"the fields here are {', '.join(known)}" if known else "no field is known here"


def field_use(shape: Shape, name: str, where: Where, role: str = "field") -> list[Finding]:
    """A field used as ``role`` (field, target, feature, ...): an error where fields are known
    exactly and it is not among them, a warning where it was never declared."""
    known = [field.name for field in shape.fields]
    if name in known or shape.kind == "unknown":
        return []
    if shape.kind == "closed":
        return [finding("error", where, f"{role} {name!r} is not a field of the records here",
                        suggestion(name, known))]
    close = difflib.get_close_matches(name, known, n=1)
    declare = "declare it in a schema step upstream, so that a misspelt name is an error"
    return [finding("warning", where, f"{role} {name!r} is used but never declared",
                    f"did you mean {close[0]!r}? If not, {declare}" if close else declare)]


def step_field_uses(plugin: type[Processor[Any]], settings: Any) -> Iterator[tuple[Where, str]]:
    """(settings path, field) for each field a built-in step reads by name."""
    if issubclass(plugin, SelectStep | DropStep):
        yield from (((index,), name) for index, name in enumerate(settings.root))
    elif issubclass(plugin, RenameStep | NormalizeStep | ValidateStep):
        yield from (((name,), name) for name in settings.root)
    elif issubclass(plugin, DedupeStep):
        yield from ((("key", index), name) for index, name in enumerate(settings.key))
        if settings.time_field is not None:
            yield ("time_field",), settings.time_field
    elif issubclass(plugin, ParseStep):
        yield ("field",), settings.field
    elif issubclass(plugin, EnrichStep):
        yield ("key",), settings.key


def parse_output(settings: ParseConfig) -> Shape:
    """The fields a ``parse`` step decodes: the CSV columns or Avro fields it is given, else open."""
    if settings.columns:
        return Shape(pa.schema([pa.field(name, pa.string()) for name in settings.columns]), "closed")
    if settings.format == "avro" and settings.schema_ is not None:
        return Shape.of("closed", [field["name"] for field in settings.schema_.get("fields", [])])
    return Shape.of("open")


def empty_table(shape: Shape) -> pa.Table:
    """No rows, with the shape's fields, ``_sf_row``, and the probe where other fields may exist."""
    columns = {field.name: pa.array([], field.type) for field in shape.fields}
    columns[ROW_ID] = pa.array([], pa.int64())
    if shape.kind != "closed":
        columns[OPEN_PROBE] = pa.nulls(0)
    return pa.table(columns)


def missing_column(error: duckdb.Error) -> str | None:
    """The column a DuckDB binder error says the statement references but the table lacks."""
    import duckdb  # loaded already: the error is DuckDB's
    found = MISSING_COLUMN.search(str(error)) if isinstance(error, duckdb.BinderException) else None
    return (found.group(1) or found.group(2)) if found else None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (DuckDB's go on with context)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def sql_failure(error: duckdb.Error, shape: Shape, where: Where) -> list[Finding]:
    """A statement DuckDB refused: a syntax error or an unknown function is an error, and so is
    any other binding error over fields known exactly with their types. Where a field's type is
    unknown, DuckDB may fail to choose a function for it where typed records would not: nothing
    can be told."""
    import duckdb  # loaded already: the error is DuckDB's

    text = str(error)
    pointer = next((line.strip() for line in text.splitlines() if line.startswith("LINE ")), "")
    if isinstance(error, duckdb.ParserException):
        return [finding("error", where, f"SQL syntax: {first_line(error)}",
                        f"correct the statement{f' at {pointer!r}' if pointer else ''}")]
    if isinstance(error, duckdb.PermissionException):
        return []  # it reads files or URLs: checked when it runs
    typed = shape.kind == "closed" and not any(pa.types.is_null(field.type) for field in shape.fields)
    if not (typed or isinstance(error, duckdb.CatalogException)):
        return []
    hint = next((line.strip() for line in text.splitlines()[1:] if line.strip()), "correct the statement")
    return [finding("error", where, f"SQL: {first_line(error)}", hint)]


def run_step(step: Processor[Any], shape: Shape, where: Where) -> tuple[Shape, list[Finding]]:
    """Run a pure built-in step on an empty table of ``shape``: its output fields, and the
    findings of a statement DuckDB refuses. Its statement reaches no file or URL here. A column
    the statement references that the shape may lack is added (a warning where it was never
    declared) until the statement binds."""
    query = getattr(step, "query", None)
    statement_errors: tuple[type[Exception], ...] = ()  # only a statement's step meets DuckDB
    if isinstance(query, BatchQuery):
        import duckdb  # 20 MB, for pipelines with statements

        step.query = BatchQuery(query.statement, external_access=False)  # type: ignore[attr-defined]
        statement_errors = (duckdb.Error,)
    table = empty_table(shape)
    findings: list[Finding] = []
    for _attempt in range(MAX_UNDECLARED):
        try:
            result = step.process(table).table
        except statement_errors as exc:
            column = missing_column(exc)
            if column is None or column in table.column_names:
                return Shape(shape.fields, "unknown"), [*findings, *sql_failure(exc, shape, where)]
            findings += field_use(shape, column, where)
            if shape.kind == "closed":
                return Shape(shape.fields, "unknown"), findings
            table = table.append_column(column, pa.nulls(0))
            continue
        except (TypeError, ValueError, pa.ArrowException) as exc:
            severity: Severity = "error" if shape.kind == "closed" else "warning"
            return Shape(shape.fields, "unknown"), [*findings, finding(
                severity, where, first_line(exc), "make the step fit the field's type, or declare "
                "another type in a schema step")]
        if ROW_ID not in result.column_names:
            return Shape(shape.fields, "unknown"), [*findings, finding(
                "error", where, f"the step's output drops the {ROW_ID} column, so every batch fails",
                f"keep it: SELECT *, ... or SELECT {ROW_ID}, ... FROM batch")]
        fields = pa.schema([field for field in result.schema
                            if not field.name.startswith(HIDDEN_PREFIX) and field.name != OPEN_PROBE])
        kind: Kind = shape.kind if OPEN_PROBE in result.column_names else "closed"
        return Shape(fields, kind), findings
    return Shape(shape.fields, "unknown"), findings


def check_steps(stage: ProcessorConfig, pipeline: str, shape: Shape, where: Where
                ) -> tuple[Shape, list[Finding]]:
    """Each step of a native processor stage against the fields before it; the fields after."""
    context = ComponentContext(pipeline, stage.name)
    findings: list[Finding] = []
    for index, step_config in enumerate(stage.steps):
        at: Where = (*where, "steps", index, step_config.kind)
        plugin, settings = step_settings(step_config)
        if index == 0 and plugin.reads_raw_records:
            shape = Shape(pa.schema([pa.field(RAW_VALUE, pa.binary())]), "closed")
            if plugin is not ParseStep:
                shape = Shape.of("unknown")
                continue
        for suffix, name in step_field_uses(plugin, settings):
            findings += field_use(shape, name, (*at, *suffix))
        if issubclass(plugin, ParseStep):
            shape = parse_output(settings)
        elif issubclass(plugin, RUN_EMPTY):  # only these are built: others may read or connect
            shape, found = run_step(plugin(settings, context), shape, at)
            findings += found
        elif not issubclass(plugin, PASS_THROUGH):
            shape = Shape(shape.fields, "unknown")
    return shape, findings


def check_window(stage: ProcessorConfig, shape: Shape, where: Where) -> tuple[Shape, list[Finding]]:
    """The fields a window names exist in its steps' output; the window's output fields."""
    window = stage.window
    if window is None:
        return shape, []
    findings: list[Finding] = []
    if window.time_field is not None:
        findings += field_use(shape, window.time_field, (*where, "time_field"), "time field")
    for index, name in enumerate(window.key):
        findings += field_use(shape, name, (*where, "key", index), "key field")
    for output, aggregate in window.aggregates.items():
        if aggregate.field is not None:
            findings += field_use(shape, aggregate.field, (*where, "aggregates", output, "field"))
    types = {field.name: field.type for field in shape.fields}
    names = [*window.key, *WINDOW_FIELDS, *window.aggregates]
    fields = pa.schema([pa.field(name, types.get(name, pa.null())) for name in names])
    return Shape(fields, "closed"), findings


def check_model_fields(model: ModelConfig, shape: Shape, where: Where) -> list[Finding]:
    """A model's target (unless labels bring it), features and key field are input fields."""
    findings: list[Finding] = []
    if model.target is not None and model.labels is None:
        findings += field_use(shape, model.target, (*where, "target"), "target")
    for index, name in enumerate(model.features or []):
        findings += field_use(shape, name, (*where, "features", index), "feature")
    if model.key_field is not None:
        findings += field_use(shape, model.key_field, (*where, "key_field"), "key field")
    return findings


def model_task(model: ModelConfig) -> str | None:
    """The model's task as its stage will tell it; None when only calling a factory would."""
    if model.task is not None or isinstance(model.estimator, str):
        return model.task
    from streamflow.ml.spec import ModelSpecError, build_estimator, infer_task  # imports river

    try:
        return infer_task(build_estimator(model.estimator))
    except ModelSpecError:
        return None


def model_output(model: ModelConfig, shape: Shape) -> Shape:
    """A model stage's output: its input with the fields it adds (``probabilities`` for
    classifiers, ``score`` for anomaly detectors)."""
    task = model_task(model)
    added = [model.prediction_field, "probabilities", "score", "model_version"]
    extra = {"classification": ["probabilities"], "anomaly": ["score"]}.get(task or "", [])
    fields = [field for field in shape.fields if field.name not in added]
    fields += [pa.field(name, pa.null()) for name in [model.prediction_field, *extra]]
    fields.append(pa.field("model_version", pa.int64()))
    kind: Kind = "open" if task is None and shape.kind == "closed" else shape.kind
    return Shape(pa.schema(fields), kind)


def json_type(kind: pa.DataType) -> pa.DataType:
    """The type a field's values have again once a stage decodes them from the JSON another wrote:
    numbers, booleans and text keep theirs; others (timestamps, lists, ...) are unknown."""
    if pa.types.is_integer(kind):
        return pa.int64()
    if pa.types.is_floating(kind):
        return pa.float64()
    return kind if pa.types.is_boolean(kind) or pa.types.is_string(kind) else pa.null()


def merge(shapes: list[Shape]) -> Shape:
    """Records of a topic several producers write: every field of each, as open as the most open,
    typed as a stage reading them decodes them."""
    if not shapes:
        return Shape.of("open")
    fields: dict[str, pa.Field] = {}
    for shape in shapes:
        for field in shape.fields:
            fields.setdefault(field.name, pa.field(field.name, json_type(field.type)))
    kinds = {shape.kind for shape in shapes}
    kind: Kind = "unknown" if "unknown" in kinds else "open" if "open" in kinds else "closed"
    return Shape(pa.schema(list(fields.values())), kind)


class FieldFlow:
    """The fields each stage reads and writes, following topics from stage to stage; each stage
    is checked once, and a cycle of topics reads as unknown fields."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.outputs: dict[str, Shape] = {}
        self.findings: list[Finding] = []
        self.visiting: set[str] = set()

    def topic(self, name: str) -> Shape:
        """The fields of records on topic ``name``: sources write open records."""
        shapes = [Shape.of("open") for source in self.config.sources if source.topic == name]
        for index, stage in enumerate(self.config.processors):
            routes = [topic for step in stage.steps for topic in step.output_topics()]
            if name == stage.output or name in routes:
                shapes.append(self.processor(index))
        shapes += [self.model(index) for index, model in enumerate(self.config.models)
                   if model.output == name]
        return merge(shapes)

    def stage(self, name: str, compute: Callable[[], Shape]) -> Shape:
        if name not in self.outputs:
            if name in self.visiting:
                return Shape.of("unknown")
            self.visiting.add(name)
            self.outputs[name] = compute()
            self.visiting.discard(name)
        return self.outputs[name]

    def processor(self, index: int) -> Shape:
        stage = self.config.processors[index]

        def compute() -> Shape:
            if stage.type == "faust":
                return Shape.of("unknown")
            where: Where = ("processors", index)
            shape, found = check_steps(stage, self.config.pipeline, self.topic(stage.input), where)
            shape, in_window = check_window(stage, shape, (*where, "window"))
            self.findings += found + in_window
            return shape

        return self.stage(stage.name, compute)

    def model(self, index: int) -> Shape:
        model = self.config.models[index]

        def compute() -> Shape:
            shape = self.topic(model.input)
            self.findings += check_model_fields(model, shape, ("models", index))
            return model_output(model, shape)

        return self.stage(model.name, compute)


def check_fields(config: PipelineConfig) -> list[Finding]:
    """SQL, field names, windows and models against the fields that reach them."""
    flow = FieldFlow(config)
    for index in range(len(config.processors)):
        flow.processor(index)
    for index in range(len(config.models)):
        flow.model(index)
    return flow.findings


def check_sources(config: PipelineConfig, stage: str | None = None) -> list[Finding]:
    """What each source's plugin (or only ``stage``'s, when one runs alone: a container may see
    only its own files) finds wrong in its settings before reading (a missing file)."""
    findings = []
    for index, source in enumerate(config.sources):
        if stage is not None and source.name != stage:
            continue
        plugin, settings = connector_settings(source, SOURCE_GROUP)
        findings += [finding("error", ("sources", index, problem.setting), problem.message, problem.hint)
                     for problem in plugin.problems(settings)]
    return findings


def produced_topics(config: PipelineConfig) -> set[str]:
    """Every topic something in the pipeline writes, and the topics declared external."""
    produced = {topic.name for topic in config.topics if topic.external}
    produced |= {source.topic for source in config.sources}
    if config.sources:
        produced.add(default_dead_letter_topic(config.pipeline))
    for stage in config.processors:
        produced |= {stage.output, config.dead_letter_topic(stage)}
        produced |= {topic for step in stage.steps for topic in step.output_topics()}
        if stage.window:
            produced.add(config.late_topic(stage.window))
        if stage.keeps_state:
            produced.add(config.changelog_topic(stage))
    for model in config.models:
        produced |= {model.output, config.dead_letter_topic(model)}
        if model.drift:
            produced.add(config.drift_topic(model))
    produced |= {config.dead_letter_topic(sink) for sink in config.sinks}
    return produced


def check_topics(config: PipelineConfig) -> list[Finding]:
    """Every topic a stage or sink reads is written by the pipeline or declared external."""
    produced = produced_topics(config)
    read: list[tuple[Where, str]] = [(("processors", index, "input"), stage.input)
                                     for index, stage in enumerate(config.processors)]
    for index, model in enumerate(config.models):
        read.append((("models", index, "input"), model.input))
        if model.labels:
            read.append((("models", index, "labels", "topic"), model.labels.topic))
    read += [(("sinks", index, "input"), sink.input) for index, sink in enumerate(config.sinks)]
    findings = []
    for where, topic in read:
        if topic in produced:
            continue
        close = difflib.get_close_matches(topic, sorted(produced), n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "add a source or stage that writes it, or ") + \
            f"if another program writes it, declare it: topics: [{{name: {topic}, external: true}}]"
        findings.append(finding("error", where, f"nothing in the pipeline writes topic {topic!r}", hint))
    return findings


NO_MANIFEST_SINKS = ("kafka", "console")  # no commit to store a lineage manifest in


def check_lineage(config: PipelineConfig) -> list[Finding]:
    """A sink with ``lineage_manifest`` whose type has nowhere to store it (docs/lineage.md)."""
    return [finding("warning", ("sinks", index, "lineage_manifest"),
                    f"a {sink.type} sink has no commit to store a lineage manifest in",
                    "remove lineage_manifest; lineage_columns still add the columns")
            for index, sink in enumerate(config.sinks)
            if sink.lineage_manifest and sink.type in NO_MANIFEST_SINKS]


def check_pipeline(config: PipelineConfig, file: str, stage: str | None = None) -> list[Finding]:
    """Every finding of every semantic check of ``config``, loaded from ``file``; with ``stage``,
    of the sources only that one (the pipeline runs only it)."""
    findings = (check_sources(config, stage) + check_topics(config) + check_fields(config)
                + check_lineage(config))
    return [replace(found, file=file) for found in findings]


def require_valid(config: PipelineConfig, file: str, strict: bool = False,
                  stage: str | None = None) -> list[Finding]:
    """The warnings of ``config`` (run alone: only ``stage``'s source is checked). When it has
    errors (or, with ``strict``, warnings), raises :class:`ConfigError` listing them, then the
    other warnings."""
    findings = check_pipeline(config, file, stage)
    failing = [found for found in findings if found.severity == "error" or strict]
    if failing:
        raise ConfigError(file, [found.line() for found in failing] +
                          [f"warning: {found.line()}" for found in findings if found not in failing])
    return findings
