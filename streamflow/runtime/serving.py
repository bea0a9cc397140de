"""Predictions over HTTP from a model stage's newest registry version (docs/models.md, Serving).

``POST /predict`` takes one JSON object (one record) or NDJSON (several) and answers each record
with the prediction of the stage's live model (the champion) and the registry version it comes
from; ``GET /healthz`` says which version is served. The server learns nothing and never talks
to the stage's worker: it holds a read-only copy of the newest version of the stage's registry,
loaded with the registry's integrity checks, and swaps it for a newer one (a single reference
assignment, so a request is answered wholly by one version) when the registry has one, looked
for every ``poll_interval_s``. It runs in the stage's process (``serving:``) or on its own
(``streamflow serve``), on the :class:`~streamflow.plugins.listeners.Listener` the metrics
server and the webhook use (aiohttp on an event loop in a thread of its own).

Records are decoded and their feature dicts built by the code the stage decodes its batches
with (:func:`~streamflow.runtime.model_stage.decode_features`), a request being one batch: a
record's features are those the stage would give the model for a batch of the same records.
Keyed models (``key_field``) are picked by the record's key, as the stage picks them; without a
key field, the model of the input partition that has learned the most records is served.

Answers: 200 with the predictions; 400 a body that is not JSON objects; 401 a missing or wrong
bearer token; 404, 405 other paths and methods; 408 a body not read within
``request_timeout_s``; 413 a body over ``max_body_bytes``; 422 records the model cannot take (a
listed feature in no record, a value the estimator refuses, a key without a model); 503 no
version yet, or ``max_connections`` being served. Errors are JSON: ``{"error": ...}``,
with ``"records": [{"record": i, "error": ...}]`` naming records from 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from streamflow.config.models import ModelConfig, ServingConfig
from streamflow.ml.engine import ModelSlot
from streamflow.ml.features import feature_rows
from streamflow.ml.model import Features, Prediction
from streamflow.ml.registry import Registry
from streamflow.plugins import ROW_ID
from streamflow.plugins.listeners import ConnectionLimits, Listener
from streamflow.plugins.loopback import is_loopback
from streamflow.runtime.fatal import FatalError
from streamflow.runtime.model_stage import decode_features

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
NDJSON = "application/x-ndjson"
_STOP_TIMEOUT_S = 10.0


class ServingError(FatalError):
    """The server cannot start as configured (a token missing, the port taken)."""


class RequestError(Exception):
    """A request answered with a 4xx: its status, message and per-record errors."""

    def __init__(self, status: int, message: str,
                 records: list[tuple[int, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.records = records or []

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": str(self)}
        if self.records:
            body["records"] = [{"record": row, "error": error} for row, error in self.records]
        return web.json_response(body, status=self.status)


@dataclass(frozen=True)
class ServedVersion:
    """A registry version as the server holds it: the model of each key (``""`` without
    ``key_field``), with the input partition it comes from."""

    number: int
    models: dict[str, tuple[int, ModelSlot]]
    loaded_at: float

    def model(self, key: str) -> tuple[int, ModelSlot] | None:
        return self.models.get(key)


def load_version(registry: Registry, number: int) -> ServedVersion:
    """Version ``number``'s models, evicted keyed models included, each file verified before it
    is unpickled. Where several partitions hold a model of one key, the one that learned most is
    kept."""
    version = registry.version(number)
    models: dict[str, tuple[int, ModelSlot]] = {}
    for name, part in sorted(version.metadata.get("partitions", {}).items()):
        slots = registry.load_models(number, name)  # the keyed models it had evicted too
        if slots is None:
            continue
        for key, slot in slots.items():
            if key not in models or slot.learned > models[key][1].learned:
                models[key] = (int(part["partition"]), slot)
    return ServedVersion(number, models, time.time())


def split_body(body: bytes) -> tuple[list[bytes], bool]:
    """The records of a body (one JSON object, or NDJSON lines) and whether it was NDJSON."""
    text = body.strip()
    if not text:
        raise RequestError(400, "the body is empty: send a JSON object, or NDJSON lines")
    if b"\n" in text:
        try:
            json.loads(text)
        except (ValueError, RecursionError):  # not one document: NDJSON
            return [line for line in text.split(b"\n") if line.strip()], True
    return [text], False


def _finite(value: Any) -> Any:
    """``value`` as JSON can carry it: a non-finite float as null, a numpy scalar as Python's."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Records:
    """A request's decoded records: position in the request, feature dict and model key."""

    positions: list[int]
    features: list[Features]
    keys: list[str]


class Predictor:
    """Turns request bodies into answers with the version it is given."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def records(self, values: list[bytes]) -> Records:
        """The feature dict and model key of each record, as the stage builds them (a
        :class:`RequestError` if a record is not a JSON object or a feature is in none)."""
        decoded = decode_features(self.config, values)
        if decoded.failures:
            raise RequestError(400, "records are not JSON objects",
                               [(row, str(error)) for row, error in decoded.failures])
        if decoded.missing:
            raise RequestError(422, str(decoded.missing_error().args[0]))
        table = decoded.table
        rows = feature_rows(decoded.features())
        key_field = self.config.key_field
        keys = ([str(value) for value in table[key_field].to_pylist()]
                if key_field and key_field in table.column_names else [""] * len(rows))
        return Records(table[ROW_ID].to_pylist(), rows, keys)

    def predict(self, body: bytes, served: ServedVersion) -> tuple[list[dict[str, Any]], bool]:
        """One answer per record of ``body`` (a :class:`RequestError` if any record fails),
        and whether the body was NDJSON."""
        values, ndjson = split_body(body)
        records = self.records(values)
        key_field = self.config.key_field
        answers: list[dict[str, Any] | None] = [None] * len(values)
        errors = []
        for position, features, key in zip(records.positions, records.features, records.keys,
                                           strict=True):
            found = served.model(key)
            if found is None:
                errors.append((position, f"version {served.number} has no model for "
                               + (f"{key_field} {key!r}" if key_field else "this stage")))
                continue
            partition, slot = found
            try:
                prediction = slot.model.predict(features)
            except Exception as exc:  # the estimator refuses the record: the caller's to fix
                errors.append((position, f"{type(exc).__name__}: {exc}"))
                continue
            answers[position] = self._answer(prediction, served.number, slot, partition, key)
        if errors:
            raise RequestError(422, "the model cannot take some records", sorted(errors))
        return [answer for answer in answers if answer is not None], ndjson

    def _answer(self, prediction: Prediction, number: int, slot: ModelSlot, partition: int,
                key: str) -> dict[str, Any]:
        answer: dict[str, Any] = {self.config.prediction_field: _finite(prediction.value)}
        if prediction.probabilities is not None:
            answer["probabilities"] = {str(label): _finite(probability)
                                       for label, probability in prediction.probabilities.items()}
        if prediction.score is not None:
            answer["score"] = _finite(prediction.score)
        answer.update(version=number, records_learned=slot.learned, partition=partition)
        if slot.challengers is not None:  # the stage has challengers: which model is champion
            answer["champion"] = slot.name
        if self.config.key_field:
            answer["key"] = key
        return answer


class ModelServer:
    """Serves one model stage's newest registry version on a :class:`Listener` (aiohttp, on
    an event loop in a thread of its own), a thread looking for newer versions."""

    def __init__(self, pipeline: str, config: ModelConfig, serving: ServingConfig,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.serving = serving
        self.stage = config.name
        self.registry = Registry.of_stage(config.checkpoint.path, pipeline, config.name)
        self.predictor = Predictor(config)
        self.token = self._token(os.environ if environ is None else environ)
        self.served: ServedVersion | None = None
        self.port: int | None = None
        self._refused: set[int] = set()  # versions that could not be loaded
        self._listener: Listener | None = None
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()

    def _token(self, environ: Mapping[str, str]) -> str | None:
        name = self.serving.token_env
        if name is None:
            return None
        token = environ.get(name, "")
        if len(token) < MIN_TOKEN_CHARS:
            raise ServingError(f"serving of stage {self.stage} needs a bearer token in {name}, "
                               + ("which is not set" if not token else "which is shorter than "
                                  f"{MIN_TOKEN_CHARS} characters"),
                               f"set {name} to a token of at least {MIN_TOKEN_CHARS} characters")
        return token

    @property
    def url(self) -> str:
        host = self.serving.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    # --- versions -------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load the registry's newest version if it is newer than the one served; whether the
        served version changed. A version that cannot be loaded is logged once and skipped."""
        numbers = [number for number in self.registry.numbers() if number not in self._refused]
        current = self.served.number if self.served else 0
        if not numbers or numbers[-1] <= current:
            return False
        number = numbers[-1]
        try:
            served = load_version(self.registry, number)
        except Exception as exc:  # refused or gone: keep serving what we have
            self._refused.add(number)
            log.warning("stage %s: cannot serve version %d (%s: %s); still serving %s",
                        self.stage, number, type(exc).__name__, exc,
                        f"version {current}" if current else "nothing")
            return False
        self.served = served  # one assignment: a request sees the old version or the new
        log.info("stage %s: serving version %d (%d models)", self.stage, number,
                 len(served.models))
        return True

    def _poll(self) -> None:
        """Look for a newer version every ``poll_interval_s`` until :meth:`stop`."""
        while not self._stop_polling.wait(self.serving.poll_interval_s):
            try:
                self.refresh()
            except Exception as exc:  # the store unreadable for now: try again later
                log.warning("stage %s: cannot read the model registry: %s: %s", self.stage,
                            type(exc).__name__, exc)

    # --- HTTP -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Every request: the token, then the route; every error answered as JSON."""
        if self.token is not None and not hmac.compare_digest(
            request.headers.get("Authorization", "").encode(), f"Bearer {self.token}".encode()
        ):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        routes = {"/predict": ("POST", self._predict), "/healthz": ("GET", self._healthz)}
        if request.path not in routes:
            return web.json_response({"error": "no such path: POST /predict or GET /healthz"},
                                     status=404)
        method, handler = routes[request.path]
        if request.method != method:
            return web.json_response({"error": f"{request.path} takes {method}"}, status=405,
                                     headers={"Allow": method})
        try:
            async with asyncio.timeout(self.serving.request_timeout_s):
                return await handler(request)
        except TimeoutError:
            return web.json_response(
                {"error": f"the request took over {self.serving.request_timeout_s}s"},
                status=408, headers={"Connection": "close"})
        except RequestError as exc:
            return exc.response()

    async def _body(self, request: web.Request) -> bytes:
        """The whole body (by Content-Length or chunked), at most ``max_body_bytes``."""
        limit = self.serving.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise RequestError(413, f"body of {length} bytes exceeds {limit}")
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body exceeds {limit} bytes")
        return bytes(body)

    async def _predict(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        served = self.served
        if served is None:
            return web.json_response(
                {"error": f"stage {self.stage} has no model version yet (it has not checkpointed)"},
                status=503, headers={"Retry-After": "1"})
        answers, ndjson = self.predictor.predict(body, served)
        if ndjson:
            text = "".join(json.dumps(answer) + "\n" for answer in answers)
            return web.Response(text=text, content_type=NDJSON)
        return web.json_response(answers[0])

    async def _healthz(self, _request: web.Request) -> web.Response:
        served = self.served
        body = {"stage": self.stage, "version": served.number if served else None,
                "models": len(served.models) if served else 0,
                "loaded_at": served.loaded_at if served else None}
        return web.json_response(body, status=200 if served else 503)

    # --- running --------------------------------------------------------------------------

    def start(self) -> ModelServer:
        """Load the newest version, then serve until :meth:`stop`; raises
        :class:`ServingError` if the address cannot be bound."""
        self.refresh()
        serving = self.serving
        try:
            self._listener = Listener(
                [web.route("*", "/{path:.*}", self._handle)], serving.host, serving.port,
                f"serve-{self.stage}",
                ConnectionLimits(serving.max_connections, serving.keepalive_timeout_s,
                                 serving.keepalive_timeout_s, _BUSY),
                grace_s=serving.request_timeout_s)
        except OSError as exc:
            raise ServingError(
                f"serving of stage {self.stage} cannot listen on {serving.host}:{serving.port}: "
                f"{exc.strerror or exc}", "set serving.port (0 takes any free port) or "
                "serving.host, or pass --port/--host to streamflow serve") from exc
        self.port = self._listener.port
        self._listener.start()
        self._poller = threading.Thread(target=self._poll, name=f"serve-{self.stage}-poll",
                                        daemon=True)
        self._poller.start()
        where = "" if is_loopback(serving.host) else " (bearer token required)"
        log.info("stage %s: predictions at %s/predict%s, serving %s", self.stage, self.url,
                 where, f"version {self.served.number}" if self.served else "no version yet")
        return self

    def stop(self) -> None:
        """Stop serving: requests in flight are answered first (up to request_timeout_s)."""
        self._stop_polling.set()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._poller is not None:
            self._poller.join()
            self._poller = None


_BUSY_BODY = b'{"error": "too many connections; retry"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
