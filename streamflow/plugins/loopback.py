"""Whether a listener's host is reachable from this machine only (kept apart from the listener
itself, so that checking a config never imports the HTTP server)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); a host name may resolve to
    any address, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
