"""Alert notifications as a JSON POST to a webhook.

The URL's path and query often carry the webhook's secret (Slack, Mattermost, a chat bot's
token), so it never appears in a log line or an error: only its origin (scheme://host:port).
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from mailrelay import __version__
from mailrelay.alerts.rules import ChannelError, Notice
from mailrelay.logger import Logger

# What is read of a response body; the rest is not downloaded (the connection is closed), so
# a hostile or broken endpoint cannot grow our memory or hold the attempt open.
MAX_RESPONSE_BODY = 64 * 1024
# Notifications being sent or waiting to retry, at most; see WebhookChannel.
MAX_IN_FLIGHT = 100
# Retry delays double from ``backoff`` up to this; a Retry-After is honoured up to it too.
MAX_BACKOFF = 60.0

# Worth another attempt: the endpoint is overloaded, rate-limiting us, or timed us out.
_RETRY_STATUSES = frozenset({408, 429})


class WebhookError(ChannelError):
    """The webhook did not take a notification (after the retries it was worth)."""


class WebhookOverloaded(WebhookError):
    """Too many notifications already in flight: this one was dropped unsent."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written at once (FileBodyProducer would pull in the
    global cooperator, and so the global reactor)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _CappedBody(Protocol):
    """Reads at most ``limit`` bytes of a response body; past that it stops the transfer and
    fires with what it has (the status line already said whether the POST was taken)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._abort)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        room = self._limit - self._size
        self._chunks.append(data[:room])
        self._size += min(len(data), room)
        if len(data) >= room:
            self._finish()
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The end of the body (ResponseDone), or the connection dropped: either way the
        # status is known, and a truncated body does not change it.
        self._finish()

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self._chunks))

    def _stop(self) -> None:
        if self.transport is not None:
            # A response body's transport is a push producer: stopping it closes the
            # connection, so the rest of the body is never read.
            cast(IPushProducer, self.transport).stopProducing()

    def _abort(self, _: defer.Deferred[bytes]) -> None:
        """Cancelled (the attempt's timeout): drop the connection."""
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self._stop()


def origin(url: str) -> str:
    """scheme://host:port of ``url``: all of it that may be shown (never path, query or
    user info, where webhook secrets live)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if scheme == "https" else 80
    return f"{scheme}://{host}:{port}"


def backoff_delay(retry: int, base: float, cap: float = MAX_BACKOFF) -> float:
    """Seconds before retry number ``retry`` (0-based): base, 2 base, 4 base ... up to cap."""
    return float(min(base * 2**retry, cap))


def _retry_after(response: IResponse) -> float | None:
    """A numeric Retry-After, in seconds (an HTTP date is ignored: backoff applies)."""
    values = response.headers.getRawHeaders(b"retry-after") or []
    for value in values:
        try:
            seconds = float(value.strip())
        except ValueError:
            continue
        if seconds >= 0 and seconds == seconds:  # not NaN
            return seconds
    return None


def _status_text(code: int) -> str:
    # The standard phrase, not the server's: whatever the server writes stays out of logs.
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


class WebhookChannel:
    """POSTs each notification's JSON to ``url``.

    An attempt is taken when the endpoint answers 2xx within ``timeout`` seconds. Connection
    errors, timeouts, 5xx, 408 and 429 are retried up to ``retries`` more times, after
    ``backoff`` seconds and then twice as long each time (up to a minute; a numeric
    Retry-After is waited for, up to the same minute); any other answer (a 4xx, a redirect)
    means the webhook is misconfigured, and is not retried.

    At most ``max_in_flight`` notifications are sent or waiting for a retry at once: past
    that, while the endpoint is down, a new notification fails at once with
    WebhookOverloaded, so a flapping alert cannot pile up timers and memory without bound.
    """

    name = "webhook"
    log = Logger(namespace="mailrelay.alerts")

    def __init__(
        self,
        # An Agent needs IReactorTime and IReactorTCP (plus IReactorPluggableNameResolver);
        # Twisted has no single interface for that.
        reactor: Any,
        url: str,
        timeout: float,
        retries: int,
        agent: IAgent | None = None,
        backoff: float = 1.0,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        # The URL itself is never quoted in these errors: its path may be a secret.
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError("webhook URL must be an http:// or https:// URL")
        if not url.isascii():
            raise ValueError("webhook URL must be ASCII (percent-encode the rest)")
        self._reactor = reactor
        self._uri = url.encode("ascii")
        self._url = url
        self.origin = origin(url)
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._max_in_flight = max_in_flight
        # Agent's default policy is BrowserLikePolicyForHTTPS: certificates are verified
        # against the system's CAs, with the URL's host name.
        self._agent: IAgent = agent if agent is not None else Agent(reactor)
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def send(self, notice: Notice) -> defer.Deferred[None]:
        if self._in_flight >= self._max_in_flight:
            return defer.fail(
                WebhookOverloaded(
                    f"webhook {self.origin}: {self._in_flight} notifications already pending;"
                    f" {notice.name} ({notice.kind}) dropped"
                )
            )
        body = json.dumps(notice.as_json()).encode("utf-8")
        self._in_flight += 1
        d = defer.Deferred.fromCoroutine(self._deliver(notice, body))

        def done(result: object) -> object:
            self._in_flight -= 1
            return result

        d.addBoth(done)
        return d

    async def _deliver(self, notice: Notice, body: bytes) -> None:
        attempts = self._retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await self._attempt(body)
                return
            except _Retryable as e:
                self.log.warn(
                    "webhook {origin}: alert {alert} ({status}) attempt {attempt}/{attempts}"
                    " failed: {error}",
                    origin=self.origin,
                    alert=notice.name,
                    status=notice.kind,
                    attempt=attempt,
                    attempts=attempts,
                    error=e.reason,
                    event="webhook_failed",
                )
                if attempt == attempts:
                    raise WebhookError(
                        f"webhook {self.origin}: gave up after {attempts} attempt(s): {e.reason}"
                    ) from None
                delay = backoff_delay(attempt - 1, self._backoff)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, MAX_BACKOFF))
                await task.deferLater(self._reactor, delay)

    async def _attempt(self, body: bytes) -> None:
        """One POST; returns if taken, raises _Retryable or WebhookError otherwise."""
        try:
            # Inside the try: the Agent can fail at once (a host name IDNA refuses), with an
            # error that quotes the URL, and that too goes through _describe.
            d = self._post(body)
            d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
            code, retry_after = await d
        except _Retryable:
            raise
        except Exception as e:
            if _is_cancellation(e):
                raise  # the send itself was cancelled (our timeout is a _Retryable): stop
            raise _Retryable(self._describe(e)) from None
        if 200 <= code < 300:
            return
        if code >= 500 or code in _RETRY_STATUSES:
            raise _Retryable(_status_text(code), retry_after)
        # 4xx, a redirect: the URL or the endpoint's setup is wrong; retrying cannot help.
        self.log.warn(
            "webhook {origin}: answered {error}; not retried",
            origin=self.origin,
            error=_status_text(code),
            event="webhook_refused",
        )
        raise WebhookError(f"webhook {self.origin}: refused with {_status_text(code)}")

    def _timed_out(self, result: object, timeout: float) -> tuple[int, float | None]:
        # Whatever the cancelled request failed with (CancelledError, ResponseNeverReceived,
        # ConnectingCancelledError...), the cause was our timeout.
        if isinstance(result, Failure):
            result.trap(Exception)  # consumed here: the error below replaces it
        raise _Retryable(f"no answer within {timeout:g}s")

    def _post(self, body: bytes) -> defer.Deferred[tuple[int, float | None]]:
        """The request and the (capped) body read as one cancellable Deferred of (status,
        Retry-After): the timeout covers both, and cancelling it drops the connection."""
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"User-Agent": [f"mailrelay/{__version__}".encode("ascii")],
            }
        )
        d = self._agent.request(b"POST", self._uri, headers, _BytesProducer(body))

        def read(response: IResponse) -> defer.Deferred[tuple[int, float | None]]:
            # The body is read (and dropped) so the exchange ends cleanly.
            reader = _CappedBody(MAX_RESPONSE_BODY)
            response.deliverBody(reader)
            answer = (response.code, _retry_after(response))
            return reader.done.addCallback(lambda _: answer)

        return d.addCallback(read)

    def _describe(self, e: BaseException) -> str:
        """An attempt's error as text without the URL's secret parts."""
        reasons = getattr(e, "reasons", None)  # ResponseFailed, ResponseNeverReceived, ...
        if reasons:
            inner = [r.value for r in reasons if isinstance(r, Failure)]
            text = "; ".join(f"{type(x).__name__}: {x}" for x in inner) or type(e).__name__
        else:
            text = f"{type(e).__name__}: {e}"
        return self._scrub(text)[:500]

    def _scrub(self, text: str) -> str:
        """Remove the URL, and its path and query, should an error message quote them."""
        parts = urlsplit(self._url)
        text = re.sub(re.escape(self._url), self.origin, text, flags=re.IGNORECASE)
        secret = parts.path + (f"?{parts.query}" if parts.query else "")
        for s in (secret, parts.query, parts.path, parts.password, parts.username):
            if s and len(s) >= 4:  # (a shorter one would blank every such letter)
                # Case-insensitive: some errors lower-case what they quote (IDNA does).
                text = re.sub(re.escape(s), "<redacted>", text, flags=re.IGNORECASE)
        return text


def _is_cancellation(e: BaseException) -> bool:
    if isinstance(e, defer.CancelledError):
        return True
    reasons = getattr(e, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(defer.CancelledError) for r in reasons)
