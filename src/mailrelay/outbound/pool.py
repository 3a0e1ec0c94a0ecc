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

Shaping, all without a timer per message: messages that may not start yet (rate limits,
a throttling pause) wait in the FIFO, and one wake-up timer per provider resumes dispatching
when the head of the line may go (limits.py). A message with more recipients than
``batch_size`` is sent as several transactions, ``batch_delay`` apart, with one merged result.

Circuit breaker (breaker.py): connection setups that fail and sessions that break count
against the provider; after ``breaker_threshold`` in a row it opens, and every message is
answered at once as unavailable (the router moves on, nobody waits for a connect timeout).
When the cooldown ends, one probe connection is opened: if its session comes up the breaker
closes and the probe's connection serves the waiting traffic; if not, it opens again for
twice as long. A completed transaction closes it too.

close() is graceful: idle connections QUIT, busy ones finish the message they carry (a message
whose final dot was sent is not turned into a possible duplicate), then QUIT; after
SHUTDOWN_GRACE seconds whatever is still open is aborted.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import ProviderConfig
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.outbound.breaker import BreakerState, CircuitBreaker
from mailrelay.outbound.client import RelayClient
from mailrelay.outbound.limits import ProviderLimits, is_throttling_reply
from mailrelay.outbound.results import (
    FailureClass,
    IProvider,
    Kind,
    OutboundMessage,
    Progress,
    ProviderError,
    ProviderStatus,
    RecipientResult,
    all_results,
)
from mailrelay.outbound.session import SessionError, failure_class_of_stage
from mailrelay.outbound.tls import client_tls_options

# How long close() lets busy connections finish their message before aborting them: long
# enough for a typical final reply, short enough for a prompt stop. A process manager must
# wait longer than this before it kills (supervisor's stopwaitsecs defaults to 10 s).
SHUTDOWN_GRACE = 20.0


_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


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
        self.limits = ProviderLimits(
            rate=config.rate,
            recipient_rate=config.recipient_rate,
            daily_quota=config.daily_quota,
            connections=config.connections,
        )
        # The one timer that resumes dispatching when the limits let the next message go.
        self._wake_call: IDelayedCall | None = None
        self.breaker = CircuitBreaker(
            reactor,
            threshold=config.breaker_threshold,
            cooldown=config.breaker_cooldown,
            max_cooldown=config.breaker_max_cooldown,
            on_probe=self._probe,
            on_change=self._breaker_changed,
        )
        # True from a failed connection setup until a session comes up.
        self._setup_failing = False
        # The half-open probe's client, from its connection attempt until its session is up.
        self._probe_client: RelayClient | None = None
        # Why the last connection could not be set up (a probe's, say, with no message
        # waiting): for /health, which otherwise sees only the errors messages met.
        self._last_setup_error: ProviderError | None = None
        metrics.upstream_breaker_state.labels(self.name).set(0)
        metrics.upstream_open_connections.labels(self.name).set_function(lambda: len(self._clients))

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    def status(self) -> ProviderStatus:
        return ProviderStatus(
            state=self.breaker.state.value,
            open_connections=len(self._clients),
            next_probe_at=self.breaker.open_until,
            last_setup_error=self._last_setup_error,
        )

    @property
    def _connecting(self) -> int:
        return len(self._attempts)

    def _over_connection_limit(self) -> bool:
        """More connections that may still carry mail (not those already saying QUIT) than
        the limit allows now (it falls while a provider throttles us)."""
        limit = self.limits.connection_limit(self._reactor.seconds())
        # Counting walks every connection; at most len(_clients) of them can be live.
        return len(self._clients) > limit and sum(1 for c in self._clients if c.may_serve) > limit

    def _may_serve(self) -> bool:
        """Could anything still serve the waiting messages (an attempt, a live session)?"""
        return bool(self._attempts) or any(c.may_serve for c in self._clients)

    def deliver(
        self, message: OutboundMessage, progress: Progress | None = None
    ) -> defer.Deferred[list[RecipientResult]]:
        size = self.config.batch_size
        if not size or len(message.recipients) <= size:
            return self._enqueue(message)
        return defer.Deferred.fromCoroutine(self._deliver_in_batches(message, size, progress))

    async def _deliver_in_batches(
        self, message: OutboundMessage, size: int, progress: Progress | None
    ) -> list[RecipientResult]:
        """One transaction per ``size`` recipients, ``batch_delay`` apart, results merged in
        the message's recipient order; each batch's results but the last's reported to
        ``progress`` before the next batch starts."""
        recipients = message.recipients
        results: list[RecipientResult] = []
        for start in range(0, len(recipients), size):
            if start and self.config.batch_delay:
                await task.deferLater(self._reactor, self.config.batch_delay)
            batch = attrs.evolve(message, recipients=recipients[start : start + size])
            part = await self._enqueue(batch)
            results += part
            rest = recipients[start + size :]
            if not rest:
                break
            if part and all(r.failure is not None and r.failure.is_session for r in part):
                # The provider took nothing (down, breaker open, shutting down): the other
                # batches would fare the same, so they go on to the next provider now. Never
                # sent, so neither uncertain nor answered with a code.
                unsent = attrs.evolve(part[0], uncertain=False, code=None)
                results += [attrs.evolve(unsent, recipient=r) for r in rest]
                break
            if progress is not None:
                await progress(part)
        return results

    def _refusal(self) -> tuple[str, FailureClass] | None:
        """Why no message may be queued here now, or None."""
        if self._closing:
            return "relay shutting down", FailureClass.UNAVAILABLE
        now = self._reactor.seconds()
        if not self.breaker.allows_traffic():
            reason = f"provider {self.name} unavailable: circuit breaker {self.breaker.state.value}"
            if self.breaker.open_until is not None:
                reason += f", next probe at {_utc(self.breaker.open_until)}"
            return reason, FailureClass.UNAVAILABLE
        if self.limits.quota_exhausted(now):
            return (
                f"provider {self.name}: daily quota of {self.config.daily_quota} transactions"
                f" used, resets at {_utc(self.limits.quota.resets_at(now))}",
                FailureClass.UNAVAILABLE,
            )
        return None

    def _enqueue(self, message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        refusal = self._refusal()
        if refusal is not None:
            reply, failure = refusal
            return defer.succeed(all_results(message, Kind.TEMPORARY, reply, failure=failure))
        d: defer.Deferred[list[RecipientResult]] = defer.Deferred()
        self._waiting.append((message, d))
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        # Every condition is re-read on each turn: a callback run from here (a result handed
        # to the router, a failed attempt failing the waiting messages) may re-enter.
        while self._waiting and self._idle:
            now = self._reactor.seconds()
            message, d = self._waiting[0]
            if self.limits.quota_exhausted(now):
                self._fail_waiting(*self._refusal() or ("quota", FailureClass.UNAVAILABLE))
                return
            wait = self.limits.delay(now, len(message.recipients))
            if wait > 0:
                self._wake_in(wait)
                break
            client = self._idle.pop()
            if not client.is_ready:  # cannot happen (on_leaving removes it); never send on it
                continue
            if client.too_old:
                client.quit()  # idle past max_connection_age: replaced on demand
                continue
            self._waiting.popleft()
            result = client.send(message)
            if client.is_ready:
                # Refused without a transaction (8-bit body, no 8BITMIME): still idle.
                self._idle.append(client)
            else:
                self.limits.take(now, len(message.recipients))
                result.addCallback(self._transaction_done, now)
            result.chainDeferred(d)
        # The cheap conditions first: _setting_up() walks every connection, and a full pool
        # (the usual state under load) needs no count.
        while (
            not self._closing
            and len(self._waiting) > self._connecting
            and len(self._clients) + self._connecting
            < self.limits.connection_limit(self._reactor.seconds())
            and self.breaker.allows_traffic()
            and len(self._waiting) > self._connecting + self._setting_up()
            # After a failed setup, one attempt at a time until a session comes up: a burst
            # of parallel logins with bad credentials is how accounts get locked.
            and not (self._setup_failing and self._connecting + self._setting_up())
        ):
            if not self._connect():
                # Failed before connecting (no password, ...): once per dispatch is enough;
                # trying again at once would fail the same way, in a loop while another
                # connection keeps the messages waiting.
                break

    def _wake_in(self, delay: float) -> None:
        """Dispatch again in ``delay`` seconds: one timer per provider, the earliest wins."""
        due = self._reactor.seconds() + delay
        if self._wake_call is not None and self._wake_call.active():
            if self._wake_call.getTime() <= due:
                return
            self._wake_call.cancel()
        self._wake_call = self._reactor.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._wake_call = None
        self._dispatch()

    def _transaction_done(
        self, results: list[RecipientResult], started: float
    ) -> list[RecipientResult]:
        """What a finished transaction tells the breaker and the limits."""
        now = self._reactor.seconds()
        self._metrics.upstream_transaction_seconds.labels(self.name).observe(now - started)
        failures = {r.failure for r in results if r.failure is not None}
        throttled = any(
            r.kind is Kind.TEMPORARY and r.code is not None and is_throttling_reply(r.code, r.reply)
            for r in results
        )
        if throttled:
            self._throttled(now)
        elif any(f.counts_against_provider for f in failures):
            if self.breaker.state is BreakerState.CLOSED:
                self.breaker.record_failure()
        elif any(r.code is not None for r in results):
            self.breaker.record_success()  # the upstream answered the transaction
        return results

    def _throttled(self, now: float) -> None:
        self.limits.throttled(now)
        self._metrics.upstream_throttled.labels(self.name).inc()
        self.log.warn(
            "provider {provider} is throttling us: slowing down to {factor:.0%} of the"
            " configured pace, {connections} connection(s)",
            provider=self.name,
            factor=self.limits.throttle.factor(now),
            connections=self.limits.connection_limit(now),
        )

    def _fail_waiting(self, reply: str, failure: FailureClass) -> None:
        waiting, self._waiting = self._waiting, deque()
        for message, d in waiting:
            d.callback(all_results(message, Kind.TEMPORARY, reply, failure=failure))

    def _probe(self) -> None:
        """The breaker's cooldown is over: one connection tests the provider."""
        if self._closing:
            return
        self.log.info("provider {provider}: probing with one connection", provider=self.name)
        self._connect(probe=True)

    def _breaker_changed(self, old: BreakerState, new: BreakerState) -> None:
        self._metrics.upstream_breaker_state.labels(self.name).set(_BREAKER_GAUGE[new])
        if new is BreakerState.OPEN:
            self.log.warn(
                "provider {provider}: circuit breaker open after {failures} failure(s);"
                " messages go to the next provider until a probe at {until}",
                provider=self.name,
                failures=self.breaker.consecutive_failures,
                until=_utc(self.breaker.open_until or self._reactor.seconds()),
            )
            # Nothing waits for a provider that is down: the router moves them on now.
            reply, failure = self._refusal() or ("breaker open", FailureClass.UNAVAILABLE)
            self._fail_waiting(reply, failure)
        elif new is BreakerState.CLOSED:
            self.log.info(
                "provider {provider}: circuit breaker closed, traffic resumes",
                provider=self.name,
            )

    def _setting_up(self) -> int:
        return sum(1 for c in self._clients if c.in_setup)

    def _connect(self, probe: bool = False) -> bool:
        """Start one connection attempt; False if it failed at once (already handled).

        ``probe``: the breaker's half-open test; its outcome alone decides the breaker."""
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
            self._setup_failed(Failure(), probe)
            return False
        self._attempts.add(attempt)
        if probe:
            self._probe_client = client

        def connected(_: object) -> None:
            self._attempts.discard(attempt)
            self._clients.add(client)
            # A connection that opened but whose session fails reports through client.ready.
            client.ready.addCallbacks(self._connected, self._setup_failed, errbackArgs=(probe,))

        def not_connected(failure: Failure) -> None:
            if attempt not in self._attempts:
                return  # cancelled by close() or the grace timer: not a provider failure
            self._attempts.discard(attempt)
            self._setup_failed(failure, probe)

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
        try:
            password.encode("utf-8")
        except UnicodeEncodeError:
            # Undecodable bytes in the variable (os.environ keeps them as surrogates); the
            # error names neither the bytes nor where they are.
            raise SessionError("auth", f"{where} is not valid UTF-8") from None
        return password

    def _connected(self, client: RelayClient) -> None:
        self._metrics.upstream_connections.labels(self.name, "ok").inc()
        self._setup_failing = False
        if client is self._probe_client:
            self._probe_client = None
            self.breaker.record_success()  # the probe's session is up: traffic may return
        self._client_ready(client)

    def _setup_failed(self, failure: Failure, probe: bool = False) -> None:
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
        if probe:
            self._probe_client = None
        self._setup_failing = True
        failure_class = failure_class_of_stage(stage)
        code = getattr(error, "code", None)
        now = self._reactor.seconds()
        self._last_setup_error = ProviderError(now, failure_class.value, detail)
        if not self._may_serve():
            self._fail_waiting(
                f"provider {self.name} unavailable ({stage}: {detail})", failure_class
            )
        if (
            stage == "greeting"
            and code is not None
            and is_throttling_reply(code, detail)
            and any(c.established and c.may_serve for c in self._clients)
        ):
            # "421 too many connections" while our other sessions deliver: the provider is
            # up and limits us; fewer connections, not a failover of the whole queue.
            self._throttled(now)
        elif stage == "auth" and code is not None and 500 <= code < 600:
            # Credentials rejected: asking again soon only counts toward a lockout.
            self.breaker.trip()
        elif failure_class.counts_against_provider and (
            probe or self.breaker.state is BreakerState.CLOSED
        ):
            # May open it, which answers whatever still waits. While half-open only the
            # probe speaks for the provider: a late failure of an older attempt does not.
            self.breaker.record_failure()
        self._maybe_closed()

    def _bug(self, failure: Failure) -> None:
        self.log.failure("provider {provider}: unexpected error", failure, provider=self.name)

    def _client_ready(self, client: RelayClient) -> None:
        if client in self._idle:
            return  # already idle: a second report must not hand it two messages
        if (
            self._closing
            or client.messages_sent >= self.config.max_messages_per_connection
            or client.too_old
            or self._over_connection_limit()
        ):
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
        self.breaker.stop()
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        self._fail_waiting("relay shutting down", FailureClass.UNAVAILABLE)
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
