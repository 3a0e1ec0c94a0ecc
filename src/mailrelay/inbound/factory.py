"""The inbound SMTP factory: the loopback gate and the connection cap.

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

from mailrelay.config import SMTPConfig
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.delivery import RelayDelivery
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.metrics import Metrics
from mailrelay.netaddr import is_local_peer
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool


class _TooManyConnections(Protocol):
    """Says why and hangs up, so a client sees a 4xx instead of a silent close."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            f"421 4.7.0 {self._hostname} Too many connections, try again later\r\n".encode()
        )
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
    ) -> None:
        super().__init__()
        self.config = config
        self.timeout = config.idle_timeout  # type: ignore[assignment]  # float seconds
        self._clock = clock
        self._spool = spool
        self._on_accepted = on_accepted
        self._metrics = metrics
        # Shared by every connection, so its one-second cache holds across sessions too.
        self._free_space = free_space
        self.active: set[RelayESMTP] = set()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if addr is None or not is_local_peer(addr):
            # Returning None closes the connection before any banner is sent.
            self.log.warn("refused non-local SMTP client {peer}", peer=str(addr))
            self._metrics.connections.labels("refused_nonlocal").inc()
            return None
        if len(self.active) >= self.config.max_connections:
            self._metrics.connections.labels("refused_limit").inc()
            return _TooManyConnections(self.config.hostname)
        delivery = RelayDelivery(
            peer=addr,
            hostname=self.config.hostname,
            spool=self._spool,
            clock=self._clock,
            on_accepted=self._on_accepted,
            metrics=self._metrics,
        )
        protocol = RelayESMTP(
            self.config, self._clock, delivery, self._metrics, free_space=self._free_space
        )
        protocol.factory = self
        self.active.add(protocol)
        self._metrics.connections.labels("accepted").inc()
        return protocol

    def connectionClosed(self, protocol: RelayESMTP) -> None:
        self.active.discard(protocol)
