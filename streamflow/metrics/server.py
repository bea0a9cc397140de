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

There is no authentication, so it listens on 127.0.0.1 unless configured otherwise, and warns
when it is. A connection is dropped when a read or write waits longer than ``read_timeout_s`` or
the whole exchange takes longer than ``deadline_s``; at most ``max_connections`` are served at
once, and further ones are closed at once.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from streamflow.metrics.history import History
from streamflow.plugins.listeners import BoundedHTTPServer, is_loopback

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


def _after(query: str) -> float | None:
    """The ``after`` parameter of a query string (0 without it), or None if it is no number."""
    try:
        after = float(parse_qs(query).get("after", ["0"])[0])
    except ValueError:
        return None
    return after if math.isfinite(after) else None


class MetricsServer:
    """Serves metrics, health and the dashboard, and samples the dashboard's history, until
    :meth:`stop`."""

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
        assets = {path: (_asset(name), kind) for path, (name, kind) in ASSETS.items()}
        self.history = history = History(registry)

        class Handler(BaseHTTPRequestHandler):
            timeout = read_timeout_s  # of each read and write on the connection

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    self._send(200, "text/plain; charset=utf-8", b"ok\n")
                elif path == "/readyz":
                    ready, detail = readiness()
                    self._json(200 if ready else 503, detail)
                elif path == "/api/status":
                    self._json(200, status())
                elif path in ("/api/history", "/api/dead-letters"):
                    after = _after(query)
                    if after is None:
                        self._json(400, {"error": "after must be a finite number"})
                        return
                    self._json(200, history.document(after) if path == "/api/history"
                               else dead_letters(int(after)))
                elif path in assets:
                    body, kind = assets[path]
                    self._send(200, kind, body)
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _json(self, code: int, document: dict[str, Any]) -> None:
                self._send(code, "application/json", json.dumps(document).encode())

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Requests are not logged: scrapes would drown everything else."""

        self._server = BoundedHTTPServer((host, port), Handler, max_connections, deadline_s)
        self.host = host
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    def start(self) -> MetricsServer:
        self.history.start()
        self._thread.start()
        if not is_loopback(self.host):
            log.warning("the metrics server and dashboard listen on %s, beyond this machine, without "
                        "authentication (metrics.host); anyone who reaches %s can read them",
                        self.host, self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.history.stop()
