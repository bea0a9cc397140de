"""The HTTP endpoint on the metrics port.

- ``/metrics``: Prometheus text format.
- ``/healthz``: 200 while the process serves requests (liveness).
- ``/readyz``: 200 when the pipeline is ready, else 503 with a JSON reason (readiness).
- ``/api/status``: the pipeline graph and component state, for the dashboard.
- ``/api/history?after=T``: the per-component series of the last 15 minutes, sampled once a
  second (see history.py), later than unix time T (all without it), and the totals now.
- ``/api/dead-letters?after=N``: the latest dead letters (see letters.py), those numbered
  above N (all without it).
- ``/``: the live dashboard; its assets ship in the package (no CDN).

It is an aiohttp application on an event loop in a thread of its own (``metrics``), beside the
pipeline's threads. There is no authentication, so it listens on 127.0.0.1 unless configured
otherwise, and warns when it is. A connection is dropped when the server waits on its peer (for
more of a request, or for it to take an answer) longer than ``read_timeout_s`` at a time, or when
a request has not fully arrived ``deadline_s`` after the connection opened or the previous answer
was sent; at most ``max_connections`` are served at once, and further ones are closed at once.
Connections are kept alive between requests.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from streamflow.metrics.history import History
from streamflow.plugins.listeners import ConnectionLimits, Listener
from streamflow.plugins.loopback import is_loopback

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
Status = Callable[[], dict[str, Any]]
DeadLetters = Callable[[int], dict[str, Any]]  # those numbered above the argument

ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
}


def _asset(name: str) -> bytes:
    return resources.files("streamflow.metrics").joinpath("dashboard", name).read_bytes()


def _after(request: web.Request) -> float | None:
    """The ``after`` parameter of a query (0 without it, or empty), or None if it is no number."""
    try:
        after = float(request.query.get("after") or "0")
    except ValueError:
        return None
    return after if math.isfinite(after) else None


def _send(status: int, content_type: str, body: bytes) -> web.Response:
    return web.Response(status=status, body=body,
                        headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def _json(status: int, document: dict[str, Any]) -> web.Response:
    return _send(status, "application/json", json.dumps(document).encode())


class MetricsServer:
    """Serves metrics, health and the dashboard, and samples the dashboard's history, until
    :meth:`stop`. The port is bound on construction (an OSError says why it cannot be)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        readiness: Readiness = lambda: (True, {"status": "ready"}),
        status: Status = dict,
        dead_letters: DeadLetters = lambda _after: {"count": 0, "letters": []},
        read_timeout_s: float = 10.0,
        deadline_s: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        self.history = history = History(registry)

        async def metrics(_request: web.Request) -> web.Response:
            return _send(200, CONTENT_TYPE_LATEST, generate_latest(registry))

        async def healthz(_request: web.Request) -> web.Response:
            return _send(200, "text/plain; charset=utf-8", b"ok\n")

        async def readyz(_request: web.Request) -> web.Response:
            ready, detail = readiness()
            return _json(200 if ready else 503, detail)

        async def api_status(_request: web.Request) -> web.Response:
            return _json(200, status())

        async def api_history(request: web.Request) -> web.Response:
            after = _after(request)
            if after is None:
                return _json(400, {"error": "after must be a finite number"})
            return _json(200, history.document(after))

        async def api_dead_letters(request: web.Request) -> web.Response:
            after = _after(request)
            if after is None:
                return _json(400, {"error": "after must be a finite number"})
            return _json(200, dead_letters(int(after)))

        def asset(name: str, kind: str) -> Callable[[web.Request], Any]:
            body = _asset(name)

            async def serve(_request: web.Request) -> web.Response:
                return _send(200, kind, body)
            return serve

        async def not_found(_request: web.Request) -> web.Response:
            return _send(404, "text/plain; charset=utf-8", b"not found\n")

        routes = [
            web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz),
            web.get("/api/status", api_status), web.get("/api/history", api_history),
            web.get("/api/dead-letters", api_dead_letters),
            *(web.get(path, asset(name, kind)) for path, (name, kind) in ASSETS.items()),
            web.get("/{path:.*}", not_found),
        ]
        self.host = host
        self._listener = Listener(routes, host, port, "metrics",
                                  ConnectionLimits(max_connections, read_timeout_s, deadline_s))

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    def start(self) -> MetricsServer:
        self.history.start()
        self._listener.start()
        if not is_loopback(self.host):
            log.warning("the metrics server and dashboard listen on %s, beyond this machine, without "
                        "authentication (metrics.host); anyone who reaches %s can read them",
                        self.host, self.url)
        return self

    def stop(self) -> None:
        self._listener.stop()
        self.history.stop()
