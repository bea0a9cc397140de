"""The ``streamflow`` command: run, validate, schedule, serve, broker."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from streamflow import __version__
from streamflow.config import ConfigError, load_pipeline
from streamflow.config.models import PipelineConfig
from streamflow.metrics import PipelineMetrics
from streamflow.ml.registry import RegistryError
from streamflow.plugins import catalog
from streamflow.runtime import dlq, lineage_cli, models_cli
from streamflow.runtime.backfill import BackfillError, BackfillPlan, BackfillRunner, backfill_errors
from streamflow.runtime.fatal import describe, metrics_port_error
from streamflow.runtime.jobs import schedule_errors
from streamflow.runtime.logs import REDACTOR, config_secrets, configure_logging
from streamflow.runtime.model_checks import checked_elsewhere
from streamflow.runtime.pipeline import PipelineRunner, UnknownStageError, install_signal_handlers
from streamflow.runtime.process import lean_process
from streamflow.runtime.progress import ProgressReporter
from streamflow.runtime.schedules import pipeline_scheduler
from streamflow.runtime.semantics import require_valid
from streamflow.runtime.status import fetch_status, render_status
from streamflow.runtime.summary import component_kinds
from streamflow.runtime.testing import run_test_file
from streamflow.transport.broker import BrokerUnavailableError, EmbeddedBroker

EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a Unix tool killed by it: `streamflow ... | head`

log = logging.getLogger("streamflow")


def _load(file: str, resolve_models: bool = True) -> PipelineConfig:
    """The pipeline in ``file``, its schedules' python functions imported (``resolve_models``:
    see :func:`streamflow.config.loader.parse_pipeline`)."""
    config = load_pipeline(file, resolve_models=resolve_models)
    if errors := schedule_errors(config):
        raise ConfigError(file, errors)
    return config


def _bounded(args: argparse.Namespace) -> bool:
    return any(value is not None for value in (args.from_, args.until, args.output_suffix,
                                               args.model_checkpoint))


def _backfill_plan(args: argparse.Namespace, config: PipelineConfig) -> BackfillPlan:
    """The bounded run the options ask for; ConfigError where they or the pipeline do not fit."""
    errors = []
    if getattr(args, "stage", None):
        errors.append("--stage: a bounded run runs every stage of the pipeline")
    try:
        plan = BackfillPlan.parse(args.from_, args.until, args.output_suffix, args.model_checkpoint)
    except BackfillError as exc:
        errors += str(exc).split("; ")
    errors += backfill_errors(config)
    if errors:
        raise ConfigError(args.file, errors)
    return plan


def _run(args: argparse.Namespace) -> int:
    lean_process()  # before the config's checks convert their first Python value
    # This process never imports river (the model stages' workers do): a child resolves the
    # models as validate does.
    config = _load(args.file, resolve_models=False)
    REDACTOR.add(config_secrets(config))
    plan = _backfill_plan(args, config) if _bounded(args) else None
    warnings = (checked_elsewhere(args.file, args.stage) if config.models else
                require_valid(config, args.file, stage=args.stage))
    for warning in warnings:
        log.warning("%s: %s", warning.file, warning.line())
    runner = (BackfillRunner(config, plan, args.metrics_port, args.dlq_file) if plan else
              PipelineRunner(config, stage=args.stage, until_idle_s=args.until_idle,
                             metrics_port=args.metrics_port, dead_letter_file=args.dlq_file))
    install_signal_handlers(runner)
    live = args.log_format == "text" and sys.stderr.isatty()
    progress = (
        ProgressReporter(runner.metrics.registry, args.progress_interval, live,
                         list(component_kinds(config))).start()
        if live or runner.until_idle_s is not None else None
    )
    try:
        result = runner.run()
    except BackfillError as exc:
        raise ConfigError(args.file, [str(exc)]) from exc
    finally:
        if progress:
            progress.stop()
    for error in result.errors:
        log.error("%s", error)
    log.info("pipeline %s ended: %s (exit %d)", config.pipeline, result.reason, result.exit_code)
    if result.summary is not None:
        result.summary.report(args.log_format)
    return result.exit_code


def _validate(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if _bounded(args):
        _backfill_plan(args, config)
    for warning in require_valid(config, args.file, strict=args.strict):
        print(f"warning: {warning.file}: {warning.line()}", file=sys.stderr)
    stages = len(config.processors) + len(config.models) + len(config.sinks)
    print(f"{args.file}: valid pipeline {config.pipeline!r} "
          f"({len(config.sources)} sources, {stages} stages, {len(config.topic_specs())} topics)")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    config = _load(args.file)
    REDACTOR.add(config_secrets(config))
    if not config.schedules:
        print(f"error: {args.file} has no schedules: block (docs/schedules.md)", file=sys.stderr)
        return EXIT_CONFIG
    metrics = PipelineMetrics(config.pipeline)
    scheduler = pipeline_scheduler(config, metrics)
    with contextlib.ExitStack() as stack:
        if config.metrics.enabled:
            from streamflow.metrics.server import MetricsServer  # loads aiohttp: only if served

            port = config.metrics.port if args.metrics_port is None else args.metrics_port
            try:
                server = MetricsServer(metrics.registry, config.metrics.host, port,
                                       status=lambda: {"pipeline": config.pipeline,
                                                       "schedules": scheduler.status()}).start()
            except OSError as exc:
                raise metrics_port_error(exc, config.metrics.host, port) from exc
            stack.callback(server.stop)
            log.info("metrics at %s/metrics", server.url)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: scheduler.stop())
        log.info("running %d schedules of pipeline %s; Ctrl-C stops", len(config.schedules),
                 config.pipeline)
        scheduler.start()
        running = scheduler.join_when_stopped(config.runtime.shutdown_timeout_s)
    if running:
        log.error("did not stop within the shutdown timeout: %s", ", ".join(running))
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        report = fetch_status(args.url)
    except OSError as exc:
        print(f"error: no streamflow daemon answers at {args.url} ({exc}); "
              "start one with `streamflow run FILE` or pass --url", file=sys.stderr)
        return 1
    print(json.dumps(asdict(report), indent=2) if args.json else render_status(report))
    return 0 if report.ready else 3


def _broker(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(args.port) as broker:
        print(f"embedded broker listening on {broker.bootstrap} (in memory); Ctrl-C stops it",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from streamflow.config.models import ServingConfig
    from streamflow.runtime.serving import ModelServer, ServingError  # aiohttp, only here

    config = load_pipeline(args.file)
    try:
        model = models_cli.model_stage(config, args.file, args.stage)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    given = {name: value for name, value in
             (("host", args.host), ("port", args.port), ("token_env", args.token_env))
             if value is not None}
    try:
        serving = ServingConfig.model_validate(
            {**(model.serving.model_dump() if model.serving else {}), **given})
    except ValidationError as exc:
        raise ConfigError(args.file, [error["msg"] for error in exc.errors()]) from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = ModelServer(config.pipeline, model, serving).start()
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving stage {model.name} of pipeline {config.pipeline} at {server.url}/predict; "
          "Ctrl-C stops it", flush=True)
    gc.collect()  # then keep what exists now (modules, the model) out of full collections,
    gc.freeze()  # which would otherwise walk it all every few thousand requests
    stop.wait()
    server.stop()
    return 0


def _bound_options(command: argparse.ArgumentParser) -> None:
    """The options of a bounded run (docs/backfills.md)."""
    command.add_argument("--from", dest="from_", metavar="TIME|OFFSETS",
                         help="bounded run: read the entry topics from this ISO time, relative "
                              "time (--from=-1d) or topic:partition=offset,... on")
    command.add_argument("--until", metavar="TIME|OFFSETS",
                         help="bounded run: up to this time or these offsets, exclusive "
                              "(default: where the topics end when it starts)")
    command.add_argument("--output-suffix", metavar="S",
                         help="bounded run: suffix of its consumer groups, topics and outputs")
    command.add_argument("--model-checkpoint", metavar="PATH|VERSION|fresh",
                         help="bounded run: model stages start fresh (default), from the "
                              "checkpoint store at PATH (a checkpoint.path) or from a version of "
                              "their registry (a number, a tag or latest)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streamflow {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a pipeline")
    run.add_argument("file", help="pipeline YAML file")
    run.add_argument("--stage", help="run only this source or stage (one container per stage)")
    run.add_argument("--until-idle", type=float, metavar="SECONDS",
                     help="exit 0 once every stage was idle with zero lag for SECONDS")
    run.add_argument("--metrics-port", type=int, help="override metrics.port")
    run.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="how often to log progress with --until-idle when stderr is no "
                          "terminal (default 5); a terminal shows it live")
    run.add_argument("--dlq-file", type=Path, metavar="PATH",
                     help="also write the dead letters of this run to PATH, one JSON object a "
                          "line, so that they outlive the embedded broker")
    _bound_options(run)
    run.set_defaults(handler=_run)

    status = commands.add_parser("status", help="health and per-stage figures of a running daemon")
    status.add_argument("--url", default="http://127.0.0.1:9108",
                        help="the daemon's metrics address (default http://127.0.0.1:9108)")
    status.add_argument("--json", action="store_true",
                        help="as JSON: ready, detail (the /readyz answer) and per-stage figures")
    status.set_defaults(handler=_status)

    test = commands.add_parser(
        "test", help="run a processor stage's test cases without a broker (docs/processors.md)")
    test.add_argument("file", help="test file (YAML)")
    test.set_defaults(handler=lambda args: run_test_file(args.file))

    validate = commands.add_parser("validate", help="check a pipeline file; exit 2 if invalid")
    validate.add_argument("file")
    validate.add_argument("--strict", action="store_true", help="treat warnings as errors")
    _bound_options(validate)
    validate.set_defaults(handler=_validate)

    schedule = commands.add_parser(
        "schedule", help="run a pipeline's schedules alone, without its stages (docs/schedules.md)")
    schedule.add_argument("file", help="pipeline YAML file")
    schedule.add_argument("--metrics-port", type=int, help="override metrics.port")
    schedule.set_defaults(handler=_schedule)

    broker = commands.add_parser("broker", help="run the embedded broker for local development")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(handler=_broker)

    serve = commands.add_parser(
        "serve", help="answer POST /predict from a model stage's newest version (docs/models.md)")
    serve.add_argument("file", help="pipeline YAML file")
    serve.add_argument("--stage", help="the model stage (needed if the pipeline has several)")
    serve.add_argument("--host", help="override serving.host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="override serving.port (default 8000; 0: any)")
    serve.add_argument("--token-env", help="override serving.token_env: the variable holding "
                                           "the bearer token (required off loopback)")
    serve.set_defaults(handler=_serve)

    catalog.add_command(commands)
    dlq.add_command(commands)
    lineage_cli.add_command(commands)
    models_cli.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # whoever read stdout stopped reading (`| head`): so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        print(f"invalid pipeline {exc.source}:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    except (UnknownStageError, BrokerUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, UnknownStageError) else 1
    except Exception as exc:  # one line with the cause and the fix; the traceback at DEBUG
        log.debug("%s failed", args.command, exc_info=True)
        log.error("%s", describe(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
