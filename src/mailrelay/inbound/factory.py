"""The inbound SMTP factory: the peer gate, the connection caps and the shared rate limiters.

``twisted.mail.smtp`` has no ESMTPFactory of its own (pitfall 1); we subclass ``SMTPFactory``
and give each protocol its limits, clock and delivery in ``buildProtocol``, since the factory's
own ``timeout`` is never copied to the protocol.

Behind HAProxy (a ``haproxy:`` listener) ``ProxyHeaderFactory`` sits in front of it: the SMTP
protocol is built only once the PROXY header has been read, with the client address the header
names, so the peer gate, the per-peer limits, the banner and the ``Received:`` header are all
about the real client, never about the proxy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.mail import smtp
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import LimitsConfig, SMTPConfig
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.delivery import RelayDelivery
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.netaddr import IPNetwork, canonical_peer, parse_network, peer_allowed, peer_key
from mailrelay.netwrite import write_now
from mailrelay.ratelimit import KeyedRateLimiter, MailRateLimits
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool

# At stop, how long a session receiving a message may take to finish it (close_sessions).
# Well inside the 30 s an acceptor process gets to stop (acceptors.supervisor).
SHUTDOWN_GRACE = 10.0


class _Refusal(Protocol):
    """Says why and hangs up, so a client sees a 4xx instead of a silent close."""

    def __init__(self, reply: str) -> None:
        self._reply = reply

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._reply.encode("ascii", "replace") + b"\r\n")
        self.transport.loseConnection()


class RelaySMTPFactory(smtp.SMTPFactory):
    log = Logger()
    protocol = RelayESMTP  # type: ignore[assignment]  # built by hand in buildProtocol

    def __init__(
        self,
        config: SMTPConfig,
        clock: IReactorTime,
        spool: Spool,
        on_accepted: Callable[[Envelope, bytes | None], None],
        metrics: Metrics,
        free_space: FreeSpace | None = None,
        limits: LimitsConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.limits = limits if limits is not None else LimitsConfig()
        self.timeout = config.idle_timeout  # type: ignore[assignment]  # float seconds
        self._clock = clock
        self._spool = spool
        self._on_accepted = on_accepted
        self._metrics = metrics
        # Shared by every connection, so its one-second cache holds across sessions too.
        self._free_space = free_space
        self._allow_networks = tuple(parse_network(n) for n in config.allow_networks)
        # Also for the PROXY header reader in front of it (ProxyHeaderFactory).
        self.clock = clock
        self.metrics = metrics
        self.active: set[RelayESMTP] = set()
        self._shutting_down = False  # close_sessions was called
        self._close_waiters: list[defer.Deferred[None]] = []
        self._overdue: IDelayedCall | None = None  # aborts what is left after the grace
        self._peer_of: dict[RelayESMTP, str] = {}
        self._open_per_peer: dict[str, int] = {}
        # Rate limiter state lives here, shared by every connection; the clock is the factory's.
        lim = self.limits
        self.connection_rate = self._limiter(
            "connection", lim.connection_rate, lim.connection_burst
        )
        self.mail_limits = MailRateLimits(
            per_client=self._limiter("client", lim.messages_per_client, lim.client_burst),
            per_sender=self._limiter("sender", lim.messages_per_sender, lim.sender_burst),
        )
        self._export_limits()

    @property
    def allow_networks(self) -> tuple[IPNetwork, ...]:
        return self._allow_networks

    def _limiter(self, name: str, rate: float, burst: int) -> KeyedRateLimiter:
        evictions = self._metrics.ratelimit_evictions.labels(name)
        logged = False

        def evicted() -> None:
            nonlocal logged
            evictions.inc()
            if not logged:
                logged = True
                self.log.warn(
                    "the {limiter} rate limiter tracks limits.max_tracked_keys={keys} keys:"
                    " forgetting the least recently used (counted in"
                    " mailrelay_ratelimit_evictions_total; logged once)",
                    limiter=name,
                    keys=self.limits.max_tracked_keys,
                )

        limiter = KeyedRateLimiter(rate, burst, self.limits.max_tracked_keys, on_evict=evicted)
        self._metrics.ratelimit_keys.labels(name).set_function(lambda: len(limiter))
        return limiter

    def _export_limits(self) -> None:
        smtp_config, lim = self.config, self.limits
        values: dict[str, float] = {
            "max_connections": smtp_config.max_connections,
            "max_message_size": smtp_config.max_message_size,
            "max_recipients": smtp_config.max_recipients,
            "max_errors": smtp_config.max_errors,
            "idle_timeout": smtp_config.idle_timeout,
            "session_timeout": smtp_config.session_timeout,
            "connections_per_peer": lim.connections_per_peer,
            "connection_rate": lim.connection_rate,
            "connection_burst": lim.connection_burst,
            "messages_per_client": lim.messages_per_client,
            "client_burst": lim.client_burst,
            "messages_per_sender": lim.messages_per_sender,
            "sender_burst": lim.sender_burst,
            "max_tracked_keys": lim.max_tracked_keys,
        }
        for name, value in values.items():
            self._metrics.inbound_limit.labels(name).set(value)
        self._metrics.smtp_open_connections.set_function(lambda: len(self.active))

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if addr is None or not peer_allowed(addr, self._allow_networks):
            # Returning None closes the connection before any banner is sent.
            self.log.warn(
                "refused SMTP client {peer}: not on loopback or in smtp.allow_networks",
                peer=peer_key(addr),
            )
            self._metrics.connections.labels("refused_nonlocal").inc()
            return None
        hostname = self.config.hostname
        if self._shutting_down:
            self._metrics.connections.labels("refused_shutdown").inc()
            return _Refusal(f"421 4.3.2 {hostname} Service shutting down, try again later")
        if len(self.active) >= self.config.max_connections:
            self._metrics.connections.labels("refused_limit").inc()
            return _Refusal(f"421 4.7.0 {hostname} Too many connections, try again later")
        key = peer_key(addr)
        per_peer = self.limits.connections_per_peer
        if per_peer and self._open_per_peer.get(key, 0) >= per_peer:
            self.log.warn(
                "refused SMTP client {peer}: {count} connections open from it"
                " (limits.connections_per_peer)",
                peer=key,
                count=self._open_per_peer[key],
            )
            self._metrics.connections.labels("refused_peer_limit").inc()
            return _Refusal(
                f"421 4.7.0 {hostname} Too many connections from your address, try again later"
            )
        if not self.connection_rate.allow(key, self._clock.seconds()):
            self.log.warn(
                "refused SMTP client {peer}: connecting too often (limits.connection_rate)",
                peer=key,
            )
            self._metrics.connections.labels("refused_rate").inc()
            return _Refusal(
                f"421 4.7.0 {hostname} Too many connections from your address per second,"
                " try again later"
            )
        delivery = RelayDelivery(
            peer=addr,
            hostname=hostname,
            spool=self._spool,
            clock=self._clock,
            on_accepted=self._on_accepted,
            metrics=self._metrics,
            allow_networks=self._allow_networks,
        )
        protocol = RelayESMTP(
            self.config,
            self._clock,
            delivery,
            self._metrics,
            free_space=self._free_space,
            mail_limits=self.mail_limits,
        )
        protocol.factory = self
        self.active.add(protocol)
        self._peer_of[protocol] = key
        self._open_per_peer[key] = self._open_per_peer.get(key, 0) + 1
        self._metrics.connections.labels("accepted").inc()
        return protocol

    def close_sessions(self, grace: float = SHUTDOWN_GRACE) -> defer.Deferred[None]:
        """At stop, after the listening sockets closed: every session ends with a 421, a
        session receiving a message or waiting on its fsync right after that message's reply
        (RelayESMTP.shut_down); any still open after ``grace`` seconds is aborted. Fires once
        none is left. A session that would start now (a PROXY header read late) is refused,
        until the factory listens again (doStart)."""
        if not self._shutting_down:
            self._shutting_down = True
            if self.active:
                # Armed first: whatever happens below, the stop cannot wait for ever.
                self._overdue = self._clock.callLater(grace, self._abort_sessions)
                self.log.info(
                    "waiting up to {grace}s for {count} SMTP session(s) to end",
                    grace=grace,
                    count=len(self.active),
                )
            for protocol in list(self.active):
                try:
                    protocol.shut_down()
                except Exception:
                    self.log.failure("closing an SMTP session at stop failed")
        if not self.active:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def doStart(self) -> None:
        super().doStart()
        self._shutting_down = False  # listening again (a service started after a stop)

    def _abort_sessions(self) -> None:
        for protocol in list(self.active):
            try:
                protocol.abort()
            except Exception:
                self.log.failure("aborting an SMTP session at stop failed")

    def connectionClosed(self, protocol: RelayESMTP) -> None:
        self.active.discard(protocol)
        key = self._peer_of.pop(protocol, None)
        if key is not None:
            left = self._open_per_peer[key] - 1
            if left:
                self._open_per_peer[key] = left
            else:
                del self._open_per_peer[key]
        if not self.active and self._shutting_down:
            if self._overdue is not None and self._overdue.active():
                self._overdue.cancel()
            # On the next turn: not from inside the last session's connectionLost (a waiter
            # goes on to stop the I/O threads).
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                self._clock.callLater(0, waiter.callback, None)

    def open_from(self, addr: IAddress) -> int:
        """Sessions open now from the client at ``addr`` (what connections_per_peer counts)."""
        return self._open_per_peer.get(peer_key(addr), 0)


# -- PROXY protocol (haproxy: listeners) ------------------------------------------------------

# HAProxy sends its header with the connection; a connection that has not within this many
# seconds is not from HAProxy (or HAProxy is not configured with send-proxy): close it.
PROXY_HEADER_TIMEOUT = 10.0

_V1_PREFIX = V1Parser.PROXYSTR + b" "
_V1_MAX = 107  # the longest v1 line, CRLF included (the PROXY protocol spec, 2.1)
_V2_SIGNATURE = V2Parser.PREFIX


class _InvalidHeader(Exception):
    pass


class _Transport(TypingProtocol):
    """What the reader uses of the real socket transport (and passes on to the SMTP side)."""

    disconnecting: bool

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def _read_header(buffer: bytes) -> tuple[IAddress | None, IAddress | None, bytes] | None:
    """Parse a PROXY header (v1 or v2) at the start of ``buffer``.

    Returns None while more bytes are needed; else the client (source) and destination
    addresses (None for a v2 LOCAL or an UNKNOWN/UNSPEC header: a health check by the proxy
    itself) and the bytes after the header. Raises _InvalidHeader for anything else.
    """
    if buffer.startswith(_V2_SIGNATURE):
        if len(buffer) < 16:
            return None
        size = 16 + struct.unpack("!H", buffer[14:16])[0]
        if len(buffer) < size:
            return None
        header, rest = buffer[:size], buffer[size:]
        parse: Callable[[bytes], object] = V2Parser.parse
    elif buffer.startswith(_V1_PREFIX):
        end = buffer.find(b"\r\n", 0, _V1_MAX)
        if end < 0:
            if len(buffer) >= _V1_MAX:
                raise _InvalidHeader("a v1 header longer than 107 octets")
            return None
        header, rest = buffer[:end], buffer[end + 2 :]
        parse = V1Parser.parse
    elif _V2_SIGNATURE.startswith(buffer) or _V1_PREFIX.startswith(buffer):
        return None
    else:
        raise _InvalidHeader("no PROXY header")
    try:
        info = parse(header)
    except (InvalidProxyHeader, ValueError, KeyError, IndexError, struct.error):
        # Twisted's parsers let a few errors through unconverted (a port that is not a number,
        # non-ASCII bytes in an address).
        raise _InvalidHeader("not a valid PROXY header") from None
    source: IAddress | None = getattr(info, "source", None)
    destination: IAddress | None = getattr(info, "destination", None)
    if source is None:
        return None, None, rest
    client = canonical_peer(source)
    if client is None:
        raise _InvalidHeader("the client address is not an IP address")
    return client, destination, rest


@implementer(ITransport, IPushProducer)
class ProxyHeaderReader(Protocol):
    """One connection on a haproxy: listener: reads the PROXY header, then builds the SMTP
    protocol for the client the header names and is its transport from then on.

    Until the header is complete nothing is written: no banner, no reply. A connection whose
    first bytes are not a valid header, or that sends none in time, is closed in silence.
    """

    def __init__(self, factory: ProxyHeaderFactory, proxy: IAddress) -> None:
        self._factory = factory
        self._proxy = proxy  # the socket's peer: HAProxy itself
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._closing = False
        self._client: IAddress | None = None  # from the header, once read
        self._destination: IAddress | None = None
        self.wrapped: IProtocol | None = None  # the SMTP side, once the header is read

    @property
    def _socket(self) -> _Transport:
        assert self.transport is not None, "used only while connected"
        return cast(_Transport, self.transport)

    # -- the socket side --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._factory.pending.add(self)
        self._timer = self._factory.clock.callLater(
            self._factory.header_timeout, self._no_header, "no PROXY header in time"
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._closing:
            return
        self._buffer += data
        try:
            parsed = _read_header(self._buffer)
        except _InvalidHeader as e:
            self._no_header(str(e))
            return
        if parsed is None:
            return
        client, destination, rest = parsed
        self._buffer = b""
        self._header_done()
        self._client, self._destination = client, destination
        # A LOCAL header (HAProxy's own health check) has no client: the proxy is the client.
        peer = client if client is not None else self._proxy
        protocol = self._factory.wrapped.buildProtocol(peer)
        if protocol is None:
            # The gate refused the real client (it logged and counted that): no banner.
            self._close()
            return
        self.wrapped = protocol
        if ITCPTransport.providedBy(self.transport):
            # As for a direct session (RelayESMTP.connectionMade, which sees this reader, not
            # a TCP transport): replies are not held back by Nagle.
            self.transport.setTcpNoDelay(True)
        protocol.makeConnection(self)
        if rest and self.wrapped is not None and not self._socket.disconnecting:
            self.wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._header_done()
        wrapped, self.wrapped = self.wrapped, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    def _header_done(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._factory.pending.discard(self)

    def _no_header(self, why: str) -> None:
        self._factory.log.warn(
            "closed connection from {proxy} on a haproxy: listener: {why}",
            proxy=peer_key(self._proxy),
            why=why,
        )
        self._factory.metrics.connections.labels("refused_proxy_header").inc()
        self._header_done()
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer = b""
        self._socket.loseConnection()

    # -- the transport the SMTP side sees -----------------------------------------------------

    @property
    def disconnecting(self) -> bool:
        return bool(self._socket.disconnecting)

    def getPeer(self) -> IAddress:
        if self._client is not None:
            return self._client
        return self._socket.getPeer()

    def getHost(self) -> IAddress:
        if self._destination is not None:
            return self._destination
        return self._socket.getHost()

    def write(self, data: bytes) -> None:
        write_now(self._socket, data)  # at once, as a direct session's replies (netwrite)

    def writeSequence(self, data: list[bytes]) -> None:  # type: ignore[override]
        self._socket.writeSequence(data)

    def loseConnection(self) -> None:
        self._socket.loseConnection()

    def abortConnection(self) -> None:
        self._socket.abortConnection()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self._socket.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._socket.unregisterProducer()

    def pauseProducing(self) -> None:
        self._socket.pauseProducing()

    def resumeProducing(self) -> None:
        self._socket.resumeProducing()

    def stopProducing(self) -> None:
        self._socket.stopProducing()


class ProxyHeaderFactory(ServerFactory):
    """The factory of a haproxy: listener, in front of the relay's own ``RelaySMTPFactory``.

    At connect it checks the proxy itself: it must be local or in ``smtp.allow_networks``, as
    any client. The real client is checked by ``RelaySMTPFactory.buildProtocol`` once the
    header is read: loopback, a UNIX socket or ``smtp.allow_networks``, then the connection
    limits, all keyed on the client's address. Connections still waiting for their header count
    towards ``smtp.max_connections`` too: when sessions and those together reach it, a new
    connection gets the same 421 at once, without its header being read.
    """

    log = Logger()

    def __init__(
        self, wrapped: RelaySMTPFactory, header_timeout: float = PROXY_HEADER_TIMEOUT
    ) -> None:
        self.wrapped = wrapped
        self.header_timeout = header_timeout
        self.pending: set[ProxyHeaderReader] = set()

    @property
    def clock(self) -> IReactorTime:
        return self.wrapped.clock

    @property
    def metrics(self) -> Metrics:
        return self.wrapped.metrics

    def doStart(self) -> None:
        self.wrapped.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if addr is None or not peer_allowed(addr, self.wrapped.allow_networks):
            self.log.warn(
                "refused connection from {proxy} on a haproxy: listener: the proxy is not on"
                " loopback or in smtp.allow_networks",
                proxy=peer_key(addr),
            )
            self.metrics.connections.labels("refused_nonlocal").inc()
            return None
        config = self.wrapped.config
        if len(self.pending) + len(self.wrapped.active) >= config.max_connections:
            # Full already: the client, whoever it is, would get this 421 after its header.
            self.metrics.connections.labels("refused_limit").inc()
            return _Refusal(f"421 4.7.0 {config.hostname} Too many connections, try again later")
        return ProxyHeaderReader(self, addr)
