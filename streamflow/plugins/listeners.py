"""For components that listen on a socket: a loopback check and a bounded threading HTTP server."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); a host name may resolve to
    any address, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once: a further one is sent
    ``busy_response`` (if any) and closed rather than queued. With ``deadline_s``, a connection
    is cut off that long after it was accepted, however slowly its peer reads or writes."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 max_connections: int, deadline_s: float | None = None,
                 busy_response: bytes = b"") -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadline_s = deadline_s
        self._busy_response = busy_response

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if self._busy_response:
                with contextlib.suppress(OSError):
                    request.setblocking(False)
                    request.send(self._busy_response)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = None
        if self._deadline_s is not None:
            deadline = threading.Timer(self._deadline_s, self._drop, (request,))
            deadline.daemon = True
            deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            if deadline is not None:
                deadline.cancel()
            self._slots.release()

    @staticmethod
    def _drop(request: socket.socket) -> None:
        """End a connection past its deadline: its thread's pending read or write returns."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)
