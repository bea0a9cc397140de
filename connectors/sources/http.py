"""A webhook: POSTed JSON objects (one, an array, or NDJSON) become records.

A request is answered 202 only after Kafka acknowledged all of its records, so a sender that
retries until it gets 202 loses nothing (at-least-once: a retry after a lost 202 or a 503 may
repeat records). The webhook has no replayable position of its own: its position is the count
of requests taken so far, kept only for reporting. A body comes with a Content-Length or
chunked. Answers: 400 malformed body (with the reason: not UTF-8, not JSON objects, nested too
deeply, a lone surrogate, shorter than its Content-Length, or not all in within
``body_timeout_s``), 401 missing or wrong bearer token, 404 other paths or methods, 411 neither
Content-Length nor chunked, 413 body over ``max_body_bytes`` (nothing published), 503 when Kafka
did not take the records within ``ack_timeout_s`` (retry) or when ``max_connections`` are already
being served.

413 also answers a request with records Kafka refused for their size (over the topic's
``max.message.bytes`` or the client's limit): those went to the pipeline's dead-letter topic, and
the body says so: ``{"error": ..., "accepted": N, "dead_lettered": [indices], "dead_letter_topic":
T}``, where the indices count the request's records from 0 and ``accepted`` counts those published
to the topic. The request is done (a 4xx): resending it would repeat the accepted records and
refuse the large ones again.

It is an aiohttp application on an event loop in a thread of its own; connections are kept alive
between requests. A connection whose request line and headers take longer than
``header_timeout_s`` is dropped, and so is one where any single read, or the peer's taking of an
answer, waits that long; a body not all in within ``body_timeout_s`` is answered 400 and its
connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.sources.records import AckTracker, encode_record, record_key
from streamflow.plugins import ComponentContext, Source, SourceBatch
from streamflow.plugins.listeners import ConnectionLimits, Listener
from streamflow.plugins.loopback import is_loopback

log = logging.getLogger(__name__)


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on; anything but loopback needs token")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on; 0 picks a free one")
    path: str = Field("/", pattern=r"^/", description="the URL path that accepts POSTs")
    token: str | None = Field(
        None, min_length=16, description="bearer token senders must present (Authorization header)"
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1, description="larger bodies are refused with 413 (nothing is published)"
    )
    ack_timeout_s: float = Field(
        10.0, gt=0, description="how long a request waits for Kafka before it is answered 503"
    )
    key_field: str | None = Field(None, description="field whose value becomes the record key")
    header_timeout_s: float = Field(
        10.0, gt=0, description="time allowed for a request's line and headers, and for any one read or "
        "write; a slower connection is dropped"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="time allowed for a request's body; a slower one is answered 400 and "
        "its connection closed"
    )
    max_connections: int = Field(
        64, ge=1, description="connections served at once; further ones are answered 503"
    )

    @model_validator(mode="after")
    def _token_unless_loopback(self) -> HttpConfig:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable from other machines: set token (a bearer "
                "token of at least 16 characters) or listen on 127.0.0.1"
            )
        return self


class BodyError(ValueError):
    """A request body that is not JSON objects; the message is sent back with the 400."""


def parse_body(body: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a body: one object, an array of objects, or NDJSON lines."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not UTF-8: {exc}") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise BodyError("body is nested too deeply") from None
    except ValueError as whole_error:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise BodyError(f"body is not JSON: {whole_error}") from None
        return [_object(_line(line, number), f"line {number}")
                for number, line in enumerate(lines, 1)]
    if isinstance(document, list):
        return [_object(item, f"element {index}") for index, item in enumerate(document)]
    return [_object(document, "body")]


def encode_body(documents: list[dict[str, Any]], key_field: str | None
                ) -> tuple[list[bytes], list[bytes | None]]:
    """The values and keys of parsed ``documents``; a string UTF-8 cannot carry (a lone
    surrogate such as ``"\\ud800"``) is a BodyError."""
    try:
        return ([encode_record(document) for document in documents],
                [record_key(document, key_field) for document in documents])
    except UnicodeEncodeError as exc:
        raise BodyError(f"body holds a string that is not valid Unicode: {exc.reason}") from None
    except RecursionError:
        raise BodyError("body is nested too deeply") from None


def _line(line: str, number: int) -> Any:
    try:
        return json.loads(line)
    except RecursionError:
        raise BodyError(f"line {number} is nested too deeply") from None
    except ValueError as exc:
        raise BodyError(f"line {number} is not JSON: {exc}") from None


def _object(document: Any, where: str) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise BodyError(f"{where} is a JSON {type(document).__name__}, expected an object")
    return document


@dataclass
class PendingRequest:
    """The records of one request, and the answer its handler waits for (``done``, set from the
    pipeline's thread)."""

    values: list[bytes]
    keys: list[bytes | None]
    done: Future[None] = field(default_factory=Future)
    acknowledged: bool = False
    dead_lettered: list[int] = field(default_factory=list)  # indices Kafka refused for size
    dead_letter_topic: str = ""

    def finish(self, acknowledged: bool) -> None:
        self.acknowledged = acknowledged
        with contextlib.suppress(InvalidStateError):  # finished already, or its wait timed out
            self.done.set_result(None)


class _Answer(Exception):
    """Ends a request with ``status`` and the JSON ``body``; ``close`` ends its connection too."""

    def __init__(self, status: HTTPStatus, body: dict[str, Any], close: bool = True,
                 **headers: str) -> None:
        super().__init__(status)
        self.response = web.json_response(body, status=status, headers={
            name.replace("_", "-"): value for name, value in headers.items()})
        if close:
            self.response.force_close()


class HttpSource(Source[HttpConfig]):
    """Listens for POSTs and emits their records; 202 once Kafka has them, 413 naming any it
    refused for their size (dead-lettered); see the module docstring and docs/sources.md."""

    config_model = HttpConfig

    def __init__(self, config: HttpConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._queue: deque[PendingRequest] = deque()
        self._ready = threading.Condition()
        self._tracker: AckTracker[PendingRequest] = AckTracker()
        self._listener: Listener | None = None
        self._closed = False
        self._batch: list[tuple[int, PendingRequest]] = []  # last polled: first row of each request

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port: 0``)."""
        assert self._listener is not None, "open() first"
        return self._listener.port

    def open(self, position: dict[str, int] | None) -> None:
        self._tracker = AckTracker((position or {}).get("requests", 0))
        config = self.config
        try:
            self._listener = Listener(
                [web.route("*", "/{path:.*}", self._handle)], config.host, config.port,
                f"http-{self.context.name}",
                ConnectionLimits(config.max_connections, config.header_timeout_s,
                                 config.header_timeout_s, _BUSY),
            )
        except OSError as exc:
            raise OSError(f"http source {self.context.name} cannot listen on "
                          f"{config.host}:{config.port}: {exc.strerror or exc}") from exc
        self._listener.start()
        log.info("http source %s listening on http://%s:%d%s", self.context.name,
                 self.config.host, self.port, self.config.path)

    def submit(self, values: list[bytes], keys: list[bytes | None]) -> PendingRequest:
        """Queue one request's records for :meth:`poll` (called by the request handler)."""
        pending = PendingRequest(values, keys)
        with self._ready:
            if self._closed:
                pending.finish(False)
            else:
                self._queue.append(pending)
                self._ready.notify()
        return pending

    def withdraw(self, pending: PendingRequest) -> None:
        """Forget a timed-out request that was not polled yet, so it is never produced."""
        with self._ready, contextlib.suppress(ValueError):
            self._queue.remove(pending)

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        values: list[bytes] = []
        keys: list[bytes | None] = []
        self._batch = []
        with self._ready:
            if not self._queue:
                self._ready.wait(timeout_s)
            while self._queue and (not values or len(values) + len(self._queue[0].values) <= max_records):
                pending = self._queue.popleft()
                self._batch.append((len(values), pending))
                values += pending.values
                keys += pending.keys
                self._tracker.polled(pending)
        return SourceBatch(values, keys)

    def position(self) -> dict[str, int]:
        return {"requests": self._tracker.polled_count}

    def dead_lettered(self, indices: list[int], topic: str) -> None:
        for first, pending in self._batch:
            pending.dead_lettered = [index - first for index in indices
                                     if first <= index < first + len(pending.values)]
            pending.dead_letter_topic = topic

    def acknowledged(self, position: dict[str, int]) -> None:
        for pending in self._tracker.release(position["requests"]):
            pending.finish(True)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
        for pending in waiting + self._tracker.drain():
            pending.finish(False)
        if self._listener is not None:
            self._listener.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            return await self._receive(request)
        except _Answer as answer:
            return answer.response

    async def _receive(self, request: web.Request) -> web.Response:
        config = self.config
        if request.method != "POST" or request.path != config.path:
            raise _Answer(HTTPStatus.NOT_FOUND, {"error": f"POST to {config.path}"})
        if config.token is not None and not hmac.compare_digest(
            request.headers.get(hdrs.AUTHORIZATION, "").encode(), f"Bearer {config.token}".encode()
        ):
            raise _Answer(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"},
                          WWW_Authenticate="Bearer")
        body = await self._body(request)
        try:
            documents = parse_body(body)
            values, keys = encode_body(documents, config.key_field)
        except BodyError as exc:
            raise _Answer(HTTPStatus.BAD_REQUEST, {"error": str(exc)}, close=False) from None
        if not documents:
            return web.json_response({"accepted": 0}, status=HTTPStatus.ACCEPTED)
        pending = self.submit(values, keys)
        try:
            await asyncio.wait_for(asyncio.wrap_future(pending.done), config.ack_timeout_s)
        except TimeoutError:
            self.withdraw(pending)
        if pending.acknowledged and pending.dead_lettered:
            raise _Answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"{len(pending.dead_lettered)} records too large for Kafka were "
                         f"dead-lettered to {pending.dead_letter_topic}; do not resend them as they are",
                "accepted": len(documents) - len(pending.dead_lettered),
                "dead_lettered": pending.dead_lettered,
                "dead_letter_topic": pending.dead_letter_topic,
            }, close=False)
        if pending.acknowledged:
            return web.json_response({"accepted": len(documents)}, status=HTTPStatus.ACCEPTED)
        raise _Answer(HTTPStatus.SERVICE_UNAVAILABLE,
                      {"error": "Kafka did not acknowledge the records in time; retry"},
                      close=False, Retry_After="1")

    async def _body(self, request: web.Request) -> bytes:
        """The whole body (by Content-Length or chunked), within ``body_timeout_s`` and with no
        read waiting over ``header_timeout_s``; else an :class:`_Answer`."""
        config = self.config
        length = request.content_length
        if length is None and "chunked" not in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower():
            raise _Answer(HTTPStatus.LENGTH_REQUIRED,
                          {"error": "Content-Length or chunked Transfer-Encoding is required"})
        if length is not None and length > config.max_body_bytes:
            raise _Answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          {"error": f"body of {length} bytes exceeds {config.max_body_bytes}"})
        body = bytearray()
        try:
            async with asyncio.timeout(config.body_timeout_s):
                while chunk := await asyncio.wait_for(request.content.readany(),
                                                      config.header_timeout_s):
                    body += chunk
                    if len(body) > config.max_body_bytes:
                        raise _Answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                            "error": f"chunked body exceeds {config.max_body_bytes} bytes"})
        except TimeoutError:
            raise _Answer(HTTPStatus.BAD_REQUEST, {
                "error": f"body not received in time ({len(body)} bytes came)"}) from None
        if length is not None and len(body) < length:
            raise _Answer(HTTPStatus.BAD_REQUEST, {
                "error": f"body ended after {len(body)} of its {length} bytes (Content-Length)"})
        return bytes(body)


_BUSY_BODY = b'{"error": "too many connections; retry"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
