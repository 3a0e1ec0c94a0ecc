"""Endpoint strings: Twisted's own syntax (``tcp:2525:interface=127.0.0.1``), checked up front.

We check them when the config is read, so a typo is a one-line config error naming the key
instead of a failure when the service starts, and so we can refuse to listen beyond loopback.
"""

from __future__ import annotations

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor


class EndpointError(ValueError):
    pass


@attrs.frozen
class ListenAddress:
    kind: str  # "tcp", "tcp6", "unix"
    interface: str | None  # None for UNIX sockets


def _split(description: str) -> list[str]:
    """Split on ':' not escaped by a backslash, removing the escapes (Twisted's quoting)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def parse_server_endpoint(description: str) -> ListenAddress:
    """Validate a listening endpoint string and say where it listens."""
    try:
        # Parsing against a memory reactor opens nothing; it checks plugin name and arguments.
        serverFromString(MemoryReactor(), description)
    except (ValueError, KeyError, TypeError) as e:
        raise EndpointError(f"not a valid endpoint string {description!r}: {e}") from None
    parts = _split(description)
    kind = parts[0].lower()
    if kind == "haproxy":
        # The loopback gate checks the socket's peer, which behind HAProxy is HAProxy itself:
        # every remote client would pass. Refused until the gate checks the PROXY header's
        # client address instead.
        raise EndpointError("haproxy: endpoints are not supported yet")
    if kind == "unix":
        return ListenAddress(kind="unix", interface=None)
    if kind not in ("tcp", "tcp6"):
        raise EndpointError(f"endpoint type {kind!r} is not supported (use tcp, tcp6, unix)")
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    # Without interface=, tcp binds every address of the machine: spell that out.
    interface = options.get("interface", "0.0.0.0" if kind == "tcp" else "::")
    return ListenAddress(kind=kind, interface=interface)
