"""Inbound peer gate and limits, driven through the real factory with fake peer addresses:
who may connect (loopback, UNIX sockets, smtp.allow_networks), connections per peer and per
second, MAIL rate limits per client and per sender, and that every limit shows in metrics."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from mailrelay.blocking import InlineRunner
from mailrelay.config import LimitsConfig, SMTPConfig
from mailrelay.inbound.factory import RelaySMTPFactory
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.metrics import Metrics
from mailrelay.netaddr import parse_network, peer_allowed, peer_key
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool

HOSTNAME = "relay.test"


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


LOCAL = v4("127.0.0.1")


@attrs.define
class Relay:
    """The real factory on a real spool, a task.Clock and its own metrics registry."""

    factory: RelaySMTPFactory
    clock: Clock
    metrics: Metrics
    accepted: list[Envelope]
    spool: Spool

    def connect(self, peer: IAddress = LOCAL) -> tuple[Protocol | None, StringTransport]:
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        if proto is not None:
            proto.makeConnection(transport)
        return proto, transport

    def session(self, peer: IAddress = LOCAL) -> Client:
        proto, transport = self.connect(peer)
        assert isinstance(proto, RelayESMTP), f"refused {peer}"
        client = Client(proto, transport)
        assert client.codes() == ["220 relay.test"]
        return client

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def connections(self, result: str) -> float:
        return self.sample("mailrelay_smtp_connections_total", result=result)

    def rejected(self, reason: str) -> float:
        return self.sample("mailrelay_messages_rejected_total", reason=reason)


@attrs.define
class Client:
    proto: RelayESMTP
    transport: StringTransport
    _seen: int = 0

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def replies(self) -> list[str]:
        out = self.transport.value()
        new, self._seen = out[self._seen :], len(out)
        return [line.decode("ascii") for line in new.split(b"\r\n")[:-1]]

    def codes(self) -> list[str]:
        return [" ".join(line.split(" ")[:2]) for line in self.replies()]

    def mail(self, sender: str = "sender@example.com") -> str:
        """MAIL then RSET; the MAIL reply's code and status."""
        self.send(b"MAIL FROM:<%s>\r\nRSET\r\n" % sender.encode())
        codes = self.codes()
        assert codes[-1] == "250 2.0.0", codes
        return codes[0]

    def disconnect(self) -> None:
        self.transport.loseConnection()
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
            self.transport.producer = None
        self.proto.connectionLost(None)


def make_relay(tmp_path: Path, limits: LimitsConfig | None = None, **smtp: Any) -> Relay:
    spool = Spool(tmp_path / "spool", InlineRunner())
    spool.prepare()
    clock = Clock()
    metrics = Metrics()
    accepted: list[Envelope] = []
    smtp.setdefault("hostname", HOSTNAME)
    factory = RelaySMTPFactory(
        SMTPConfig(**smtp),
        clock,
        spool,
        lambda envelope, body: accepted.append(envelope),
        metrics,
        limits=limits,
    )
    return Relay(factory, clock, metrics, accepted, spool)


@pytest.fixture
def logged() -> Iterator[Callable[[], list[str]]]:
    """``logged()``: the text of every event logged so far in the test."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    yield lambda: [formatEvent(observer[i]) for i in range(len(observer))]
    globalLogPublisher.removeObserver(observer)


# -- netaddr: peer_allowed, peer_key, parse_network ----------------------------------------------

REFUSED = [v4("10.0.0.1"), v6("2001:db8::1"), v6("::ffff:10.0.0.1"), v4("0.0.0.0"), v6("::")]
ALLOWED = [
    v4("127.0.0.1"),
    v4("127.9.9.9"),
    v6("::1"),
    v6("::ffff:127.0.0.1"),
    UNIXAddress(b"/run/mailrelay.sock"),
    UNIXAddress(None),
]


@pytest.mark.parametrize("peer", REFUSED, ids=str)
def test_peer_allowed_refuses_non_loopback_peers(peer: IAddress) -> None:
    assert not peer_allowed(peer)
    assert not peer_allowed(peer, [parse_network("192.168.0.0/16")])


@pytest.mark.parametrize("peer", ALLOWED, ids=str)
def test_peer_allowed_admits_loopback_and_unix_peers(peer: IAddress) -> None:
    assert peer_allowed(peer)


def test_peer_allowed_refuses_no_address_and_unknown_types() -> None:
    assert not peer_allowed(None)
    assert not peer_allowed(IPv4Address("TCP", "not-an-ip", 1))


@pytest.mark.parametrize(
    ("peer", "networks", "allowed"),
    [
        (v4("10.0.0.1"), ["10.0.0.0/8"], True),
        (v4("11.0.0.1"), ["10.0.0.0/8"], False),
        (v6("::ffff:10.0.0.1"), ["10.0.0.0/8"], True),  # mapped: matched as IPv4
        (v6("::ffff:11.0.0.1"), ["10.0.0.0/8"], False),
        (v6("2001:db8::1"), ["2001:db8::/32"], True),
        (v6("2001:db9::1"), ["2001:db8::/32"], False),
        (v6("2001:db8::1%eth0"), ["2001:db8::/32"], True),
        (v4("10.0.0.1"), ["2001:db8::/32"], False),  # another family never matches
        (v4("192.0.2.7"), ["10.0.0.0/8", "192.0.2.7"], True),
    ],
    ids=str,
)
def test_allow_networks_admit_only_their_addresses(
    peer: IAddress, networks: list[str], allowed: bool
) -> None:
    assert peer_allowed(peer, [parse_network(n) for n in networks]) is allowed


def test_peer_key_unwraps_mapped_addresses_and_lumps_unix_clients() -> None:
    # Every loopback address is one client: a local process can bind any of 127/8.
    assert peer_key(v6("::ffff:127.0.0.1")) == peer_key(v4("127.0.0.1")) == "loopback"
    assert peer_key(v4("127.1.2.3")) == peer_key(v6("::1")) == "loopback"
    assert peer_key(v6("::ffff:10.0.0.1")) == peer_key(v4("10.0.0.1")) == "10.0.0.1"
    # An IPv6 host usually has a whole /64 to rotate through.
    assert peer_key(v6("2001:DB8::1")) == peer_key(v6("2001:db8::ffff:1")) == "2001:db8::/64"
    assert peer_key(UNIXAddress(b"/a")) == peer_key(UNIXAddress(None)) == "unix"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense", "not an IP address or network"),
        ("10.0.0.1/8", "has host bits set (did you mean '10.0.0.0/8'?)"),
        ("0.0.0.0/0", "would admit every address"),
        ("::/0", "would admit every address"),
        ("::ffff:10.0.0.0/104", "IPv4-mapped"),
    ],
)
def test_parse_network_refusals(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_network(text)


def test_parse_network_takes_a_bare_address_as_a_single_host() -> None:
    assert parse_network("10.1.2.3") == ipaddress.ip_network("10.1.2.3/32")
    assert parse_network("2001:db8::1") == ipaddress.ip_network("2001:db8::1/128")


# -- the factory's gate ---------------------------------------------------------------------------


@pytest.mark.parametrize("peer", REFUSED, ids=str)
def test_factory_refuses_non_loopback_peers_logs_and_counts(
    tmp_path: Path, peer: IAddress, logged: Callable[[], list[str]]
) -> None:
    relay = make_relay(tmp_path)
    proto, transport = relay.connect(peer)
    assert proto is None  # closed before any banner
    assert relay.connections("refused_nonlocal") == 1
    assert relay.connections("accepted") == 0
    assert relay.factory.active == set()
    messages = logged()
    assert any(
        m.startswith(f"refused SMTP client {peer_key(peer)}: not on loopback") for m in messages
    ), messages


@pytest.mark.parametrize("peer", ALLOWED, ids=str)
def test_factory_admits_loopback_and_unix_peers(tmp_path: Path, peer: IAddress) -> None:
    relay = make_relay(tmp_path)
    relay.session(peer)
    assert relay.connections("accepted") == 1
    assert relay.connections("refused_nonlocal") == 0


def test_factory_admits_allow_networks_and_nothing_else(tmp_path: Path) -> None:
    relay = make_relay(
        tmp_path, allow_networks=("10.0.0.0/8", "2001:db8::/32"), listen=("tcp:2525",)
    )
    relay.session(v4("10.0.0.1"))
    relay.session(v6("::ffff:10.200.0.1"))
    relay.session(v6("2001:db8::1"))
    relay.session(LOCAL)  # loopback always
    assert relay.factory.buildProtocol(v4("11.0.0.1")) is None
    assert relay.factory.buildProtocol(v6("2001:db9::1")) is None
    assert relay.connections("accepted") == 4
    assert relay.connections("refused_nonlocal") == 2


def test_a_client_from_allow_networks_can_send_mail_end_to_end(tmp_path: Path) -> None:
    """The IMessageDelivery checks the peer again, with the same networks as the factory."""
    relay = make_relay(tmp_path, allow_networks=("10.0.0.0/8",), listen=("tcp:2525",))
    client = relay.session(v4("10.1.2.3"))
    client.send(b"EHLO app.example\r\n")
    client.replies()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert client.codes() == ["250 2.1.0", "250 2.1.5", "354 End"]
    client.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert client.codes()[0] == "250 2.0.0"
    assert [e.client for e in relay.accepted] == ["10.1.2.3"]


# -- connections per peer and per second ------------------------------------------------------


def test_per_peer_cap_answers_421_counts_and_frees_a_slot_on_disconnect(
    tmp_path: Path, logged: Callable[[], list[str]]
) -> None:
    relay = make_relay(tmp_path, LimitsConfig(connections_per_peer=2))
    first = relay.session(LOCAL)
    relay.session(v6("::ffff:127.0.0.1"))  # the same client, by another socket
    assert relay.factory.open_from(LOCAL) == 2

    proto, transport = relay.connect(LOCAL)
    assert proto is not None and not isinstance(proto, RelayESMTP)
    assert transport.value() == (
        b"421 4.7.0 relay.test Too many connections from your address, try again later\r\n"
    )
    assert transport.disconnecting
    assert relay.connections("refused_peer_limit") == 1
    assert any("(limits.connections_per_peer)" in m for m in logged())

    # Another loopback address is the same client, not a way around the cap.
    other, _ = relay.connect(v4("127.0.0.2"))
    assert not isinstance(other, RelayESMTP)
    relay.session(UNIXAddress(None))  # UNIX-socket clients have their own count

    first.disconnect()
    assert relay.factory.open_from(LOCAL) == 1
    relay.session(LOCAL)
    assert relay.connections("accepted") == 4
    assert relay.sample("mailrelay_smtp_open_connections") == 3


def test_per_peer_cap_zero_leaves_only_max_connections(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, LimitsConfig(connections_per_peer=0), max_connections=3)
    for _ in range(3):
        relay.session(LOCAL)
    proto, transport = relay.connect(LOCAL)
    assert transport.value().startswith(b"421 4.7.0 relay.test Too many connections, try")
    assert relay.connections("refused_limit") == 1
    assert relay.connections("refused_peer_limit") == 0


def test_connection_rate_per_client_answers_421_then_recovers(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, LimitsConfig(connection_rate=2.0, connection_burst=3))
    for _ in range(3):
        relay.session(LOCAL).disconnect()
    proto, transport = relay.connect(LOCAL)
    assert not isinstance(proto, RelayESMTP)
    assert transport.value() == (
        b"421 4.7.0 relay.test Too many connections from your address per second,"
        b" try again later\r\n"
    )
    assert relay.connections("refused_rate") == 1
    relay.session(UNIXAddress(None))  # its own key
    relay.clock.advance(0.5)  # 1/rate
    relay.session(LOCAL)
    assert relay.connections("refused_rate") == 1


def test_a_connection_refused_for_the_cap_takes_no_connection_rate(tmp_path: Path) -> None:
    relay = make_relay(
        tmp_path, LimitsConfig(connections_per_peer=1, connection_rate=1.0, connection_burst=1)
    )
    client = relay.session(LOCAL)
    relay.connect(LOCAL)
    assert relay.connections("refused_peer_limit") == 1
    client.disconnect()
    relay.clock.advance(1.0)
    relay.session(LOCAL)
    assert relay.connections("refused_rate") == 0


# -- MAIL rate limits --------------------------------------------------------------------------


def test_mail_rate_per_client_burst_then_451_then_allowed_after_an_interval(
    tmp_path: Path,
) -> None:
    relay = make_relay(tmp_path, LimitsConfig(messages_per_client=0.5, client_burst=2))
    client = relay.session(LOCAL)
    client.send(b"EHLO app.test\r\n")
    client.replies()
    assert client.mail("a@example.com") == "250 2.1.0"
    assert client.mail("b@example.com") == "250 2.1.0"
    client.send(b"MAIL FROM:<c@example.com>\r\n")
    assert client.replies() == ["451 4.7.1 Rate limit exceeded, try again later"]
    # The session goes on, and the limit is the client's, not the connection's.
    client.send(b"NOOP\r\n")
    assert client.codes() == ["250 2.0.0"]
    other = relay.session(LOCAL)
    other.send(b"EHLO app.test\r\n")
    other.replies()
    assert other.mail() == "451 4.7.1"
    assert relay.rejected("rate_client") == 2
    relay.clock.advance(1.9)
    assert client.mail() == "451 4.7.1"
    relay.clock.advance(0.1)  # 1/rate after the last unit taken
    assert client.mail() == "250 2.1.0"
    assert client.mail() == "451 4.7.1"
    assert relay.rejected("rate_client") == 4


def test_mail_rate_per_sender_is_shared_by_clients_and_case_blind(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, LimitsConfig(messages_per_sender=1.0, sender_burst=1))
    one, two = relay.session(LOCAL), relay.session(v6("::1"))
    for c in (one, two):
        c.send(b"EHLO app.test\r\n")
        c.replies()
    assert one.mail("News@Example.com") == "250 2.1.0"
    assert two.mail("news@example.COM") == "451 4.7.1"
    assert two.mail("other@example.com") == "250 2.1.0"
    assert one.mail("") == "250 2.1.0"  # the null sender is its own key
    assert two.mail("") == "451 4.7.1"
    assert relay.rejected("rate_sender") == 2
    assert relay.rejected("rate_client") == 0
    relay.clock.advance(1.0)
    assert two.mail("news@example.com") == "250 2.1.0"


def test_a_whole_message_goes_through_after_a_rate_limited_mail(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, LimitsConfig(messages_per_sender=1.0, sender_burst=1))
    client = relay.session(LOCAL)
    client.send(b"EHLO app.test\r\n")
    client.replies()
    assert client.mail() == "250 2.1.0"
    client.send(b"MAIL FROM:<sender@example.com>\r\n")
    assert client.codes() == ["451 4.7.1"]
    relay.clock.advance(1.0)
    client.send(
        b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\nhello\r\n.\r\n"
    )
    assert client.codes() == ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"]
    assert len(relay.accepted) == 1


def test_rate_limited_mails_do_not_count_toward_the_error_budget(tmp_path: Path) -> None:
    """A 451 for the rate is not the client's mistake: it must not end the session."""
    relay = make_relay(
        tmp_path, LimitsConfig(messages_per_client=1.0, client_burst=1), max_errors=3
    )
    client = relay.session(LOCAL)
    client.send(b"EHLO app.test\r\n")
    client.replies()
    assert client.mail() == "250 2.1.0"
    client.send(b"MAIL FROM:<a@b.c>\r\n" * 4 + b"NOOP\r\n")
    assert client.codes() == ["451 4.7.1"] * 4 + ["250 2.0.0"]
    assert relay.sample("mailrelay_smtp_sessions_closed_total", reason="too_many_errors") == 0


def test_by_default_mail_is_not_rate_limited(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    client = relay.session(LOCAL)
    client.send(b"EHLO app.test\r\n")
    client.replies()
    for _ in range(500):
        assert client.mail() == "250 2.1.0"
    assert relay.sample("mailrelay_ratelimit_tracked_keys", limiter="client") == 0


# -- every limit visible in metrics ----------------------------------------------------------


def test_configured_limits_are_exported(tmp_path: Path) -> None:
    relay = make_relay(
        tmp_path,
        LimitsConfig(connections_per_peer=7, messages_per_sender=2.5, sender_burst=9),
        max_connections=40,
        idle_timeout=30.0,
    )
    expected = {
        "max_connections": 40,
        "idle_timeout": 30,
        "session_timeout": 3600,
        "max_errors": 20,
        "max_recipients": 1000,
        "max_message_size": 26_214_400,
        "connections_per_peer": 7,
        "connection_rate": 0,
        "messages_per_client": 0,
        "messages_per_sender": 2.5,
        "sender_burst": 9,
        "max_tracked_keys": 100_000,
    }
    for name, value in expected.items():
        assert relay.sample("mailrelay_inbound_limit", limit=name) == value, name


def test_rate_limiter_keys_and_evictions_are_exported_and_the_first_eviction_logged(
    tmp_path: Path, logged: Callable[[], list[str]]
) -> None:
    relay = make_relay(
        tmp_path, LimitsConfig(messages_per_sender=1.0, sender_burst=1, max_tracked_keys=2)
    )
    client = relay.session(LOCAL)
    client.send(b"EHLO app.test\r\n")
    client.replies()
    for sender in ("a@x", "b@x", "c@x", "d@x"):
        assert client.mail(sender) == "250 2.1.0"
    assert relay.sample("mailrelay_ratelimit_tracked_keys", limiter="sender") == 2
    assert relay.sample("mailrelay_ratelimit_evictions_total", limiter="sender") == 2
    assert sum("max_tracked_keys=2" in m for m in logged()) == 1


def test_session_limits_are_counted(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, idle_timeout=10.0, session_timeout=15.0, max_recipients=1)
    idle = relay.session(LOCAL)
    relay.clock.advance(10.0)
    assert idle.codes() == ["421 4.4.2"]
    busy = relay.session(LOCAL)
    busy.send(b"EHLO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\n")
    assert busy.codes()[-1] == "452 4.5.3"
    for _ in range(3):
        relay.clock.advance(5.0)
        busy.send(b"NOOP\r\n")
    assert busy.codes()[-1] == "421 4.4.2"

    def closed(reason: str) -> float:
        return relay.sample("mailrelay_smtp_sessions_closed_total", reason=reason)

    assert closed("idle_timeout") == 1
    assert closed("session_timeout") == 1
    assert relay.sample("mailrelay_recipients_rejected_total", reason="too_many") == 1


def test_a_failing_spool_on_disconnect_still_frees_the_peer_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partial file's removal may fail (EIO, a read-only remount): the counts must still
    go down, or the client would get 421 until a restart."""
    from mailrelay.spool.store import MessageWriter

    def failing_abort(self: MessageWriter) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(MessageWriter, "abort", failing_abort)
    relay = make_relay(tmp_path, LimitsConfig(connections_per_peer=1))
    client = relay.session(LOCAL)
    client.send(b"EHLO app.test\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\npartial\r\n")
    with pytest.raises(OSError):
        client.disconnect()
    assert relay.factory.open_from(LOCAL) == 0
    relay.session(LOCAL)


def test_a_wall_clock_stepped_back_does_not_lock_a_client_out() -> None:
    from mailrelay.ratelimit import KeyedRateLimiter

    limiter = KeyedRateLimiter(1.0, 5)
    for _ in range(5):
        assert limiter.allow("c", 10_000.0)
    assert not limiter.allow("c", 10_000.0)
    # NTP steps the clock back an hour: the key is owed at most one burst, not an hour.
    assert limiter.retry_after("c", 6_400.0) <= 1.0
    assert limiter.allow("c", 6_401.0)
