"""Which peers count as local (127.0.0.0/8, ::1, their IPv4-mapped forms, UNIX sockets), which
may use the relay (those, plus ``smtp.allow_networks``), and the key a peer is limited by."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

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
    ip = _parse_ip(host)
    return ip is not None and ip.is_loopback


# Every session checks its peer several times (the factory, then each MAIL, RCPT and DATA),
# nearly always with the same few hosts: ipaddress parsing was ~2% of the reactor thread's
# time, measured with cProfile. The cache is bounded, and a parse has no side effect.
@functools.lru_cache(maxsize=1024)
def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP literal, an IPv4-mapped IPv6 address unwrapped to IPv4, a scope ("::1%lo") left
    out; None if ``host`` is not an IP literal."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local_peer(address: IAddress | None) -> bool:
    """True when a connection's peer is on this machine over loopback or a UNIX socket.

    Anything else, including an address type we do not know, is not local.
    """
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, IPv4Address | IPv6Address):
        return is_loopback_host(address.host)
    return False


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _peer_ip(address: IAddress) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP, an IPv4-mapped IPv6 address unwrapped to IPv4; None if it has none."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    return _parse_ip(address.host)


def peer_allowed(address: IAddress | None, allow_networks: Iterable[IPNetwork] = ()) -> bool:
    """True for a peer that may use the relay: a UNIX socket, a loopback address (IPv4, IPv6,
    or IPv4-mapped), or an address inside one of ``allow_networks`` (``smtp.allow_networks``).

    ``::ffff:10.0.0.1`` is checked as 10.0.0.1, so an IPv4 network also admits (and a missing one
    also refuses) its clients on a dual-stack socket. Anything else, including an address type
    we do not know, is refused.
    """
    if isinstance(address, UNIXAddress):
        return True
    ip = _peer_ip(address) if address is not None else None
    if ip is None:
        return False
    if ip.is_loopback:
        return True
    return any(ip.version == net.version and ip in net for net in allow_networks)


def peer_key(address: IAddress | None) -> str:
    """One string per client for per-peer limits: "unix" for every UNIX-socket client,
    "loopback" for every loopback address (on Linux a process can bind any of 127/8 and would
    otherwise be a new client for each), the /64 for IPv6 (what one host is usually given),
    the address for IPv4 (mapped IPv4 unwrapped, so a client counts once whichever socket it
    came in on)."""
    if isinstance(address, UNIXAddress):
        return "unix"
    ip = _peer_ip(address) if address is not None else None
    if ip is None:
        return str(address)
    if ip.is_loopback:
        return "loopback"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def parse_network(text: str) -> IPNetwork:
    """A CIDR (``10.0.0.0/8``, ``2001:db8::/32``) or a single address, for ``allow_networks``.

    Raises ValueError, phrased for the operator, for anything else: host bits set (likely a
    typo for another network), a /0 (every address: an open relay), or an IPv4-mapped IPv6
    network (peers are matched as IPv4: write the IPv4 network).
    """
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network (CIDR): {text!r}") from None
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValueError(f"{text!r} has host bits set (did you mean {str(network)!r}?)") from None
    if network.prefixlen == 0:
        raise ValueError(f"{text!r} would admit every address")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V4):
        raise ValueError(f"{text!r} is IPv4-mapped: write the IPv4 network instead")
    return network


_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


def canonical_peer(address: IAddress) -> IAddress | None:
    """A client address read from a PROXY header, its IP in normal form (``::1``, not
    ``0:0:0:0:0:0:0:1``; an IPv4-mapped address kept as sent); a UNIX-socket address as it is.
    None for anything else: a host that is not an IP literal (``010.0.0.1``, a name, a scope)."""
    if isinstance(address, UNIXAddress):
        return address
    if not isinstance(address, IPv4Address | IPv6Address) or "%" in address.host:
        return None
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return None
    if ip.version == 4:
        return IPv4Address(address.type, str(ip), address.port)
    return IPv6Address(address.type, str(ip), address.port)
