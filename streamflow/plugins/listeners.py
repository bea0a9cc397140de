"""For components that listen on a socket: :class:`Listener`, an aiohttp application served
from an event loop in a thread of its own, with bounded connections and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class ConnectionLimits:
    """How long and how many: a connection is dropped when the server waits on its peer longer
    than ``read_timeout_s`` at a time (for more of a request, or for it to take the answer) or
    when a request has not fully arrived ``deadline_s`` after the connection opened or the
    previous answer was handed over; at most ``max_connections`` are served at once, a further
    one is sent ``busy_response`` (if any) and closed."""

    max_connections: int
    read_timeout_s: float
    deadline_s: float
    busy_response: bytes = b""


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, under the listener's limits.

    While a request is with its handler (see :func:`_exchange`) the timers are off: the handler
    times its own reads. A peer that half-closes after a whole request still gets its answer."""

    def __init__(self, listener: Listener, inner: Callable[[], asyncio.Protocol]) -> None:
        self._listener = listener
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._request: web.BaseRequest | None = None
        self._head_complete = False  # a blank line ended a request's head since the last answer
        self._tail = b""
        self.peer_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        limits = self._listener.limits
        if self._listener.connections >= limits.max_connections:
            if limits.busy_response:
                transport.write(limits.busy_response)
            transport.close()
            return
        self._listener.connections += 1
        self._inner = self._make_inner()
        self._inner.connection_made(transport)
        self._wait_for_peer(deadline=True)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._request is None:
            self._wait_for_peer(deadline=False)
            if not self._head_complete:
                seen = self._tail + data
                self._head_complete = b"\r\n\r\n" in seen
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.peer_closed = True
        if self._request is not None:  # its body ends here; the handler answers
            self._request.content.feed_eof()
            return True
        if self._head_complete:  # a whole request is in: begin() ends its body
            return True
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            if self._request is None:
                self._wait_for_peer(deadline=False)
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(deadline=True)
        if self._inner is not None:
            self._listener.connections -= 1
            self._inner.connection_lost(exc)
            self._inner = None

    def begin(self, request: web.BaseRequest) -> None:
        """A request went to its handler: no timers until :meth:`end`."""
        self._cancel(deadline=True)
        self._request = request
        if self.peer_closed:
            request.content.feed_eof()

    def end(self) -> None:
        """The handler answered: the next request, or the taking of this answer, is timed."""
        self._request = None
        self._head_complete, self._tail = False, b""
        if self._transport is not None and not self._transport.is_closing():
            self._wait_for_peer(deadline=True)

    def _wait_for_peer(self, deadline: bool) -> None:
        """(Re)start the read timeout, and with ``deadline`` the deadline too."""
        loop = asyncio.get_running_loop()
        limits = self._listener.limits
        self._cancel(deadline=deadline)
        self._read_timer = loop.call_later(limits.read_timeout_s, self._drop)
        if deadline:
            self._deadline_timer = loop.call_later(limits.deadline_s, self._drop)

    def _cancel(self, deadline: bool) -> None:
        """Cancel the read timeout, and with ``deadline`` the deadline too."""
        for timer in (self._read_timer, self._deadline_timer if deadline else None):
            if timer is not None:
                timer.cancel()
        self._read_timer = None
        if deadline:
            self._deadline_timer = None

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.abort()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _exchange(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the connection's guard that a request is with its handler, and when it is not."""
    guard = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(guard, _Guard):
        return await handler(request)
    guard.begin(request)
    try:
        response = await handler(request)
    finally:
        guard.end()
    if guard.peer_closed:
        response.force_close()
    return response


class Listener:
    """Serves ``routes`` with aiohttp on ``host:port`` under ``limits``, from an event loop in
    a thread named ``name``. The socket is bound here (``port`` is known, an OSError says why
    not); :meth:`start` serves, :meth:`stop` answers requests in flight (up to ``grace_s``) and
    closes it."""

    def __init__(self, routes: Iterable[web.AbstractRouteDef], host: str, port: int, name: str,
                 limits: ConnectionLimits, grace_s: float = 5.0) -> None:
        self.limits = limits
        self.connections = 0  # touched only on the loop's thread
        self._app = web.Application(middlewares=[_exchange])
        self._app.add_routes(routes)
        self._grace_s = grace_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started: Future[None] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> Listener:
        self._thread.start()
        self._started.result()
        return self

    def stop(self) -> None:
        if self._loop is None or self._stopping is None:
            self._socket.close()  # never started
            return
        with contextlib.suppress(RuntimeError):  # the loop ended already
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(self._grace_s + 5)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                               shutdown_timeout=self._grace_s)
        await runner.setup()
        try:
            aiohttp_protocol = runner.server
            assert aiohttp_protocol is not None
            # TCPSite would hand aiohttp's protocol to the loop as it is; each connection's is
            # wrapped in a guard instead, for the limits aiohttp has no setting for.
            server = await self._loop.create_server(lambda: _Guard(self, aiohttp_protocol),
                                                    sock=self._socket)
            self._started.set_result(None)
            await self._stopping.wait()
            server.close()
        finally:
            await runner.cleanup()
