"""Which peers count as local: 127.0.0.0/8, ::1, their IPv4-mapped forms, and UNIX sockets."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress


def is_loopback_host(host: str | bytes) -> bool:
    """True for a loopback IP literal (mapped forms unwrapped) or the name ``localhost``."""
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return False
    if host.lower() == "localhost":
        return True
    # A scoped IPv6 literal ("::1%lo") is still ::1.
    host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_local_peer(address: IAddress | None) -> bool:
    """True when a connection's peer is on this machine over loopback or a UNIX socket.

    Anything else, including an address type we do not know, is not local.
    """
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, IPv4Address | IPv6Address):
        return is_loopback_host(address.host)
    return False
