"""A provider reached over SMTP: up to N persistent connections, shared by every message.

Messages wait in one FIFO for a ready connection; a new connection is opened only while
messages wait and the pool is below its size. A connection carries at most
``max_messages_per_connection`` messages, then QUITs and is replaced on demand. A pool belongs
to one provider, so a connection never carries another provider's login.

When a connection cannot be set up and no other connection of the pool is alive, every waiting
message gets a temporary failure at once, so the router can move on to the next provider
instead of waiting. Not having the password (unset variable, unreadable file) is such a setup
failure, at stage "auth", found before any connection is opened.

Bookkeeping: ``_clients`` holds every connected client until its connection is gone (setting
up, idle, busy, quitting, aborting), ``_connecting`` counts attempts without a connection yet;
their sum never exceeds ``connections``. ``_idle`` holds the ready clients, each once.

close() is graceful: idle connections QUIT, busy ones finish the message they carry (a message
whose final dot was sent is not turned into a possible duplicate), then QUIT; after
SHUTDOWN_GRACE seconds whatever is still open is aborted.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
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

# How long close() lets busy connections finish their message before aborting them: long
# enough for a typical final reply, short enough for a prompt stop. A process manager must
# wait longer than this before it kills (supervisor's stopwaitsecs defaults to 10 s).
SHUTDOWN_GRACE = 20.0


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
        self.on_temporary = config.on_temporary
        self.on_permanent = config.on_permanent
        self._reactor = reactor
        self._metrics = metrics
        self._tls_options = client_tls_options(config)
        self._waiting: deque[tuple[OutboundMessage, defer.Deferred[list[RecipientResult]]]] = (
            deque()
        )
        # Every client whose connection is open, whatever it is doing, added when the TCP
        # connection is made and removed only when it is lost: what the upstream sees.
        self._clients: set[RelayClient] = set()
        # Ready clients with nothing to do, each at most once (LIFO: the oldest ones idle out).
        self._idle: list[RelayClient] = []
        # Connection attempts that have no TCP connection yet (cancelled by close()).
        self._attempts: set[defer.Deferred[Any]] = set()
        self._closing = False
        self._close_waiters: list[defer.Deferred[None]] = []
        self._grace_call: IDelayedCall | None = None

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    @property
    def _connecting(self) -> int:
        return len(self._attempts)

    def _may_serve(self) -> bool:
        """Could anything still serve the waiting messages (an attempt, a live session)?"""
        return bool(self._attempts) or any(c.may_serve for c in self._clients)

    def deliver(self, message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        if self._closing:
            return defer.succeed(all_results(message, Kind.TEMPORARY, "relay shutting down"))
        d: defer.Deferred[list[RecipientResult]] = defer.Deferred()
        self._waiting.append((message, d))
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        # Every condition is re-read on each turn: a callback run from here (a result handed
        # to the router, a failed attempt failing the waiting messages) may re-enter.
        while self._waiting and self._idle:
            client = self._idle.pop()
            if not client.is_ready:  # cannot happen (on_leaving removes it); never send on it
                continue
            message, d = self._waiting.popleft()
            result = client.send(message)
            if client.is_ready:
                # Refused without a transaction (8-bit body, no 8BITMIME): still idle.
                self._idle.append(client)
            result.chainDeferred(d)
        while (
            not self._closing
            and len(self._waiting) > self._connecting + self._setting_up()
            and len(self._clients) + self._connecting < self.config.connections
        ):
            if not self._connect():
                # Failed before connecting (no password, ...): once per dispatch is enough;
                # trying again at once would fail the same way, in a loop while another
                # connection keeps the messages waiting.
                break

    def _setting_up(self) -> int:
        return sum(1 for c in self._clients if c.in_setup)

    def _connect(self) -> bool:
        """Start one connection attempt; False if it failed at once (already handled)."""
        attempt: defer.Deferred[Any] | None = None
        try:
            # Read at the moment it is needed; before the connection, so a missing secret
            # never opens one, and never sends AUTH with an empty password.
            password = self._password()
            client = RelayClient(self.config, self._reactor, self._tls_options, password)
            client.on_ready = self._client_ready
            client.on_leaving = self._client_leaving
            client.on_closed = self._client_closed
            endpoint: Any = HostnameEndpoint(
                self._reactor,
                self.config.host,
                self.config.port,
                timeout=self.config.connect_timeout,
            )
            if self.config.tls == "implicit":
                assert self._tls_options is not None  # built for every tls other than "none"
                endpoint = wrapClientTLS(self._tls_options, endpoint)
            attempt = connectProtocol(endpoint, client)
        except Exception:
            # Whatever went wrong, it is this attempt's failure: the counters stay right and
            # the waiting messages are answered like after any failed connection.
            self._setup_failed(Failure())
            return False
        self._attempts.add(attempt)

        def connected(_: object) -> None:
            self._attempts.discard(attempt)
            self._clients.add(client)
            # A connection that opened but whose session fails reports through client.ready.
            client.ready.addCallbacks(self._connected, self._setup_failed)

        def not_connected(failure: Failure) -> None:
            if attempt not in self._attempts:
                return  # cancelled by close() or the grace timer: not a provider failure
            self._attempts.discard(attempt)
            self._setup_failed(failure)

        attempt.addCallbacks(connected, not_connected)
        attempt.addErrback(self._bug)
        return True

    def _password(self) -> str | None:
        """The AUTH secret, read now, or SessionError("auth") when it cannot be had.

        The error names the variable or file, never a value read from it.
        """
        config = self.config
        if config.username is None:
            return None
        if config.password_env is not None:
            where = f"password_env {config.password_env}"
        elif config.password_file is not None:
            where = f"password_file {config.password_file}"
        else:
            raise SessionError("auth", "no password_env or password_file configured")
        try:
            password = config.password()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise SessionError("auth", f"cannot read {where}: {reason}") from None
        except Exception as e:  # e.g. UnicodeDecodeError, whose text quotes the bytes
            raise SessionError("auth", f"cannot read {where}: {type(e).__name__}") from None
        if password is None:
            raise SessionError("auth", f"{where} is not set")
        if not password:
            raise SessionError("auth", f"{where} is empty")
        return password

    def _connected(self, client: RelayClient) -> None:
        self._metrics.upstream_connections.labels(self.name, "ok").inc()
        self._client_ready(client)

    def _setup_failed(self, failure: Failure) -> None:
        error = failure.value
        if self._closing and isinstance(error, SessionError) and error.stage == "shutdown":
            return  # aborted by our own grace timer: not the provider's failure
        stage = error.stage if isinstance(error, SessionError) else "connect"
        detail = error.detail if isinstance(error, SessionError) else failure.getErrorMessage()
        self._metrics.upstream_connections.labels(self.name, stage).inc()
        self.log.warn(
            "provider {provider}: connection failed at {stage}: {detail}",
            provider=self.name,
            stage=stage,
            detail=detail,
        )
        if not self._may_serve():
            waiting, self._waiting = self._waiting, deque()
            reply = f"provider {self.name} unavailable ({stage}: {detail})"
            for message, d in waiting:
                d.callback(all_results(message, Kind.TEMPORARY, reply))
        self._maybe_closed()

    def _bug(self, failure: Failure) -> None:
        self.log.failure("provider {provider}: unexpected error", failure, provider=self.name)

    def _client_ready(self, client: RelayClient) -> None:
        if client in self._idle:
            return  # already idle: a second report must not hand it two messages
        if self._closing or client.messages_sent >= self.config.max_messages_per_connection:
            client.quit()  # still counted in _clients until it is gone
        else:
            self._idle.append(client)
        self._dispatch()

    def _client_leaving(self, client: RelayClient) -> None:
        """A ready client is going away (idle timeout, 421, broken session): not idle now."""
        if client in self._idle:
            self._idle.remove(client)

    def _client_closed(self, client: RelayClient) -> None:
        self._clients.discard(client)
        self._client_leaving(client)
        if self._closing:
            self._maybe_closed()
        elif client.established or (self._waiting and not self._may_serve()):
            # A slot is free. After a failed setup only when messages arrived meanwhile and
            # nothing else could serve them (they would wait forever): one fresh attempt,
            # whose failure answers them. Otherwise the failure was handled already, and
            # reconnecting here would hammer a failing upstream while another connection lives.
            self._dispatch()

    def close(self) -> defer.Deferred[None]:
        """Refuse new work and fail what waits; QUIT idle connections; let busy ones finish
        their message, then QUIT. Fires once every connection is gone, or after
        SHUTDOWN_GRACE seconds, when whatever is left is aborted."""
        d: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(d)
        if self._closing:
            if self._grace_call is None and not self._done():
                # The grace period is over: what is left was aborted and only waits for its
                # transport to report the loss.
                self._fire_close()
            else:
                self._maybe_closed()
            return d
        self._closing = True
        waiting, self._waiting = self._waiting, deque()
        for message, waiting_d in waiting:
            waiting_d.callback(all_results(message, Kind.TEMPORARY, "relay shutting down"))
        self._cancel_attempts()  # nothing to finish on a connection not yet open
        for client in list(self._idle):
            client.quit()
        self._idle.clear()
        # Clients setting up QUIT once ready (_client_ready), busy ones once their message is
        # answered; both are bounded by the grace period.
        if not self._done():
            self._grace_call = self._reactor.callLater(SHUTDOWN_GRACE, self._grace_expired)
        self._maybe_closed()
        return d

    def _cancel_attempts(self) -> None:
        attempts, self._attempts = self._attempts, set()
        for attempt in attempts:
            attempt.cancel()

    def _done(self) -> bool:
        return not self._clients and not self._attempts

    def _grace_expired(self) -> None:
        self._grace_call = None
        self._cancel_attempts()
        for client in list(self._clients):
            client.abort("relay shutting down")
        self._fire_close()

    def _maybe_closed(self) -> None:
        if self._closing and self._done():
            if self._grace_call is not None and self._grace_call.active():
                self._grace_call.cancel()
            self._grace_call = None
            self._fire_close()

    def _fire_close(self) -> None:
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
