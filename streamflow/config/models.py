"""Pipeline configuration: pydantic models for the YAML file and the Python API alike."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from streamflow.config.lineage import LineageConfig
from streamflow.ml.model import MAIN_MODEL
from streamflow.plugins import PROCESSOR_GROUP, PartitionedState, load
from streamflow.plugins.loopback import is_loopback

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=200)]


class Strict(BaseModel):
    """Unknown keys are errors, so that a typo is reported instead of ignored."""

    model_config = ConfigDict(extra="forbid")


class EmbeddedBrokerConfig(Strict):
    """Settings of the embedded broker used with ``bootstrap: embedded``."""

    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    log_file: str | None = None


class KafkaConfig(Strict):
    """How to reach Kafka."""

    bootstrap: str = Field("embedded", description="'embedded' or host:port[,host:port...]")
    client: Literal["confluent", "kafka-python"] = "confluent"
    config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="client settings passed through, in librdkafka's names (security.protocol, ...)",
    )
    embedded: EmbeddedBrokerConfig = Field(default_factory=EmbeddedBrokerConfig)

    @field_validator("bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        if value == "embedded":
            return value
        for server in value.split(","):
            if not re.fullmatch(r"[^\s:,]+:\d{1,5}", server.strip()):
                raise ValueError(
                    f"{server!r} is not host:port; use 'embedded' or a list like 'kafka:9092'"
                )
        return value

    def client_settings(self) -> dict[str, str]:
        return {key: str(value).lower() if isinstance(value, bool) else str(value)
                for key, value in self.config.items()}


class TopicConfig(Strict):
    """A topic the pipeline creates when it does not exist."""

    name: Name
    partitions: int = Field(4, ge=1, le=10_000)
    replication_factor: int = Field(1, ge=1)
    config: dict[str, str] = Field(default_factory=dict)
    external: bool = Field(
        False, description="written by programs outside the pipeline: stages and sinks may read "
        "it though nothing in the pipeline writes it"
    )


class BatchConfig(Strict):
    """Micro-batching: a stage processes up to ``max_records`` gathered within ``max_wait_ms``."""

    max_records: int = Field(5000, ge=1, le=1_000_000)
    max_wait_ms: int = Field(100, ge=0, le=60_000)


class StepConfig(BaseModel):
    """One processor step: ``{KIND: settings, on_error: dlq|drop|fail}``.

    KIND names a registered processor (``streamflow.processors`` entry points); its settings are
    validated by that processor's own model.
    """

    model_config = ConfigDict(extra="allow")

    on_error: Literal["dlq", "drop", "fail"] = Field(
        "dlq", description="failed records: dead-letter them, count them as filtered, or stop"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> StepConfig:
        kinds = list(self.model_extra or {})
        if len(kinds) != 1:
            raise ValueError(
                "a step is a mapping with exactly one step kind (e.g. 'sql: ...') "
                f"besides on_error; got {kinds or 'none'}"
            )
        return self

    @property
    def kind(self) -> str:
        return next(iter(self.model_extra or {}))

    @property
    def settings(self) -> Any:
        return (self.model_extra or {})[self.kind]

    def output_topics(self) -> list[str]:
        """The topics the step can send records to besides its stage's output, as its processor
        declares them (``Processor.output_topics``: a ``route`` step's routes)."""
        plugin = load(PROCESSOR_GROUP, self.kind)
        return plugin.output_topics(plugin.config_model.model_validate(self.settings))

    @property
    def keeps_state(self) -> bool:
        """Whether the step's processor keeps state per partition (``PartitionedState``)."""
        return issubclass(load(PROCESSOR_GROUP, self.kind), PartitionedState)


class StageBase(Strict):
    name: Name
    input: Name = Field(description="topic to consume")
    batch: BatchConfig | None = Field(None, description="overrides runtime.batch")


AggregateFunction = Literal["count", "sum", "mean", "min", "max", "first", "last", "quantile"]
WINDOW_FIELDS = ("window_start", "window_end")


class AggregateConfig(Strict):
    """One aggregate of a window: ``{fn: mean, field: temperature}``."""

    fn: AggregateFunction
    field: str | None = Field(None, description="the input field; count takes none")
    q: float | None = Field(None, ge=0, le=1, description="quantile's rank, e.g. 0.95")
    accuracy: float = Field(0.01, gt=0, lt=1, description="quantile's relative error bound")

    @model_validator(mode="after")
    def _fields_fit_fn(self) -> AggregateConfig:
        if self.fn == "count" and self.field is not None:
            raise ValueError("count counts records: remove 'field'")
        if self.fn != "count" and self.field is None:
            raise ValueError(f"{self.fn} needs 'field': the input field to aggregate")
        if (self.fn == "quantile") != (self.q is not None):
            raise ValueError("'q' (0 to 1, e.g. q: 0.95) goes with fn: quantile and only with it")
        return self


class StateCheckpointConfig(Strict):
    """How often a stage's state (windows, dedupe keys) is snapshotted to its changelog (and,
    under at_least_once, input offsets committed)."""

    every_records: int = Field(10_000, ge=1)
    every_seconds: float = Field(5.0, gt=0)


class WindowConfig(Strict):
    """Event-time windows over a processor stage's output, keyed by fields."""

    kind: Literal["tumbling", "hopping", "session"]
    size_s: float | None = Field(None, ge=0.001, description="tumbling and hopping windows")
    hop_s: float | None = Field(None, ge=0.001, description="hopping windows: start every hop_s")
    gap_s: float | None = Field(None, ge=0.001, description="session windows: inactivity gap")
    time_field: str | None = Field(None, description="event time field; default: record timestamp")
    time_unit: Literal["ms", "s"] = Field("ms", description="unit of numeric event times")
    key: list[str] = Field(default_factory=list, description="fields the windows are keyed by")
    aggregates: dict[str, AggregateConfig] = Field(min_length=1, description="output field → aggregate")
    allowed_lateness_s: float = Field(0.0, ge=0, description="watermark = max event time - this")
    emit: Literal["final", "update"] = Field("final", description="once when closed, or on every change")
    late_topic: Name | None = Field(None, description="late records (default <pipeline>.late)")

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "checkpoint" in data:
            raise ValueError("checkpoint is a setting of the stage now, for all its state: "
                             "move it out of window, beside it")
        return data

    @model_validator(mode="after")
    def _settings_fit_kind(self) -> WindowConfig:
        needed = {"tumbling": {"size_s"}, "hopping": {"size_s", "hop_s"}, "session": {"gap_s"}}
        wanted = needed[self.kind]
        given = {name for name in ("size_s", "hop_s", "gap_s") if getattr(self, name) is not None}
        if given != wanted:
            raise ValueError(f"{self.kind} windows take {' and '.join(sorted(wanted))}"
                             f"; got {', '.join(sorted(given)) or 'none'}")
        if self.hop_s is not None and self.size_s is not None and self.hop_s > self.size_s:
            raise ValueError("hop_s must not exceed size_s (records between windows would be lost)")
        names = [*self.key, *WINDOW_FIELDS, *self.aggregates]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"output field names must be unique; {repeated} appear twice among "
                             f"key fields, {' and '.join(WINDOW_FIELDS)} and aggregate names")
        return self


def default_dead_letter_topic(pipeline: str) -> str:
    """The dead-letter topic of ``pipeline``'s stages without ``dead_letter`` and of its sources
    (records Kafka refused for their size): ``<pipeline>.dlq``. The one place that says so."""
    return f"{pipeline}.dlq"


class ProcessorConfig(StageBase):
    """A topic → topic stage: parse, then run its steps in order (or a user's Faust agent)."""

    output: Name
    dead_letter: Name | None = Field(None, description="default: <pipeline>.dlq")
    type: Literal["native", "faust"] = Field(
        "native", description="native: steps on Arrow micro-batches; faust: a Faust agent"
    )
    agent: str | None = Field(
        None, validate_default=True,
        description="type: faust only: the agent as 'package.module:function' (docs/faust.md)",
    )
    steps: list[StepConfig] = Field(default_factory=list)
    window: WindowConfig | None = Field(None, description="aggregate the steps' output in windows")
    checkpoint: StateCheckpointConfig = Field(
        default_factory=StateCheckpointConfig,
        description="snapshots of the stage's state (windows, dedupe) to <pipeline>.<stage>.changelog",
    )

    @property
    def keeps_state(self) -> bool:
        """Whether the stage keeps state per partition, in windows or in steps."""
        return self.window is not None or any(step.keeps_state for step in self.steps)

    @field_validator("agent")
    @classmethod
    def _agent_fits_type(cls, agent: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("type")
        if kind == "faust" and agent is None:
            raise ValueError("a type: faust stage needs agent: 'package.module:function'")
        if kind == "native" and agent is not None:
            raise ValueError("only type: faust stages take an agent; set type: faust or remove agent")
        return agent

    @field_validator("steps", "window")
    @classmethod
    def _nothing_besides_agent(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("type") == "faust" and value:
            raise ValueError(f"a type: faust stage runs its agent instead: remove {info.field_name}")
        return value


RiverSpec = dict[str, dict[str, Any] | None]


class CheckpointConfig(Strict):
    """Where and how often a model stage saves its state with the offsets it learned up to."""

    path: str = Field("./checkpoints", description="directory of the checkpoint store")
    every_records: int = Field(10_000, ge=1)
    every_seconds: float = Field(30.0, gt=0)
    keep_versions: int = Field(
        20, ge=1, description="registry versions kept (the last ones), besides tagged ones")


class LabelsConfig(Strict):
    """Labels arriving on their own topic, joined to earlier feature records by record key."""

    topic: Name
    field: str | None = Field(None, description="label field in label records (default: target)")
    ttl_s: float = Field(3600.0, gt=0, description="how long features wait for their label")
    max_pending: int = Field(100_000, ge=1, description="most feature records kept waiting")


class DriftConfig(Strict):
    """A river drift detector on the model's error stream."""

    detector: RiverSpec = Field(description="one {drift.Class: {params}}, e.g. {drift.ADWIN: {}}")
    topic: Name | None = Field(None, description="drift events topic (default <pipeline>.drift)")
    policy: Literal["none", "reset", "swap"] = Field(
        "none", description="on drift: keep the model, reset it, or swap in the background model"
    )


MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


class MlflowConfig(Strict):
    """Where a model stage logs its run, metrics and checkpoints as MLflow model versions."""

    tracking_uri: str = Field(
        min_length=1, description="an MLflow tracking server (http://host:5000) or store URI "
        "(file:, sqlite:, postgresql:, mysql:, mssql:, databricks); a password in it is masked")
    experiment: str | None = Field(None, min_length=1, description="default: the pipeline name")
    registered_model: str | None = Field(
        None, min_length=1, description="the registered model's name; default <pipeline>.<stage>")
    close_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="how long a stop waits for the calls still queued; "
        "those left then are counted in streamflow_model_mlflow_errors_total")

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme.split("+")[0] not in MLFLOW_SCHEMES:  # the value may hold a password: not shown
            raise ValueError(
                f"it is not an MLflow tracking URI (it starts with {scheme + ':' or 'no scheme'}): "
                "give http://host:port for a tracking server, or a store URI starting with "
                f"{', '.join(known + ':' for known in MLFLOW_SCHEMES[2:])}")
        return value


def uri_password(uri: str) -> str | None:
    """The password in ``uri``'s user information (``scheme://user:password@host``), if any."""
    try:
        return urlsplit(uri).password
    except ValueError:
        return None


def masked_uri(uri: str) -> str:
    """``uri`` with the password in its user information, if any, replaced by ``***``."""
    password = uri_password(uri)
    return uri.replace(f":{password}@", ":***@", 1) if password else uri
class ChallengerConfig(Strict):
    """A model learning beside the stage's own (the champion), in the same form as ``estimator``."""

    name: Name
    estimator: list[RiverSpec] | str = Field(
        description="river pipeline as [{module.Class: {params}}, ...] or 'module:factory'"
    )


class PromotionConfig(Strict):
    """When a challenger replaces the champion: its rolling ``metric`` over the last ``over``
    evaluated records beats the champion's by at least ``by`` at ``evaluations`` consecutive
    evaluations (one at the end of the first batch after each ``over`` evaluated records)."""

    metric: str = Field(description="a river.metrics name, e.g. Accuracy or MAE")
    by: float = Field(0.0, ge=0, description="margin, in the metric's unit (0.01: one point "
                      "of Accuracy); the metric's direction (bigger_is_better) is respected")
    over: int = Field(5000, ge=1, description="window of the compared rolling metric, in records, "
                      "and the number of evaluated records between evaluations")
    evaluations: int = Field(3, ge=1, description="consecutive evaluations the challenger must win")
    topic: Name | None = Field(None, description="promotion events topic (default <pipeline>.models)")


class ServingConfig(Strict):
    """``POST /predict`` over a model stage's newest registry version (docs/models.md, Serving)."""

    host: str = Field("127.0.0.1", description="address to listen on; anything but loopback "
                      "needs token_env")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on; 0 picks a free one")
    token_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding "
        "the bearer token (at least 16 characters) callers must present; required off loopback")
    max_body_bytes: int = Field(1_048_576, ge=1, description="larger bodies are answered 413")
    max_connections: int = Field(
        64, ge=1, description="connections served at once; further ones are answered 503")
    request_timeout_s: float = Field(
        10.0, gt=0, description="time allowed to read a request's body and answer it")
    keepalive_timeout_s: float = Field(
        15.0, gt=0, description="a connection idle this long, or whose request line and "
        "headers take longer, is closed")
    poll_interval_s: float = Field(
        1.0, gt=0, description="how often the registry is looked at for a newer version")

    @model_validator(mode="after")
    def _token_unless_loopback(self) -> ServingConfig:
        if self.token_env is None and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is reachable from other machines: set "
                             "token_env (an environment variable holding a bearer token) or "
                             "listen on 127.0.0.1")
        return self


class ModelConfig(StageBase):
    """A river model stage: predict each record, then learn from it (progressive validation)."""

    output: Name
    dead_letter: Name | None = None
    estimator: list[RiverSpec] | str = Field(
        description="river pipeline as [{module.Class: {params}}, ...] or 'module:factory'"
    )
    task: Literal["regression", "classification", "anomaly", "clustering"] | None = Field(
        None, description="inferred from the estimator when absent"
    )
    target: str | None = Field(None, description="label field; not used by anomaly and clustering")
    features: list[str] | None = Field(None, description="default: numeric fields but the target")
    metrics: list[str] | None = Field(None, description="river.metrics names; default by task")
    rolling_window: int = Field(1000, ge=1, description="window of the rolling metric values")
    prediction_field: str = "prediction"
    key_field: str | None = Field(None, description="one model per value of this field")
    max_models: int = Field(1000, ge=1, description="keyed models kept in memory (LRU)")
    labels: LabelsConfig | None = None
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    drift: DriftConfig | None = None
    mini_batch: bool = Field(
        False, description="use learn_many/predict_many per micro-batch (predicts before learning)"
    )
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="worker processes learning the input partitions in parallel, each "
        "partition in one of them; auto: one per core (a one-partition input uses one)")
    mlflow: MlflowConfig | None = Field(
        None, description="log a run, metrics and each checkpoint as a registered model version "
        "(the mlflow extra; docs/models.md, MLflow)")
    challengers: list[ChallengerConfig] = Field(
        default_factory=list, description="models that see the same records, progressively "
        "validated beside the champion; only the champion's predictions are published")
    promotion: PromotionConfig | None = Field(
        None, description="when a challenger becomes the champion (needs challengers)")
    serving: ServingConfig | None = Field(
        None, description="serve predictions of the newest registry version over HTTP")

    @model_validator(mode="after")
    def _challengers_fit(self) -> ModelConfig:
        names = [challenger.name for challenger in self.challengers]
        if MAIN_MODEL in names:
            raise ValueError(f"challengers: {MAIN_MODEL!r} names the stage's own estimator; "
                             "give the challenger another name")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"challengers: names must be unique; {twice} appear twice")
        if self.promotion is not None and not self.challengers:
            raise ValueError("promotion: there is no challenger to promote; add challengers")
        if self.challengers and self.key_field is not None:
            raise ValueError(
                "challengers do not go with key_field: each key has a model of its own, which "
                "one challenger cannot replace; run the challengers in a stage of their own, or "
                "remove key_field")
        if self.challengers and self.labels is not None:
            raise ValueError(
                "challengers do not go with a labels topic: a waiting prediction is the "
                "champion's alone; remove labels or the challengers")
        return self


class ConnectorConfig(BaseModel):
    """Common fields of sources and sinks; the rest is validated by the connector's own model."""

    model_config = ConfigDict(extra="allow")

    name: Name
    type: str = Field(min_length=1, description="connector name from `streamflow connectors list`")

    def connector_settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SourceConfig(ConnectorConfig):
    """A source publishes records to ``topic``."""

    topic: Name


class SinkConfig(ConnectorConfig):
    """A sink consumes ``input`` and makes records durable outside Kafka."""

    input: Name
    dead_letter: Name | None = None
    batch: BatchConfig | None = None
    lineage_columns: bool = Field(
        False, description="add to each row the topic, partition and offset of its input record, "
        "the config hash and the model version (docs/lineage.md, row-level lineage)")
    lineage_manifest: bool = Field(
        False, description="store with each commit a manifest of the input offsets it covers "
        "(Parquet: a sidecar per file; tables: a lineage table; Delta, Iceberg: commit properties)")


class MetricsConfig(Strict):
    enabled: bool = True
    host: str = Field(
        "127.0.0.1", description="address to listen on; the endpoint has no authentication, so "
        "another address (0.0.0.0 for every interface) is logged with a warning"
    )
    port: int = Field(9108, ge=0, le=65535)


class DeadLetterWarningConfig(Strict):
    """When a source's or stage's dead letters earn a warning in the log and on /readyz."""

    share: float = Field(0.5, gt=0, le=1, description="warn above this share of its records dead-lettered")
    records: int = Field(1000, ge=1, description="measured over at least this many records")


class RuntimeConfig(Strict):
    batch: BatchConfig = Field(default_factory=BatchConfig)
    commit_interval_s: float = Field(
        2.0, gt=0, description="how often sinks flush and commit their input offsets"
    )
    shutdown_timeout_s: float = Field(30.0, gt=0)
    guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="exactly_once: each processor, window and model stage commits a batch's "
        "output, dead letters and input offsets in one Kafka transaction (not Faust stages, nor "
        "model stages with a labels topic)",
    )
    transaction_interval_ms: int = Field(
        100, ge=0, le=10_000,
        description="exactly_once: a stage's transaction spans the batches of this interval "
        "(Kafka Streams' commit.interval.ms); read_committed readers see its records when it "
        "commits. 0: a transaction per batch. Keep it well below transaction.timeout.ms",
    )
    dead_letter_warning: DeadLetterWarningConfig = Field(default_factory=DeadLetterWarningConfig)
    max_blocked_client_calls: int = Field(
        8, ge=1,
        description="stop the run (exit code 1) once this many Kafka client calls given up "
        "after ignoring their timeout are still blocked, each holding its client's threads and "
        "buffers (librdkafka issues 5456 and 5511); a restart policy then starts a fresh process",
    )
    schedule_state_dir: str = Field(
        "./state", description="where the scheduler keeps each schedule's last tick "
        "(<dir>/<pipeline>.schedules.json), to tell a missed tick at start-up"
    )


FUNCTION_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
MIB = 1024 * 1024


class PythonJobConfig(Strict):
    """A job calling a user function (no arguments), imported as ``package.module:function``."""

    function: str = Field(pattern=FUNCTION_PATH, description="'package.module:function'")


class CompactParquetJobConfig(Strict):
    """Small-file compaction of a ``parquet`` sink's output (docs/schedules.md)."""

    sink: Name = Field(description="a parquet sink of this pipeline")
    max_file_bytes: int = Field(
        128 * MIB, ge=1, description="files this large are left alone, and compacted files "
        "are made of at most this many bytes of small files")
    keep_newest: int = Field(
        1, ge=1, description="the newest flushes per Kafka partition left as written: a replay "
        "after a crash rewrites the last flush, whose offsets may not be committed yet")


class DeltaMaintenanceJobConfig(Strict):
    """Optimize (compact) and vacuum a ``delta`` sink's table."""

    sink: Name = Field(description="a delta sink of this pipeline")
    optimize: bool = Field(True, description="rewrite small files into larger ones")
    vacuum_retention_hours: float | None = Field(
        168, ge=0, description="delete files no version newer than this many hours needs; "
        "null: no vacuum")


DURATION = r"^(?P<sign>[-+]?)(?P<amount>\d+)(?P<unit>[smhdw])$"
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SUFFIX = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``6h``, ``1d`` or ``2w``, with a sign if need be (``-1d``)."""
    match = re.match(DURATION, text.strip())
    if match is None:
        raise ValueError(f"{text!r} is no duration: give a number and a unit (s, m, h, d, w), "
                         "e.g. 1d or -6h")
    delta = timedelta(**{DURATION_UNITS[match["unit"]]: int(match["amount"])})
    return -delta if match["sign"] == "-" else delta


def _relative_or_iso(value: str) -> str:
    if not re.match(DURATION, value.strip()):
        try:
            datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is neither a time relative to the tick (-1d, -6h, 0d) "
                             "nor an ISO time (2026-12-01T00:00:00Z)") from None
    return value


RelativeOrIsoTime = Annotated[str, AfterValidator(_relative_or_iso)]


class BackfillJobConfig(Strict):
    """A bounded run of this pipeline over a window relative to the tick (docs/backfills.md)."""

    model_config = ConfigDict(populate_by_name=True)

    from_: RelativeOrIsoTime = Field(alias="from",
                                     description="start: relative to the tick (-1d) or ISO time")
    until: RelativeOrIsoTime = Field("0d", description="end, exclusive: relative to the tick or "
                                     "ISO time")
    output_suffix: str = Field(description="suffix of the run's groups, topics and outputs; "
                               "{date} is the tick's UTC date, e.g. 'nightly-{date}'")
    model_checkpoint: str = Field("fresh", description="'fresh', or a checkpoint store's root "
                                  "directory to start model stages from")

    @field_validator("output_suffix")
    @classmethod
    def _valid_suffix(cls, value: str) -> str:
        try:
            sample = value.format(date="2026-12-01")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"{value!r}: the only placeholder is {{date}}") from None
        if not re.match(SUFFIX, sample):
            raise ValueError(f"{value!r} must give letters, digits, '_' and '-' only (at most 100, "
                             "starting with a letter or digit)")
        return value


class IcebergExpireSnapshotsJobConfig(Strict):
    """Snapshot expiry of an ``iceberg`` sink's table (pyiceberg's ExpireSnapshots)."""

    sink: Name = Field(description="an iceberg sink of this pipeline")
    older_than: str = Field("7d", pattern=r"^\d+[smhdw]$",
                            description="expire snapshots older than this (30m, 12h, 7d, 2w)")
    retain_last: int = Field(1, ge=1, description="the newest snapshots of the current one's "
                             "ancestry that are kept however old")


class ModelReportJobConfig(Strict):
    """A model stage's registry versions created within ``since``: their metrics as a Parquet
    table and a PNG chart (matplotlib: the [reports] extra) in ``output_dir``."""

    stage: Name | None = Field(None, description="a model stage of this pipeline (default: its "
                               "only one)")
    since: str = Field("7d", pattern=r"^\d+[smhdw]$",
                       description="the versions created this long before the tick (12h, 7d, 2w)")
    output_dir: str = Field(description="folder the table and the chart are written to")


SinkJobConfig = (CompactParquetJobConfig | DeltaMaintenanceJobConfig
                 | IcebergExpireSnapshotsJobConfig)
JobConfig = PythonJobConfig | BackfillJobConfig | ModelReportJobConfig | SinkJobConfig
JOB_KINDS = {"python": "", "compact_parquet": "parquet", "delta_maintenance": "delta",
             "backfill": "", "iceberg_expire_snapshots": "iceberg", "model_report": ""}


class ScheduleConfig(Strict):
    """A job run on a cron expression (UTC): exactly one of python, compact_parquet,
    delta_maintenance, backfill, iceberg_expire_snapshots, model_report."""

    name: Name
    cron: str = Field(description="five fields, UTC: minute hour day-of-month month "
                      "day-of-week, e.g. '*/5 * * * *'")
    on_missed: Literal["run_once", "skip"] = Field(
        "skip", description="a tick missed while nothing ran: run once at start-up, or skip it")
    python: PythonJobConfig | None = None
    compact_parquet: CompactParquetJobConfig | None = None
    delta_maintenance: DeltaMaintenanceJobConfig | None = None
    backfill: BackfillJobConfig | None = None
    iceberg_expire_snapshots: IcebergExpireSnapshotsJobConfig | None = None
    model_report: ModelReportJobConfig | None = None

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a cron expression: give five fields, minute hour "
                             "day-of-month month day-of-week (UTC), e.g. '*/5 * * * *'")
        return value

    @model_validator(mode="after")
    def _one_job(self) -> ScheduleConfig:
        given = [kind for kind in JOB_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"a schedule runs exactly one job: set one of {', '.join(JOB_KINDS)}"
                             f"; got {', '.join(given) or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in JOB_KINDS if getattr(self, kind) is not None)

    @property
    def job(self) -> JobConfig:
        job = getattr(self, self.kind)
        assert job is not None
        return job  # type: ignore[no-any-return]


class PipelineConfig(Strict):
    """A whole pipeline: source → topic → stage → topic → sink."""

    pipeline: Name
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: list[TopicConfig] = Field(default_factory=list)
    sources: list[SourceConfig] = Field(default_factory=list)
    processors: list[ProcessorConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    sinks: list[SinkConfig] = Field(default_factory=list)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    lineage: LineageConfig | None = None
    schedules: list[ScheduleConfig] = Field(
        default_factory=list, description="jobs on cron expressions (docs/schedules.md)")

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        seen: set[str] = set()
        for component in [*self.sources, *self.processors, *self.models, *self.sinks]:
            if component.name in seen:
                raise ValueError(f"component name {component.name!r} is used twice")
            seen.add(component.name)
        return self

    @model_validator(mode="after")
    def _exactly_once_fits(self) -> PipelineConfig:
        if self.runtime.guarantee != "exactly_once":
            return self
        unsupported = [f"{stage.name} (type: faust)" for stage in self.processors
                       if stage.type == "faust"]
        unsupported += [f"{stage.name} (a model stage with a labels topic)"
                        for stage in self.models if stage.labels]
        if unsupported:
            raise ValueError(
                "runtime.guarantee: exactly_once does not cover "
                f"{', '.join(unsupported)}; use at_least_once, or run those stages in a "
                "pipeline of their own")
        return self

    @model_validator(mode="after")
    def _mlflow_waits_within_the_shutdown(self) -> PipelineConfig:
        limit = self.runtime.shutdown_timeout_s
        for number, model in enumerate(self.models):
            if model.mlflow is not None and model.mlflow.close_timeout_s >= limit:
                raise ValueError(
                    f"models[{number}].mlflow.close_timeout_s: {model.mlflow.close_timeout_s:g} s "
                    f"is not shorter than runtime.shutdown_timeout_s ({limit:g} s), which would "
                    "end the stop first; raise runtime.shutdown_timeout_s above it, or lower "
                    "close_timeout_s")
        return self

    @model_validator(mode="after")
    def _schedules_fit(self) -> PipelineConfig:
        names = [schedule.name for schedule in self.schedules]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"schedules: names must be unique; {twice} appear twice")
        sinks = {sink.name: sink.type for sink in self.sinks}
        stages = [model.name for model in self.models]
        for number, schedule in enumerate(self.schedules):
            job = schedule.job
            if isinstance(job, ModelReportJobConfig):
                where = f"schedules[{number}].model_report.stage"
                if not stages:
                    raise ValueError(f"{where}: this pipeline has no model stage to report on")
                if job.stage is None and len(stages) > 1:
                    raise ValueError(f"{where}: name one of the model stages: {stages}")
                if job.stage is not None and job.stage not in stages:
                    raise ValueError(f"{where}: {job.stage!r} is no model stage of this pipeline; "
                                     f"name one of {stages}")
            if not isinstance(job, SinkJobConfig):
                continue
            wanted, where = JOB_KINDS[schedule.kind], f"schedules[{number}].{schedule.kind}.sink"
            if job.sink not in sinks:
                choices = sorted(name for name, kind in sinks.items() if kind == wanted)
                raise ValueError(f"{where}: {job.sink!r} is no sink of this pipeline; name one "
                                 f"of its {wanted} sinks: {choices}")
            if sinks[job.sink] != wanted:
                raise ValueError(f"{where}: sink {job.sink!r} is of type {sinks[job.sink]}; "
                                 f"{schedule.kind} works on a {wanted} sink")
        return self

    def dead_letter_topic(self, stage: ProcessorConfig | ModelConfig | SinkConfig) -> str:
        return stage.dead_letter or default_dead_letter_topic(self.pipeline)

    def drift_topic(self, model: ModelConfig) -> str:
        return (model.drift.topic if model.drift else None) or f"{self.pipeline}.drift"

    def models_topic(self, model: ModelConfig) -> str:
        """Where a model stage publishes its promotions: ``promotion.topic``, else
        ``<pipeline>.models``."""
        return (model.promotion.topic if model.promotion else None) or f"{self.pipeline}.models"

    def late_topic(self, window: WindowConfig) -> str:
        return window.late_topic or f"{self.pipeline}.late"

    def changelog_topic(self, stage: ProcessorConfig) -> str:
        """The compacted topic holding a stateful stage's snapshots (windows, dedupe keys)."""
        return f"{self.pipeline}.{stage.name}.changelog"

    def topic_specs(self) -> list[TopicConfig]:
        """Every topic the pipeline touches: declared ones as declared, others with defaults."""
        declared = {topic.name: topic for topic in self.topics}
        names: list[str] = [source.topic for source in self.sources]
        for stage in [*self.processors, *self.models]:
            names += [stage.input, stage.output, self.dead_letter_topic(stage)]
        for processor in self.processors:
            names += [topic for step in processor.steps for topic in step.output_topics()]
        for model in self.models:
            if model.labels:
                names.append(model.labels.topic)
            if model.drift:
                names.append(self.drift_topic(model))
            if model.promotion:
                names.append(self.models_topic(model))
        for sink in self.sinks:
            names += [sink.input, self.dead_letter_topic(sink)]
        for stage in self.processors:
            if stage.window:
                names.append(self.late_topic(stage.window))
            if stage.keeps_state:
                declared.setdefault(self.changelog_topic(stage), TopicConfig(
                    name=self.changelog_topic(stage), partitions=1,
                    config={"cleanup.policy": "compact"},
                ))
        for name in names:
            declared.setdefault(name, TopicConfig(name=name))
        return list(declared.values())
