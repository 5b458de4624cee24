"""Whether a server can be reached, found at once: the download clients retry for minutes when it cannot."""

from __future__ import annotations

import functools
import socket
import urllib.parse


@functools.cache
def reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether the host of `url` accepts a TCP connection within `timeout_s` (asked once per process)."""
    address = urllib.parse.urlsplit(url)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=timeout_s).close()
    except (OSError, ValueError):  # refused, unresolvable, timed out; a malformed port
        return False
    return True
