"""A provider reached over SMTP: up to N persistent connections, shared by every message.

Messages wait in one FIFO for a ready connection; a new connection is opened only while
messages wait and the pool is below its size. A connection carries at most
``max_messages_per_connection`` messages, then QUITs and is replaced on demand. A pool belongs
to one provider, so a connection never carries another provider's login.

When a connection cannot be set up and no other connection of the pool is alive, every waiting
message gets a temporary failure at once, so the router can move on to the next provider
instead of waiting.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import ProviderConfig
from mailrelay.metrics import Metrics
from mailrelay.outbound.client import RelayClient, SessionError
from mailrelay.outbound.results import (
    IProvider,
    Kind,
    OutboundMessage,
    RecipientResult,
    all_results,
)


def client_tls_options(provider: ProviderConfig) -> Any | None:
    """Verified TLS (chain and name, via service_identity), or None for tls = "none"."""
    if provider.tls == "none":
        return None
    if provider.ca_file is not None:
        with open(provider.ca_file, "rb") as f:
            trust: Any = Certificate.loadPEM(f.read())
    else:
        trust = platformTrust()
    return optionsForClientTLS(provider.host, trustRoot=trust)


@implementer(IProvider)
class SMTPProvider:
    log = Logger()

    def __init__(self, config: ProviderConfig, reactor: Any, metrics: Metrics) -> None:
        self.name = config.name
        self.config = config
        self._reactor = reactor
        self._metrics = metrics
        self._tls_options = client_tls_options(config)
        self._waiting: deque[tuple[OutboundMessage, defer.Deferred[list[RecipientResult]]]] = (
            deque()
        )
        self._idle: list[RelayClient] = []
        self._busy: set[RelayClient] = set()
        # Connections saying QUIT still count toward the pool size until they are gone, so
        # the upstream never sees more than `connections` connections from us.
        self._quitting: set[RelayClient] = set()
        self._connecting = 0
        self._closing = False

    @property
    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy) + len(self._quitting)

    def deliver(self, message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        if self._closing:
            return defer.succeed(all_results(message, Kind.TEMPORARY, "relay shutting down"))
        d: defer.Deferred[list[RecipientResult]] = defer.Deferred()
        self._waiting.append((message, d))
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        while self._waiting and self._idle:
            client = self._idle.pop()
            if not client.is_ready:
                continue
            message, d = self._waiting.popleft()
            self._busy.add(client)
            client.send(message).chainDeferred(d)
        wanted = len(self._waiting) - self._connecting
        room = self.config.connections - (self.open_connections + self._connecting)
        for _ in range(max(0, min(wanted, room))):
            self._connect()

    def _connect(self) -> None:
        self._connecting += 1
        password = self.config.password() if self.config.username is not None else None
        client = RelayClient(self.config, self._reactor, self._tls_options, password)
        endpoint: Any = HostnameEndpoint(
            self._reactor, self.config.host, self.config.port, timeout=self.config.connect_timeout
        )
        if self.config.tls == "implicit":
            assert self._tls_options is not None  # built for every tls other than "none"
            endpoint = wrapClientTLS(self._tls_options, endpoint)
        d = connectProtocol(endpoint, client)
        # A connection that opened but whose session fails reports through client.ready.
        d.addCallback(lambda _: client.ready)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, client: RelayClient) -> None:
        self._connecting -= 1
        self._metrics.upstream_connections.labels(self.name, "ok").inc()
        client.on_ready = self._client_ready
        client.on_closed = self._client_closed
        if self._closing:
            client.quit()
            return
        self._client_ready(client)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting -= 1
        error = failure.value
        stage = error.stage if isinstance(error, SessionError) else "connect"
        detail = error.detail if isinstance(error, SessionError) else failure.getErrorMessage()
        self._metrics.upstream_connections.labels(self.name, stage).inc()
        self.log.warn(
            "provider {provider}: connection failed at {stage}: {detail}",
            provider=self.name,
            stage=stage,
            detail=detail,
        )
        if self.open_connections == 0 and self._connecting == 0:
            waiting, self._waiting = self._waiting, deque()
            reply = f"provider {self.name} unavailable ({stage}: {detail})"
            for message, d in waiting:
                d.callback(all_results(message, Kind.TEMPORARY, reply))

    def _client_ready(self, client: RelayClient) -> None:
        self._busy.discard(client)
        if self._closing or client.messages_sent >= self.config.max_messages_per_connection:
            self._quitting.add(client)
            client.quit()
            self._dispatch()
            return
        self._idle.append(client)
        self._dispatch()

    def _client_closed(self, client: RelayClient) -> None:
        self._busy.discard(client)
        self._quitting.discard(client)
        if client in self._idle:
            self._idle.remove(client)
        if not self._closing:
            self._dispatch()

    def close(self) -> defer.Deferred[None]:
        """Refuse new work, fail what waits, QUIT idle connections, abort busy ones."""
        self._closing = True
        waiting, self._waiting = self._waiting, deque()
        for message, d in waiting:
            d.callback(all_results(message, Kind.TEMPORARY, "relay shutting down"))
        for client in list(self._idle):
            self._quitting.add(client)
            client.quit()
        self._idle.clear()
        for client in list(self._busy):
            if client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]  # TCP/TLS
        return defer.succeed(None)
