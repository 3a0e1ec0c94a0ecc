"""Endpoint strings: Twisted's own syntax (``tcp:2525:interface=127.0.0.1``), checked up front.

We check them when the config is read, so a typo is a one-line config error naming the key
instead of a failure when the service starts, and so we can refuse to listen beyond loopback.

``haproxy:`` in front of a ``tcp:``, ``tcp6:`` or ``unix:`` endpoint (``haproxy:tcp:2526:
interface=127.0.0.1``) means every connection starts with a PROXY protocol header (v1 or v2).
We do not use Twisted's own wrapper for it: that one builds the SMTP protocol (and sends the
banner) with the proxy's address, before the header is read. ``parse_server_endpoint`` strips
the prefix and says ``proxied``; the service wraps the factory in
``mailrelay.inbound.factory.ProxyHeaderFactory``, which checks the address in the header.
"""

from __future__ import annotations

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor


class EndpointError(ValueError):
    pass


@attrs.frozen
class ListenAddress:
    kind: str  # "tcp", "tcp6", "unix" (of the socket itself, under any haproxy: prefix)
    interface: str | None  # None for UNIX sockets
    # Connections start with a PROXY header (haproxy: prefix): the client is the header's.
    proxied: bool = False
    # The endpoint string of the socket itself: the description without its haproxy: prefix.
    endpoint: str = ""


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
    except (ValueError, KeyError, TypeError, OSError) as e:  # OSError: ssl: without its files
        raise EndpointError(f"not a valid endpoint string {description!r}: {e}") from None
    parts = _split(description)
    kind = parts[0].lower()
    if kind == "haproxy":
        # The endpoint type never contains an escaped ':', so the rest starts after the first.
        inner = description.split(":", 1)[1]
        if _split(inner)[0].lower() == "haproxy":
            raise EndpointError("haproxy: is given twice")
        listen = parse_server_endpoint(inner)
        return attrs.evolve(listen, proxied=True)
    if kind == "unix":
        return ListenAddress(kind="unix", interface=None, endpoint=description)
    if kind not in ("tcp", "tcp6"):
        raise EndpointError(
            f"endpoint type {kind!r} is not supported (use tcp, tcp6, unix, or haproxy: before one)"
        )
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    # Without interface=, tcp binds every address of the machine: spell that out.
    interface = options.get("interface", "0.0.0.0" if kind == "tcp" else "::")
    return ListenAddress(kind=kind, interface=interface, endpoint=description)
