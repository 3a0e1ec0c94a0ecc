"""The inbound SMTP factory: the peer gate, the connection caps and the shared rate limiters.

``twisted.mail.smtp`` has no ESMTPFactory of its own (pitfall 1); we subclass ``SMTPFactory``
and give each protocol its limits, clock and delivery in ``buildProtocol``, since the factory's
own ``timeout`` is never copied to the protocol.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.mail import smtp

from mailrelay.config import LimitsConfig, SMTPConfig
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.delivery import RelayDelivery
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.metrics import Metrics
from mailrelay.netaddr import parse_network, peer_allowed, peer_key
from mailrelay.ratelimit import KeyedRateLimiter, MailRateLimits
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool


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
        on_accepted: Callable[[Envelope], None],
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
        self.active: set[RelayESMTP] = set()
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

    def connectionClosed(self, protocol: RelayESMTP) -> None:
        self.active.discard(protocol)
        key = self._peer_of.pop(protocol, None)
        if key is not None:
            left = self._open_per_peer[key] - 1
            if left:
                self._open_per_peer[key] = left
            else:
                del self._open_per_peer[key]

    def open_from(self, addr: IAddress) -> int:
        """Sessions open now from the client at ``addr`` (what connections_per_peer counts)."""
        return self._open_per_peer.get(peer_key(addr), 0)
