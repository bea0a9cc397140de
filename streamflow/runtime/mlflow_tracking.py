"""MLflow tracking of a model stage (docs/models.md, MLflow): a run with the stage's parameters,
its metrics at each checkpoint over records learned, and each registry version as a registered
model version of a pyfunc flavour (:mod:`streamflow.ml.pyfunc_model`), aliased ``champion``.

Everything MLflow does happens in a thread of the tracker's own, fed through a bounded queue
after a checkpoint's files are in place: the stage never waits for MLflow. A failed or dropped
call is counted (``streamflow_model_mlflow_errors_total``) and logged as a warning once per
outage; the stage goes on, and the next version is tried again. The ``mlflow`` package is
imported by that thread, only for stages that have an ``mlflow:`` block.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from streamflow import __version__
from streamflow.config.models import ModelConfig, masked_uri, uri_password
from streamflow.ml.registry import Registry

log = logging.getLogger(__name__)

QUEUE_SIZE = 100  # versions and alias changes waiting for MLflow; beyond, they are dropped
CHAMPION = "champion"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value
# Where the environment sets none: MLflow's HTTP defaults (7 retries with backoff, 120 s a
# request) would hold the tracker for minutes per call while a server is down, and the run's
# link printed to stdout when it ends would mix with the command's output.
ENVIRONMENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
VERSION_TAG = "streamflow.version"
PROMOTIONS_TAG = "streamflow.promotions"  # on the first version holding a promoted champion
THREAD_PREFIX = "mlflow-"  # the trackers' threads are named this and the stage's name
# the pyfunc model's code, logged with each model version (not imported here: it imports mlflow)
PYFUNC_CODE = importlib.util.find_spec("streamflow.ml.pyfunc_model").origin  # type: ignore[union-attr]


def run_parameters(config: ModelConfig, pipeline: str, task: str, metrics: list[str],
                   config_hash: str) -> dict[str, str]:
    """The parameters of a stage's MLflow run: what decides what its model learns."""
    parameters = {
        "pipeline": pipeline, "stage": config.name, "input": config.input,
        "estimator": json.dumps(config.estimator), "task": task,
        "features": json.dumps(config.features) if config.features is not None else "numeric fields",
        "target": str(config.target), "metrics": json.dumps(metrics),
        "rolling_window": str(config.rolling_window), "key_field": str(config.key_field),
        "config_hash": config_hash, "streamflow_version": __version__,
        "river_version": importlib.metadata.version("river"),
    }
    return {key: value[:MAX_PARAM_LENGTH] for key, value in parameters.items()}


def version_metrics(metadata: dict[str, Any]) -> list[tuple[str, float, int, int]]:
    """A registry version's metrics as MLflow metrics: (key, value, timestamp in ms, step), the
    step being records learned. Each metric is logged ``<name>.cumulative`` and
    ``<name>.rolling``, with ``.p<partition>`` after it when the version holds several input
    partitions; then ``drift_events`` and ``records_learned``. Non-finite values are left out."""
    timestamp = int(float(metadata.get("created_at", time.time())) * 1000)
    partitions = list(metadata.get("partitions", {}).values())
    several = len(partitions) > 1
    found: list[tuple[str, float, int, int]] = []
    total = 0
    for part in partitions:
        step = int(part.get("records_learned", 0))
        total += step
        suffix = f".p{part.get('partition')}" if several else ""
        for name, values in part.get("metrics", {}).items():
            for window in ("cumulative", "rolling"):
                value = values.get(window)
                if isinstance(value, int | float) and math.isfinite(value):
                    found.append((f"{name}.{window}{suffix}", float(value), timestamp, step))
        found.append((f"drift_events{suffix}", float(part.get("drift_events", 0)), timestamp, step))
    found.append(("records_learned", float(total), timestamp, total))
    return found


class _QuietTracker(logging.Filter):
    """Drops, from the trackers' threads, MLflow's warning that a model has no signature (logged
    at every save: the pyfunc model takes whatever features the stage takes, as river does, so
    it has none on purpose) and urllib3's warning at each retry of a request (a failed call is
    logged once per outage, and counted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.threadName or not record.threadName.startswith(THREAD_PREFIX):
            return True
        message = record.getMessage()
        return not message.startswith(("Failed to infer model signature", "Retrying ("))


_QUIET_TRACKER = _QuietTracker()


def _mlflow_distribution() -> str:
    """The MLflow distribution installed: the client alone (the mlflow extra) or the whole."""
    try:
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return "mlflow-skinny"
    return "mlflow"


def _duplicate_keys(metadata: dict[str, Any]) -> list[str]:
    """Model keys held by more than one partition of a version (one model per partition without
    ``key_field``): a pyfunc model predicting by key could not tell them apart."""
    seen: set[str] = set()
    twice: set[str] = set()
    for part in metadata.get("partitions", {}).values():
        for key in part.get("learned", {}):
            (twice if key in seen else seen).add(key)
    return sorted(twice)


class MlflowTracker:
    """Logs one model stage's run to MLflow from a background thread. ``version_published`` and
    ``set_champion`` only queue work and never block; ``close`` ends the run."""

    _STOP = object()

    def __init__(self, config: ModelConfig, pipeline: str, registry: Registry,
                 parameters: dict[str, str], model_config: dict[str, Any], errors: Any) -> None:
        assert config.mlflow is not None
        self.settings = config.mlflow
        self.uri = masked_uri(self.settings.tracking_uri)  # for messages
        self._password = uri_password(self.settings.tracking_uri)  # never in one
        self.experiment = self.settings.experiment or pipeline
        self.registered_model = self.settings.registered_model or f"{pipeline}.{config.name}"
        self.run_name = config.name
        self.registry = registry
        self.parameters = parameters
        self.model_config = model_config
        self.errors = errors
        self.run_id: str | None = None
        self.model_versions: dict[int, str] = {}  # registry version → registered model version
        self._failing = False
        self._abandoned = False  # by a stop that waited long enough
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self._client: Any = None
        self._thread = threading.Thread(target=self._run, name=f"{THREAD_PREFIX}{config.name}",
                                        daemon=True)
        self._thread.start()

    # --- the stage's side: never blocks -----------------------------------------------------

    def version_published(self, number: int) -> None:
        """Log registry version ``number`` (its files are in place): its metrics and a registered
        model version, aliased champion."""
        self._put(("version", number))

    def set_champion(self, version: int) -> None:
        """Point the ``champion`` alias at the registered model version of registry version
        ``version`` (logged earlier by this stage, or found by its ``streamflow.version`` tag)."""
        self._put(("champion", version))

    def promoted(self, version: int, promotions: list[str]) -> None:
        """Registry version ``version`` is the first to hold the champions of ``promotions``
        (challengers promoted since the version before, described): tag its registered model
        version with them (``streamflow.promotions``) and point ``champion`` at it."""
        self._put(("promoted", (version, promotions)))

    def close(self, failed: bool, timeout_s: float | None = None) -> None:
        """Log what is queued and end the run (FAILED if ``failed``), waiting at most
        ``timeout_s`` (by default the settings' ``close_timeout_s``); what is left then is
        counted as errors."""
        if timeout_s is None:
            timeout_s = self.settings.close_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(("end", failed), timeout=timeout_s)
            self._queue.put(self._STOP, timeout=max(deadline - time.monotonic(), 0))
        except queue.Full:
            pass
        self._thread.join(max(deadline - time.monotonic(), 0))
        if self._thread.is_alive():  # a call under way, and those queued behind it
            self._abandoned = True  # counted here: the thread counts and makes no more
            with self._queue.mutex:
                queued = sum(1 for task in self._queue.queue if task is not self._STOP)
            self._failed(f"{queued + 1} calls not made within {timeout_s:g}s of the stop")
            self.errors.inc(queued)

    def _put(self, task: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            self._failed(f"its queue of {QUEUE_SIZE} calls is full, {task[0]} {task[1]} dropped")

    def _failed(self, reason: str) -> None:
        self.errors.inc()
        if not self._failing:  # once per outage
            self._failing = True
            if self._password:  # MLflow's errors name the URL they failed on
                reason = reason.replace(self._password, "***")
            log.warning("mlflow (%s): %s; the stage goes on, and further failures are counted in "
                        "streamflow_model_mlflow_errors_total", self.uri, reason)

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while (task := self._queue.get()) is not self._STOP:
            kind, argument = task
            try:
                if kind == "end":
                    self._end(argument)
                    continue
                self._start()
                if kind == "version":
                    self._log_version(argument)
                elif kind == "promoted":
                    self._promoted(*argument)
                else:
                    self._alias(argument)
            except Exception as exc:  # any MLflow or store failure: the stage must go on
                if self._abandoned:
                    return
                self._failed(f"{kind} {argument}: {type(exc).__name__}: {exc}")
            else:
                if self._failing:
                    log.info("mlflow (%s): calls succeed again", self.uri)
                self._failing = False

    def _start(self) -> None:
        """The client, experiment, registered model and run, each once it could be made."""
        if self._client is None:
            for name, value in ENVIRONMENT_DEFAULTS.items():
                os.environ.setdefault(name, value)
            from mlflow import MlflowClient  # ~1.5 s and many modules: only for stages using it

            for name in ("mlflow.pyfunc", "urllib3.connectionpool"):
                logging.getLogger(name).addFilter(_QUIET_TRACKER)
            self._client = MlflowClient(self.settings.tracking_uri, self.settings.tracking_uri)
        if self.run_id is not None:
            return
        client = self._client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = self._create(lambda: client.create_experiment(self.experiment))
            if experiment_id is None:  # created meanwhile by another replica
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self._create(lambda: client.create_registered_model(self.registered_model))
        run = client.create_run(experiment_id, run_name=self.run_name, tags={
            "streamflow.pipeline": self.parameters["pipeline"],
            "streamflow.stage": self.parameters["stage"],
            "streamflow.config_hash": self.parameters["config_hash"]})
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[
            Param(key, value) for key, value in self.parameters.items()])
        self.run_id = run.info.run_id
        log.info("mlflow (%s): stage %s logs to run %s of experiment %r", self.uri,
                 self.run_name, self.run_id, self.experiment)

    @staticmethod
    def _create(call: Any) -> Any:
        """``call()``, or None if what it creates exists already."""
        from mlflow.exceptions import MlflowException

        try:
            return call()
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return None

    def _log_version(self, number: int) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        client = self._client
        metadata = self.registry.version(number).metadata
        client.log_batch(self.run_id, metrics=[
            Metric(key, value, timestamp, step)
            for key, value, timestamp, step in version_metrics(metadata)])
        twice = _duplicate_keys(metadata)
        if twice:
            self._failed(f"version {number} is not registered: it holds a model per input "
                         f"partition for keys {twice}; a registered model takes one model per "
                         "key (use one input partition, or key_field)")
            return
        path = f"versions/{number}"
        with tempfile.TemporaryDirectory(prefix="streamflow-mlflow-") as directory:
            self._save_pyfunc(number, Path(directory))
            client.log_artifacts(self.run_id, str(Path(directory) / "model"), path)
        version = client.create_model_version(
            self.registered_model, f"runs:/{self.run_id}/{path}", run_id=self.run_id,
            tags={VERSION_TAG: str(number), "streamflow.records_learned":
                  str(sum(int(part.get("records_learned", 0))
                          for part in metadata.get("partitions", {}).values()))},
            await_creation_for=0)
        self.model_versions[number] = str(version.version)
        client.set_registered_model_alias(self.registered_model, CHAMPION, str(version.version))

    def _save_pyfunc(self, number: int, directory: Path) -> None:
        """Version ``number`` as an MLflow pyfunc model in ``directory / 'model'``: the export
        file of ``streamflow models export`` as its artifact, read by
        :mod:`streamflow.ml.pyfunc_model`, logged as code."""
        import mlflow.pyfunc

        export = directory / "export.pkl"
        self.registry.export(number, export)
        requirements = [f"{name}=={importlib.metadata.version(name)}"
                        for name in (_mlflow_distribution(), "river", "pandas")]
        mlflow.pyfunc.save_model(
            str(directory / "model"), python_model=PYFUNC_CODE,
            artifacts={"export": str(export)}, model_config=self.model_config,
            pip_requirements=requirements)

    def _model_version(self, version: int) -> str:
        """The registered model version of registry version ``version``."""
        model_version = self.model_versions.get(version)
        if model_version is None:
            found = self._client.search_model_versions(
                f"name = '{self.registered_model}' and tags.`{VERSION_TAG}` = '{version}'")
            if not found:
                raise LookupError(f"registry version {version} has no registered model version "
                                  f"in {self.registered_model!r}")
            model_version = str(max(int(found_version.version) for found_version in found))
        return model_version

    def _alias(self, version: int) -> None:
        self._client.set_registered_model_alias(self.registered_model, CHAMPION,
                                                self._model_version(version))

    def _promoted(self, version: int, promotions: list[str]) -> None:
        model_version = self._model_version(version)
        self._client.set_model_version_tag(self.registered_model, model_version,
                                           PROMOTIONS_TAG, "; ".join(promotions))
        self._client.set_registered_model_alias(self.registered_model, CHAMPION, model_version)

    def _end(self, failed: bool) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
