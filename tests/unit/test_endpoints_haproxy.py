"""haproxy: listeners: the PROXY header (v1 and v2) is read before anything else, and the peer
gate, the per-peer limits, the banner and the Received header are about the client it names.

Driven through the real factories on StringTransports with fake socket addresses: the socket's
peer is the proxy (127.0.0.1 unless a test says otherwise), the header names the client.
"""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailrelay.config import ConfigError, LimitsConfig, parse
from mailrelay.endpoints import EndpointError, parse_server_endpoint
from mailrelay.inbound.factory import (
    PROXY_HEADER_TIMEOUT,
    ProxyHeaderFactory,
    ProxyHeaderReader,
    RelaySMTPFactory,
)
from mailrelay.inbound.listeners import SMTPListeners
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.metrics import Metrics
from mailrelay.netaddr import canonical_peer
from mailrelay.spool.format import Envelope, decode_message
from mailrelay.spool.store import Spool
from tests.unit.test_inbound_limits import make_relay as make_inbound_relay

HOSTNAME = "relay.test"
PROXY = IPv4Address("TCP", "127.0.0.1", 51000)  # HAProxy, as the socket sees it


def v4(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


# -- PROXY headers, built by hand from the spec ----------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str, port: int = 40000, dest: str | None = None) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    dest = dest or ("::1" if family == "TCP6" else "127.0.0.1")
    return f"PROXY {family} {client} {dest} {port} 2525\r\n".encode("ascii")


def v2(client: str, port: int = 40000, dest: str | None = None, tlvs: bytes = b"") -> bytes:
    ip = ipaddress.ip_address(client)
    if ip.version == 4:
        family, addresses = 0x11, ip.packed + ipaddress.ip_address(dest or "127.0.0.1").packed
    else:
        family, addresses = 0x21, ip.packed + ipaddress.ip_address(dest or "::1").packed
    body = addresses + struct.pack("!HH", port, 2525) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    """What HAProxy sends for its own health checks: no addresses."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def v2_unix(path: bytes) -> bytes:
    body = path.ljust(108, b"\0") + b"/run/relay.sock".ljust(108, b"\0")
    return V2_SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body


HEADERS = {"v1": v1, "v2": v2}


# -- the relay behind a haproxy: listener ------------------------------------------------------


@attrs.define
class Conn:
    reader: ProxyHeaderReader
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.reader.dataReceived(data)

    def output(self) -> bytes:
        return self.transport.value()

    def lines(self) -> list[str]:
        return [line.decode("ascii") for line in self.output().split(b"\r\n")[:-1]]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def smtp(self) -> RelayESMTP:
        assert isinstance(self.reader.wrapped, RelayESMTP), self.output()
        return self.reader.wrapped

    def disconnect(self) -> None:
        """What the reactor does when the socket goes away (producer dropped first)."""
        self.transport.loseConnection()
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
            self.transport.producer = None
        self.reader.connectionLost(Failure(ConnectionError("gone")))


@attrs.define
class Relay:
    smtp_factory: RelaySMTPFactory
    factory: ProxyHeaderFactory
    clock: Clock
    metrics: Metrics
    spool: Spool
    accepted: list[Envelope]

    def connect(self, proxy: IAddress = PROXY) -> Conn:
        reader = self.factory.buildProtocol(proxy)
        assert isinstance(reader, ProxyHeaderReader), f"proxy {proxy} refused"
        transport = StringTransport(peerAddress=proxy, hostAddress=v4("127.0.0.1", 2526))
        reader.makeConnection(transport)
        return Conn(reader, transport)

    def session(self, header: bytes) -> Conn:
        conn = self.connect()
        conn.send(header)
        assert conn.lines() == [f"220 {HOSTNAME} ESMTP mailrelay"], conn.output()
        return conn

    def connections(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mailrelay_smtp_connections_total", {"result": result}
        )
        return value or 0.0


def make_relay(tmp_path: Path, limits: LimitsConfig | None = None, **smtp: Any) -> Relay:
    """The factory of test_inbound_limits behind a ProxyHeaderFactory."""
    inbound = make_inbound_relay(tmp_path, limits, **smtp)
    return Relay(
        inbound.factory,
        ProxyHeaderFactory(inbound.factory),
        inbound.clock,
        inbound.metrics,
        inbound.spool,
        inbound.accepted,
    )


# -- the gate checks the header's client, after the header and before the banner --------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nothing_is_sent_before_the_header_then_the_banner(tmp_path: Path, version: str) -> None:
    relay = make_relay(tmp_path)
    conn = relay.connect()
    assert conn.output() == b""
    assert relay.smtp_factory.active == set()  # no session (nor slot) until the header
    conn.send(HEADERS[version]("127.0.0.1", 45678))
    assert conn.lines() == [f"220 {HOSTNAME} ESMTP mailrelay"]
    assert conn.reader.getPeer() == v4("127.0.0.1", 45678)
    assert relay.smtp_factory.active == {conn.smtp}
    assert relay.connections("accepted") == 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_remote_client_behind_a_loopback_proxy_is_refused(tmp_path: Path, version: str) -> None:
    """HAProxy is on loopback, but the client it speaks for is not: closed, no banner."""
    relay = make_relay(tmp_path)
    conn = relay.connect()
    conn.send(HEADERS[version]("10.0.0.1") + b"EHLO spammer\r\n")
    assert conn.output() == b""
    assert conn.closed
    assert conn.reader.wrapped is None
    assert relay.connections("refused_nonlocal") == 1
    assert relay.smtp_factory.active == set()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_allow_networks_admits_the_remote_client(tmp_path: Path, version: str) -> None:
    relay = make_relay(tmp_path, allow_networks=("10.0.0.0/8",))
    conn = relay.session(HEADERS[version]("10.0.0.1"))
    assert not conn.closed
    other = relay.connect()
    other.send(HEADERS[version]("192.0.2.1"))
    assert other.output() == b"" and other.closed


def test_an_ipv6_client_is_checked_and_shown_in_normal_form(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, allow_networks=("2001:db8::/32",))
    conn = relay.session(v2("2001:db8::5"))  # Twisted's parser spells it 2001:db8:0:0:0:0:0:5
    assert conn.reader.getPeer() == IPv6Address("TCP", "2001:db8::5", 40000)
    conn.send(b"EHLO app\r\n")
    assert "[2001:db8::5]" in conn.lines()[1]
    refused = relay.connect()
    refused.send(v1("2001:db9::5"))
    assert refused.output() == b"" and refused.closed


def test_a_header_from_loopback_v6_and_a_unix_client_are_local(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    relay.session(v1("::1"))
    conn = relay.session(v2_unix(b"/run/app.sock"))
    assert isinstance(conn.reader.getPeer(), UNIXAddress)


def test_a_health_check_without_addresses_is_the_proxy_itself(tmp_path: Path) -> None:
    """v2 LOCAL (HAProxy's own check) and v1 UNKNOWN: the connection is the proxy's own."""
    relay = make_relay(tmp_path)
    conn = relay.session(v2_local())
    assert conn.reader.getPeer() == PROXY
    conn = relay.session(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert conn.reader.getPeer() == PROXY


def test_a_proxy_that_is_not_local_is_refused_at_connect(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    assert relay.factory.buildProtocol(v4("192.0.2.9")) is None
    assert relay.factory.buildProtocol(None) is None
    assert relay.connections("refused_nonlocal") == 2
    # A proxy elsewhere must be in allow_networks (and then so must its clients).
    relay = make_relay(tmp_path / "b", allow_networks=("192.0.2.0/24",))
    conn = relay.connect(v4("192.0.2.9"))
    conn.send(v1("127.0.0.1"))
    assert conn.lines() == [f"220 {HOSTNAME} ESMTP mailrelay"]
    # A UNIX-socket listener's proxy is local.
    relay.connect(UNIXAddress(None)).send(v1("192.0.2.10"))


# -- missing, invalid or slow headers: closed in silence ---------------------------------------

BAD_HEADERS = [
    b"EHLO client.example\r\n",  # no header at all: HAProxy without send-proxy, or a direct client
    b"GET / HTTP/1.1\r\n",
    b"PROXY\r\n",
    b"PROXY TCP4 127.0.0.1\r\n",
    b"PROXY TCP5 127.0.0.1 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 127.0.0.1 127.0.0.1 port 25\r\n",
    b"PROXY TCP4 localhost 127.0.0.1 1 25\r\n",  # a name, not an address
    b"PROXY TCP4 127.000.0.1 127.0.0.1 1 25\r\n",  # leading zeros: not one address
    b"PROXY TCP4 \xff.0.0.1 127.0.0.1 1 25\r\n",
    b"proxy TCP4 127.0.0.1 127.0.0.1 1 25\r\n",
    b"PROXY TCP4 127.0.0.1 127.0.0.1 1 25" + b" " * 80 + b"\r\n",  # longer than 107 octets
    b"PROXY " + b"x" * 200,  # no CRLF in 107 octets
    V2_SIGNATURE + bytes([0x11, 0x11]) + struct.pack("!H", 12) + b"\0" * 12,  # version 1 in v2
    V2_SIGNATURE + bytes([0x22, 0x11]) + struct.pack("!H", 12) + b"\0" * 12,  # command 2
    V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 4) + b"\x7f\0\0\x01",  # short
    V2_SIGNATURE + bytes([0x21, 0x41]) + struct.pack("!H", 12) + b"\0" * 12,  # family 4
    V2_SIGNATURE[:11] + b"X" + bytes([0x21, 0x11]) + struct.pack("!H", 0),
]


@pytest.mark.parametrize("data", BAD_HEADERS, ids=repr)
def test_a_missing_or_invalid_header_closes_without_a_banner(tmp_path: Path, data: bytes) -> None:
    relay = make_relay(tmp_path)
    conn = relay.connect()
    conn.send(data)
    assert conn.output() == b""
    assert conn.closed
    assert conn.reader.wrapped is None
    assert relay.connections("refused_proxy_header") == 1
    assert relay.factory.pending == set()
    assert relay.clock.getDelayedCalls() == []
    conn.send(v1("127.0.0.1"))  # too late: nothing more is read
    assert conn.output() == b""


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_in_pieces_is_reassembled(tmp_path: Path, version: str) -> None:
    relay = make_relay(tmp_path)
    conn = relay.connect()
    for i, byte in enumerate(HEADERS[version]("127.0.0.1")):
        assert conn.output() == b"" and not conn.closed, f"after {i} octets"
        conn.send(bytes([byte]))
    assert conn.lines() == [f"220 {HOSTNAME} ESMTP mailrelay"]


def test_commands_in_the_same_packet_as_the_header_reach_smtp(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    conn = relay.connect()
    conn.send(v2("127.0.0.1", tlvs=b"\x04\x00\x01x") + b"EHLO app\r\n")  # TLVs are skipped
    lines = conn.lines()
    assert lines[0] == f"220 {HOSTNAME} ESMTP mailrelay"
    assert lines[1].startswith(f"250-{HOSTNAME} Hello app [127.0.0.1]")


def test_no_header_in_time_closes_in_silence(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    conn = relay.connect()
    conn.send(b"PROXY TCP4 127.0")
    relay.clock.advance(PROXY_HEADER_TIMEOUT - 0.1)
    assert not conn.closed
    relay.clock.advance(0.1)
    assert conn.closed and conn.output() == b""
    assert relay.connections("refused_proxy_header") == 1
    assert relay.factory.pending == set()


def test_a_connection_lost_before_its_header_leaves_nothing_behind(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    conn = relay.connect()
    assert relay.factory.pending == {conn.reader}
    conn.disconnect()
    assert relay.factory.pending == set()
    assert relay.clock.getDelayedCalls() == []


def test_connections_waiting_for_a_header_count_towards_max_connections(
    tmp_path: Path,
) -> None:
    relay = make_relay(tmp_path, max_connections=3)
    relay.session(v1("127.0.0.1"))
    first, _second = relay.connect(), relay.connect()
    full = relay.factory.buildProtocol(PROXY)
    assert full is not None and not isinstance(full, ProxyHeaderReader)
    transport = StringTransport(peerAddress=PROXY)
    full.makeConnection(transport)
    assert (
        transport.value()
        == f"421 4.7.0 {HOSTNAME} Too many connections, try again later\r\n".encode()
    )
    assert transport.disconnecting
    assert relay.connections("refused_limit") == 1
    first.disconnect()  # gone before its header: its place is free again
    relay.connect()


# -- the session is the client's: Received header, envelope, limits ------------------------------


def test_the_message_records_the_real_client(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, allow_networks=("10.0.0.0/8",))
    conn = relay.session(v1("10.1.2.3", 33333))
    conn.send(
        b"EHLO app.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<you@example.org>\r\n"
        b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    lines = conn.lines()
    assert lines[1].startswith(f"250-{HOSTNAME} Hello app.example [10.1.2.3]"), lines
    assert lines[-2].startswith("250 2.0.0 Ok: queued as"), lines
    [envelope] = relay.accepted
    assert envelope.client == "10.1.2.3"
    [stored] = [decode_message(p.read_bytes()) for p in relay.spool.queue.iterdir()]
    assert stored.envelope.client == "10.1.2.3"
    assert stored.body.startswith(b"Received: from app.example ([10.1.2.3])\r\n"), stored.body
    assert b"127.0.0.1" not in stored.body


def test_per_peer_limits_count_the_real_client(tmp_path: Path) -> None:
    """Every connection comes from the proxy's 127.0.0.1; the limit is per header client."""
    limits = LimitsConfig(connections_per_peer=2)
    relay = make_relay(tmp_path, limits=limits, allow_networks=("10.0.0.0/8",))
    a1, _a2 = relay.session(v1("10.0.0.1", 1)), relay.session(v2("10.0.0.1", 2))
    refused = relay.connect()
    refused.send(v1("10.0.0.1", 3))
    assert refused.lines() == [
        f"421 4.7.0 {HOSTNAME} Too many connections from your address, try again later"
    ]
    assert refused.closed
    assert relay.connections("refused_peer_limit") == 1
    # Another client behind the same proxy is not affected; nor is the proxy's own address.
    relay.session(v1("10.0.0.2"))
    relay.session(v1("127.0.0.1"))
    relay.session(v2_local())
    assert relay.smtp_factory.open_from(v4("10.0.0.1")) == 2
    assert relay.smtp_factory.open_from(PROXY) == 2  # 127.0.0.1 in a header, and LOCAL
    a1.disconnect()
    assert relay.smtp_factory.open_from(v4("10.0.0.1")) == 1
    relay.session(v1("10.0.0.1", 4))


def test_max_connections_counts_sessions_behind_the_proxy(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, max_connections=1, allow_networks=("10.0.0.0/8",))
    waiting = relay.connect()
    # A session of another listener (plain TCP, same factory) takes the last place meanwhile.
    direct = relay.smtp_factory.buildProtocol(v4("127.0.0.1"))
    assert isinstance(direct, RelayESMTP)
    direct.makeConnection(StringTransport(peerAddress=v4("127.0.0.1")))
    waiting.send(v1("10.0.0.3"))
    assert waiting.lines() == [f"421 4.7.0 {HOSTNAME} Too many connections, try again later"]
    assert waiting.closed
    assert relay.connections("refused_limit") == 1


def test_a_closing_session_closes_the_socket(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    conn = relay.session(v1("127.0.0.1"))
    conn.send(b"QUIT\r\n")
    assert conn.lines()[-1].startswith("221")
    assert conn.closed
    conn.disconnect()
    assert relay.smtp_factory.active == set()
    assert relay.smtp_factory.open_from(v4("127.0.0.1")) == 0


# -- netaddr, config, service ------------------------------------------------------------------


def test_canonical_peer() -> None:
    assert canonical_peer(v4("127.0.0.1")) == v4("127.0.0.1")
    assert canonical_peer(IPv6Address("TCP", "0:0:0:0:0:0:0:1", 1)) == IPv6Address("TCP", "::1", 1)
    assert canonical_peer(v4("::1")) == IPv6Address("TCP", "::1", 40000)
    assert canonical_peer(UNIXAddress(b"/a")) == UNIXAddress(b"/a")
    for bad in ("localhost", "010.0.0.1", "::1%lo", ""):
        assert canonical_peer(v4(bad)) is None


def test_haproxy_endpoints_are_checked_by_the_socket_under_them() -> None:
    listen = parse_server_endpoint("haproxy:tcp:2526:interface=127.0.0.1")
    assert listen.proxied and listen.kind == "tcp" and listen.interface == "127.0.0.1"
    assert listen.endpoint == "tcp:2526:interface=127.0.0.1"
    assert parse_server_endpoint(r"haproxy:tcp6:2526:interface=\:\:1").interface == "::1"
    unix = parse_server_endpoint("haproxy:unix:/run/relay.sock:mode=660")
    assert unix.proxied and unix.kind == "unix" and unix.endpoint == "unix:/run/relay.sock:mode=660"
    assert not parse_server_endpoint("tcp:2525:interface=127.0.0.1").proxied
    with pytest.raises(EndpointError, match="twice"):
        parse_server_endpoint("haproxy:haproxy:tcp:2526:interface=127.0.0.1")
    with pytest.raises(EndpointError):
        parse_server_endpoint("haproxy:ssl:2526:certKey=/nonexistent.pem")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"smtp": {"listen": ["haproxy:tcp:2526"]}},
            "smtp.listen[0]: listens on 0.0.0.0, which is not a loopback address",
        ),
        (
            {"smtp": {"listen": ["haproxy:tcp:2526:interface=10.0.0.5"]}},
            "smtp.listen[0]: listens on 10.0.0.5",
        ),
        (
            {"http": {"listen": "haproxy:tcp:8025:interface=127.0.0.1"}},
            "http.listen: haproxy: endpoints are only supported in smtp.listen",
        ),
    ],
)
def test_haproxy_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        parse(data)


def test_haproxy_config_accepted() -> None:
    config = parse(
        {
            "smtp": {
                "listen": [
                    "tcp:2525:interface=127.0.0.1",
                    "haproxy:tcp:2526:interface=127.0.0.1",
                    "unix:/run/mailrelay/smtp.sock:mode=660",
                ]
            }
        }
    )
    assert config.smtp.listen[1] == "haproxy:tcp:2526:interface=127.0.0.1"
    remote = parse(
        {
            "smtp": {
                "listen": ["haproxy:tcp:2526:interface=10.0.0.5"],
                "allow_networks": ["10.0.0.0/8"],
            }
        }
    )
    assert remote.smtp.listen == ("haproxy:tcp:2526:interface=10.0.0.5",)


def test_the_service_puts_the_header_reader_in_front_of_haproxy_listeners(
    tmp_path: Path,
) -> None:
    relay = make_relay(tmp_path)
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    sock_path = str(tmp_path / "s.sock")
    listeners = SMTPListeners(
        reactor,
        [
            "haproxy:tcp:2526:interface=127.0.0.1",
            "tcp:2525:interface=127.0.0.1",
            f"haproxy:unix:{sock_path}:mode=660",
        ],
        relay.smtp_factory,
    )
    listeners.startService()
    # Listening uses our header reader, not Twisted's wrapping one; the plain one the factory.
    [(port, proxied, _b, interface), (plain_port, plain, _b2, _i2)] = reactor.tcpServers
    assert (port, interface) == (2526, "127.0.0.1")
    assert isinstance(proxied, ProxyHeaderFactory)
    assert proxied.wrapped is relay.smtp_factory
    assert (plain_port, plain) == (2525, relay.smtp_factory)
    [(path, unix, *_)] = reactor.unixServers
    assert path == sock_path
    assert isinstance(unix, ProxyHeaderFactory)
    listening = listeners.ports.result
    assert [x.proxied for x in listening] == [True, False, True]
