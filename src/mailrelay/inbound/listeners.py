"""The smtp.listen sockets, as one service that keeps its listening ports.

The ports are kept (``ports`` fires with them once all listen) so acceptor processes can be
handed the same sockets (mailrelay.acceptors). A ``haproxy:`` entry listens on the endpoint under
the prefix, through our PROXY header reader (not Twisted's wrapper, which would build the SMTP
protocol, and send the banner, before reading the header: see mailrelay.endpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from mailrelay.endpoints import parse_server_endpoint
from mailrelay.inbound.factory import ProxyHeaderFactory, RelaySMTPFactory


@attrs.frozen
class Listening:
    port: IListeningPort
    proxied: bool


class SMTPListeners(service.Service):
    def __init__(
        self, reactor: Any, descriptions: Sequence[str], factory: RelaySMTPFactory
    ) -> None:
        self._reactor = reactor
        self._descriptions = tuple(descriptions)
        self._factory = factory
        self._listening: list[Listening] = []
        self._started = False
        self.ports: defer.Deferred[list[Listening]] = defer.Deferred()  # once all listen

    def privilegedStartService(self) -> None:
        # Before twistd drops privileges, as strports' services do: port 25 needs root.
        super().privilegedStartService()
        if self._started:
            return
        self._started = True
        listening = []
        for description in self._descriptions:
            address = parse_server_endpoint(description)
            factory = ProxyHeaderFactory(self._factory) if address.proxied else self._factory
            d = serverFromString(self._reactor, address.endpoint).listen(factory)
            # TCP and UNIX endpoints listen at once: a port in use raises here, so twistd
            # exits saying so, as with its own services.
            outcome: list[Any] = []
            d.addBoth(outcome.append)
            if not outcome:
                raise RuntimeError(f"{description}: the endpoint did not listen at once")
            if isinstance(outcome[0], Failure):
                self.stopService()
                outcome[0].raiseException()
            listening.append(Listening(outcome[0], address.proxied))
            self._listening = listening
        self.ports.callback(listening)

    def startService(self) -> None:
        super().startService()
        self.privilegedStartService()  # (done already under twistd)

    def stopService(self) -> defer.Deferred[Any]:
        """No new connections; then the sessions end (RelaySMTPFactory.close_sessions)."""
        super().stopService()
        listening, self._listening = self._listening, []
        self._started = False
        stopped = defer.DeferredList([defer.maybeDeferred(x.port.stopListening) for x in listening])
        stopped.addCallback(lambda _: self._factory.close_sessions())
        return stopped
