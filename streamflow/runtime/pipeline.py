"""Running a pipeline: broker, topics, metrics endpoint, sources and stages, and a clean stop."""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from streamflow.config.loader import connector_settings
from streamflow.config.models import (
    ModelConfig,
    PipelineConfig,
    ProcessorConfig,
    SinkConfig,
    SourceConfig,
)
from streamflow.metrics import PipelineMetrics, SourceMetrics
from streamflow.metrics.totals import read_totals
from streamflow.plugins import SINK_GROUP, SOURCE_GROUP, ComponentContext
from streamflow.plugins.agents import load_agent
from streamflow.runtime.dead_letter_watch import DeadLetterWatch
from streamflow.runtime.dlq import DeadLetterFile
from streamflow.runtime.fatal import metrics_port_error
from streamflow.runtime.faust_stage import FaustStage
from streamflow.runtime.logs import REDACTOR
from streamflow.runtime.row_lineage import LineageSink, row_lineage_on
from streamflow.runtime.sources import POSITIONS_TOPIC_SPEC, SourceRunner, source_dead_letter_topic
from streamflow.runtime.stage import Stage
from streamflow.runtime.stages import SinkStage, StageIdentity, TopicStage, build_steps
from streamflow.runtime.summary import RunSummary, component_kinds, summarize
from streamflow.runtime.supervisor import Supervisor, backoff_delay
from streamflow.runtime.window_stage import WindowStage
from streamflow.transport import (
    AuthenticationError,
    TopicSpec,
    Transport,
    TransportError,
    create_transport,
)
from streamflow.transport.broker import EmbeddedBroker

if TYPE_CHECKING:  # imported where used: a pipeline without them spares their libraries
    from streamflow.metrics.server import MetricsServer
    from streamflow.runtime.lineage import LineageTracker
    from streamflow.runtime.model_stage import ModelStage
    from streamflow.runtime.schedules import Scheduler
    from streamflow.runtime.serving import ModelServer

log = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S = 0.2
DEAD_LETTER_CHECK_S = 1.0


def config_hash(config: PipelineConfig) -> str:
    """A short, stable hash of the validated pipeline (for streamflow_build_info)."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:12]


class UnknownStageError(ValueError):
    """``--stage`` names no stage of the pipeline."""


@dataclass
class RunResult:
    """How a run ended."""

    exit_code: int
    reason: str
    errors: list[str] = field(default_factory=list)
    summary: RunSummary | None = None  # once the sources and stages started


class PipelineRunner:
    """Runs the sources and stages of one pipeline (or one stage of it) in this process."""

    def __init__(
        self,
        config: PipelineConfig,
        stage: str | None = None,
        until_idle_s: float | None = None,
        metrics_port: int | None = None,
        dead_letter_file: Path | None = None,
    ) -> None:
        self.config = config
        self.dead_letter_file = dead_letter_file
        self.only_stage = stage
        self.until_idle_s = until_idle_s
        self.config_hash = config_hash(config)  # in metrics, lineage, row lineage, model versions
        self.metrics = PipelineMetrics(config.pipeline, self.config_hash)
        self.metrics_port = config.metrics.port if metrics_port is None else metrics_port
        self.bootstrap: str | None = None
        self.metrics_server: MetricsServer | None = None
        self.model_servers: list[ModelServer] = []  # of the model stages with serving:
        self.supervisor = Supervisor(config.runtime.max_blocked_client_calls)
        # the schedules run in the whole daemon, not in a one-stage container (--stage)
        self.scheduler: Scheduler | None = None
        if config.schedules and stage is None:
            from streamflow.runtime.schedules import pipeline_scheduler  # croniter, only then

            self.scheduler = pipeline_scheduler(config, self.metrics)
        self._started = False
        self._fatal: str | None = None
        self._stop = threading.Event()
        self._stop_reason = "stopped"
        stage_names = [s.name for s in [*config.processors, *config.models, *config.sinks]]
        source_names = [s.name for s in config.sources]
        self._source_names = set(source_names)
        self._origin_headers = row_lineage_on(config)  # a sink wants row-level lineage
        self.dead_letter_watch = DeadLetterWatch(config.runtime.dead_letter_warning, {
            **{name: source_dead_letter_topic(config.pipeline) for name in source_names},
            **{s.name: config.dead_letter_topic(s) for s in [*config.processors, *config.models,
                                                             *config.sinks]},
        })
        self._started_at = time.monotonic()
        self.lineage: LineageTracker | None = None
        if stage is not None and stage not in stage_names + source_names:
            raise UnknownStageError(
                f"--stage {stage!r} is not in pipeline {config.pipeline!r}; "
                f"choose one of: {', '.join(source_names + stage_names)}"
            )

    def _selected(self, name: str) -> bool:
        return self.only_stage is None or self.only_stage == name

    def stop(self, reason: str = "stopped") -> None:
        self._stop_reason = reason
        self._stop.set()

    def run(self) -> RunResult:
        """Run until stopped (signal, ``stop()``, idleness or a fatal failure)."""
        with ExitStack() as stack:
            kafka = self.config.kafka
            if kafka.bootstrap == "embedded":
                log_file = Path(kafka.embedded.log_file) if kafka.embedded.log_file else None
                broker = stack.enter_context(EmbeddedBroker(kafka.embedded.port, log_path=log_file))
                self.bootstrap = broker.bootstrap
                log.info("embedded broker started at %s (in memory: data ends with the run)",
                         self.bootstrap)
            else:
                self.bootstrap = kafka.bootstrap
            if self.config.metrics.enabled:
                from streamflow.metrics.server import MetricsServer

                host = self.config.metrics.host
                try:
                    self.metrics_server = MetricsServer(
                        self.metrics.registry, host, self.metrics_port,
                        readiness=self.readiness, status=self.status,
                        dead_letters=lambda after: self.metrics.latest_dead_letters.document(
                            after, REDACTOR.mask),
                    ).start()
                except OSError as exc:
                    raise metrics_port_error(exc, host, self.metrics_port) from exc
                stack.callback(self.metrics_server.stop)
                log.info("metrics at %s/metrics, dashboard at %s/",
                         self.metrics_server.url, self.metrics_server.url)
            transport = create_transport(kafka.client, self.bootstrap, kafka.client_settings())
            try:
                self._wait_for_broker(transport)
            except AuthenticationError as exc:
                return RunResult(1, "Kafka refused the credentials", [f"kafka: {exc}"])
            if self._stop.is_set():
                return RunResult(0, self._stop_reason)
            if self.dead_letter_file is not None:  # closed after _shutdown, before the broker
                stack.enter_context(DeadLetterFile(transport, self._dead_letter_topics(),
                                                   self.dead_letter_file))
            self._build(transport)
            self._serve(stack)
            if self.config.lineage is not None:
                self._open_lineage(stack)
            # Collect garbage, then freeze what exists now (modules, settings, clients) out of
            # the cyclic collector's reach: each batch pushes thousands of librdkafka messages
            # into the oldest generation, whose full collections otherwise walk the whole
            # process (about 80 ms every few batches, a fifth of a processor stage's time).
            gc.collect()
            gc.freeze()
            stack.callback(gc.unfreeze)  # so that what ends with the run is collected again
            self.supervisor.start()
            if self.scheduler is not None:
                self.scheduler.start()
            self._started = True
            self._started_at = time.monotonic()
            return self._supervise()

    def _serve(self, stack: ExitStack) -> None:
        """Start the prediction server of each model stage run here that has ``serving:``."""
        served = [model for model in self.config.models
                  if model.serving is not None and self._selected(model.name)]
        if not served:
            return
        from streamflow.runtime.serving import ModelServer  # aiohttp, only then

        for model in served:
            assert model.serving is not None
            server = ModelServer(self.config.pipeline, model, model.serving).start()
            stack.callback(server.stop)
            self.model_servers.append(server)

    def _open_lineage(self, stack: ExitStack) -> None:
        """OpenLineage events for the runners (docs/lineage.md), sent until the stop."""
        from streamflow.runtime.lineage import CLOSE_TIMEOUT_S, open_lineage  # openlineage, ~20 MB

        assert self.bootstrap is not None
        failures = self.metrics.families["streamflow_lineage_emit_failures"].labels(
            self.config.pipeline)
        opened = open_lineage(self.config, self.bootstrap, self.config_hash, failures)
        if opened is not None:
            self.lineage, emitter = opened
            stack.callback(emitter.close, CLOSE_TIMEOUT_S)

    def _dead_letter_topics(self) -> list[str]:
        """The dead-letter topics of the sources and stages this process runs."""
        topics = self.dead_letter_watch.dead_letter_topics
        return sorted({topic for name, topic in topics.items() if self._selected(name)})

    def _wait_for_broker(self, transport: Transport) -> None:
        """Create the topics, waiting with backoff while the broker is unreachable."""
        attempt = 0
        while not self._stop.is_set():
            try:
                self._create_topics(transport)
                return
            except AuthenticationError:
                raise
            except TransportError as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning("waiting for Kafka at %s (%s); retrying in %.1fs", self.bootstrap,
                            exc, delay)
                self._stop.wait(delay)

    def _create_topics(self, transport: Transport) -> None:
        admin = transport.admin()
        try:
            specs = [
                TopicSpec(t.name, t.partitions, t.replication_factor, t.config)
                for t in self.config.topic_specs()
            ]
            if self.config.sources and all(
                spec.name != source_dead_letter_topic(self.config.pipeline) for spec in specs
            ):
                specs.append(TopicSpec(source_dead_letter_topic(self.config.pipeline)))
            admin.create_topics([*specs, POSITIONS_TOPIC_SPEC])
        finally:
            admin.close()

    def _build(self, transport: Transport) -> None:
        config = self.config
        for source_config in config.sources:
            if self._selected(source_config.name):
                metrics = self.metrics.source(source_config.name)
                self.supervisor.add(self._source_factory(source_config, transport, metrics),
                                    metrics.restarts)
        for processor in config.processors:
            if not self._selected(processor.name):
                continue
            if processor.type == "faust":
                self._supervise_stage(processor.name, lambda s=processor: self._faust_stage(s))
            else:
                self._supervise_stage(processor.name,
                                      lambda s=processor: self._processor_stage(s, transport))
        for model in config.models:
            if self._selected(model.name):
                self._supervise_stage(model.name, lambda s=model: self._model_stage(s, transport))
        for sink_config in config.sinks:
            if self._selected(sink_config.name):
                self._supervise_stage(sink_config.name,
                                      lambda s=sink_config: self._sink_stage(s, transport))

    def _supervise_stage(self, name: str, factory: Callable[[], Stage]) -> None:
        self.supervisor.add(factory, self.metrics.stage(name).restarts)

    def _source_factory(
        self, source_config: SourceConfig, transport: Transport, metrics: SourceMetrics
    ) -> Callable[[], SourceRunner]:
        plugin, settings = connector_settings(source_config, SOURCE_GROUP)
        pipeline = self.config.pipeline

        def build() -> SourceRunner:
            source = plugin(settings, ComponentContext(pipeline, source_config.name))
            return SourceRunner(pipeline, source, source_config.topic, transport, metrics,
                                self.config.runtime.batch.max_records,
                                source_dead_letter_topic(pipeline))

        return build

    @property
    def sources(self) -> list[Stage]:
        return [r for r in self.supervisor.runners if r.name in self._source_names]

    @property
    def stages(self) -> list[Stage]:
        return [r for r in self.supervisor.runners if r.name not in self._source_names]

    def _identity(self, stage: ProcessorConfig | ModelConfig | SinkConfig) -> StageIdentity:
        return StageIdentity(
            self.config.pipeline, stage.name, stage.input, self.config.dead_letter_topic(stage)
        )

    def _faust_stage(self, stage: ProcessorConfig) -> FaustStage:
        """A processor stage run by the user's Faust agent (docs/faust.md)."""
        assert self.bootstrap is not None and stage.agent is not None
        partitions = {topic.name: topic.partitions for topic in self.config.topic_specs()}
        return FaustStage(
            self._identity(stage), self.bootstrap, self.metrics.stage(stage.name, ("agent",)),
            stage.output, load_agent(stage.agent), partitions[stage.input],
        )

    @property
    def _exactly_once(self) -> bool:
        return self.config.runtime.guarantee == "exactly_once"

    @property
    def _transaction_interval_s(self) -> float:
        return self.config.runtime.transaction_interval_ms / 1000

    def _processor_stage(self, stage: ProcessorConfig, transport: Transport) -> TopicStage:
        batch = stage.batch or self.config.runtime.batch
        metrics = self.metrics.stage(stage.name, tuple(step.kind for step in stage.steps))
        steps = build_steps(stage, self.config.pipeline)
        changelog = self.config.changelog_topic(stage) if stage.keeps_state else None
        runner: TopicStage
        if stage.window:
            assert changelog is not None
            runner = WindowStage(
                self._identity(stage), transport, batch, metrics, stage.output, steps,
                stage.window, self.metrics.window(stage.name),
                self.config.late_topic(stage.window), changelog, stage.checkpoint,
                self._exactly_once, self._transaction_interval_s,
            )
        else:
            runner = TopicStage(self._identity(stage), transport, batch, metrics, stage.output,
                                steps, self._exactly_once, changelog, stage.checkpoint,
                                transaction_interval_s=self._transaction_interval_s)
        runner.origin_headers = self._origin_headers
        return runner

    def _model_stage(self, stage: ModelConfig, transport: Transport) -> ModelStage:
        # River is imported by the stage's workers only: what only it tells (the task unless
        # set, the default metrics, the model's label) comes from the first one as it starts.
        from streamflow.ml.settings import EngineSettings, PromotionRule
        from streamflow.ml.worker import EngineSpec
        from streamflow.runtime.model_stage import ModelStage

        batch = stage.batch or self.config.runtime.batch
        metrics = self.metrics.stage(stage.name, ("model",))
        labels, promotion = stage.labels, stage.promotion
        settings = EngineSettings(
            task=stage.task,
            target=stage.target,
            metrics=stage.metrics,
            rolling_window=stage.rolling_window,
            key_field=stage.key_field,
            max_models=stage.max_models,
            features_topic=stage.input,
            labels_topic=labels.topic if labels else None,
            labels_ttl_s=labels.ttl_s if labels else 0.0,
            max_waiting=labels.max_pending if labels else 0,
            drift_detector=stage.drift.detector if stage.drift else None,
            drift_policy=stage.drift.policy if stage.drift else "none",
            mini_batch=stage.mini_batch,
            challengers=tuple(challenger.name for challenger in stage.challengers),
            promotion=PromotionRule(promotion.metric, promotion.by, promotion.over,
                                    promotion.evaluations) if promotion else None,
        )
        spec = EngineSpec(
            settings, stage.estimator, str(stage.checkpoint.path), self.config.pipeline,
            stage.name, stage.checkpoint.every_records, stage.checkpoint.keep_versions,
            self.config_hash,
            {challenger.name: challenger.estimator for challenger in stage.challengers},
        )
        runner = ModelStage(
            self._identity(stage), transport, batch, metrics,
            functools.partial(self.metrics.model, stage.name), stage, spec,
            self.config.drift_topic(stage) if stage.drift else None, self._exactly_once,
            self._transaction_interval_s,
            self.config.models_topic(stage) if promotion else None,
        )
        runner.origin_headers = self._origin_headers
        return runner

    def _sink_stage(self, sink_config: SinkConfig, transport: Transport) -> SinkStage:
        plugin, settings = connector_settings(sink_config, SINK_GROUP)
        sink = plugin(settings, ComponentContext(self.config.pipeline, sink_config.name, transport))
        if sink_config.lineage_columns or sink_config.lineage_manifest:
            sink = LineageSink(sink, sink_config, self.config, self.config_hash)
        return SinkStage(
            self._identity(sink_config), transport, sink_config.batch or self.config.runtime.batch,
            self.metrics.stage(sink_config.name, ("sink",)), sink, self.metrics.sink(sink_config.name),
            self.config.runtime.commit_interval_s,
        )

    def _supervise(self) -> RunResult:
        checked_at = time.monotonic()
        if self.lineage is not None:
            self.lineage.observe(self.supervisor.runners)
        while not self._stop.wait(SUPERVISE_INTERVAL_S):
            if time.monotonic() - checked_at >= DEAD_LETTER_CHECK_S:
                checked_at = time.monotonic()
                self.dead_letter_watch.observe(read_totals(self.metrics.registry),
                                               self.metrics.reasons)
            fatal = self.supervisor.check()
            if self.lineage is not None:
                self.lineage.observe(self.supervisor.runners)
            if fatal:
                self._fatal = fatal
                self.stop(fatal)
            elif self.until_idle_s is not None and self._idle(self.until_idle_s):
                self.stop(f"idle for {self.until_idle_s:g}s with zero lag")
        log.info("stopping pipeline %s (%s)", self.config.pipeline, self._stop_reason)
        return self._shutdown()

    def _idle(self, seconds: float) -> bool:
        """Sources done, and no stage handled anything for ``seconds`` while every stage's lag,
        measured after the last activity anywhere, is zero (so a record a source or an upstream
        stage wrote just before is never missed)."""
        runners = self.supervisor.runners
        last_activity = max((runner.last_activity for runner in runners), default=0.0)
        return time.monotonic() - last_activity >= seconds and all(
            runner.is_idle(last_activity) for runner in runners
        )

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready once every source is open (its listener, if any, takes connections) and every
        stage runs, has joined its group and gets answers from the brokers for its partitions.
        Components dead-lettering more than runtime.dead_letter_warning allows are named under
        ``warnings``, ready or not."""
        if not self._started:
            return False, {"reason": "starting: waiting for Kafka and creating topics"}
        problems = {runner.name: problem for runner in self.supervisor.runners
                    if (problem := runner.not_ready()) is not None}
        detail: dict[str, Any] = ({"reason": "components not ready", "components": problems}
                                  if problems else {"status": "ready"})
        if warnings := self.dead_letter_watch.warnings():
            detail["warnings"] = warnings
        return not problems, detail

    def status(self) -> dict[str, Any]:
        """The pipeline's shape, and each component's state (see Stage.state) and dead-letter
        topic, for the dashboard."""
        config = self.config
        runners = {r.name: r for r in self.supervisor.runners}
        nodes = [{"name": s.name, "kind": "source", "type": s.type, "output": [s.topic]}
                 for s in config.sources]
        nodes += [{"name": s.name, "kind": "processor", "input": [s.input], "output": [s.output]}
                  for s in config.processors]
        nodes += [{"name": m.name, "kind": "model", "input": [m.input], "output": [m.output]}
                  for m in config.models]
        nodes += [{"name": s.name, "kind": "sink", "type": s.type, "input": [s.input]}
                  for s in config.sinks]
        for node in nodes:
            runner = runners.get(node["name"])
            node["state"] = runner.state if runner else "not started"
            node["running"] = node["state"] == "running"
            node["dead_letter"] = self.dead_letter_watch.dead_letter_topics[node["name"]]
        return {"pipeline": config.pipeline, "nodes": nodes, "ready": self.readiness()[0],
                "schedules": self.scheduler.status() if self.scheduler else []}

    def _shutdown(self) -> RunResult:
        deadline = time.monotonic() + self.config.runtime.shutdown_timeout_s
        if self.scheduler is not None:
            self.scheduler.stop()
        for group in (self.sources, self.stages):
            for runner in group:
                runner.stop()
            for runner in group:
                runner.join(max(deadline - time.monotonic(), 0))
        hung = [r.name for r in self.supervisor.runners if r.is_alive()]
        if self.scheduler is not None:
            hung += [f"schedule {name}" for name in
                     self.scheduler.join(max(deadline - time.monotonic(), 0))]
        errors = [self._fatal] if self._fatal else []
        if hung:
            errors.append(f"did not stop within the shutdown timeout: {', '.join(hung)}")
        exit_code = 1 if errors else 0
        kinds = {name: kind for name, kind in component_kinds(self.config).items()
                 if self._selected(name)}
        summary = RunSummary(
            self.config.pipeline, self._stop_reason, exit_code,
            time.monotonic() - self._started_at, summarize(kinds, self.metrics, REDACTOR.mask),
            self.config.runtime.dead_letter_warning.share,
        )
        if self.lineage is not None:
            self.lineage.finish()
        return RunResult(exit_code, self._stop_reason, errors, summary)


def install_signal_handlers(runner: PipelineRunner) -> None:
    """SIGINT and SIGTERM stop the pipeline gracefully."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        runner.stop(f"received {signal.Signals(signum).name}")

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
