"""Shared fakes and helpers for the outbound, queue and spool unit tests (no sockets).

- ``result_of`` / ``failure_of``: a Deferred that must already have fired (everything here runs
  synchronously: StringTransport, task.Clock, InlineRunner).
- ``RecordingTransport``: a StringTransport that claims ITCPTransport (so the client asks for
  TCP_NODELAY) and remembers each write separately, so "one write" can be asserted.
- ``TLSTransport``: the same, plus ``startTLS`` (records the context it got).
- ``Upstream``: the server end of one connection to a RelayClient: feed replies, read what the
  client wrote.
- ``FakeProvider``: an IProvider whose answers the test scripts.
- ``LogCapture``: every twisted.logger event emitted while it is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol, ITCPTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.blocking import InlineRunner
from mailrelay.config import ProviderConfig
from mailrelay.outbound.results import (
    IProvider,
    Kind,
    OutboundMessage,
    Progress,
    ProviderError,
    ProviderStatus,
    RecipientResult,
    all_results,
)
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool

T = TypeVar("T")

# Distinct values, so a test can tell which stage's timer fired.
TIMEOUTS = {
    "greeting_timeout": 10.0,
    "command_timeout": 20.0,
    "data_timeout": 40.0,
    "final_timeout": 50.0,
    "idle_timeout": 30.0,
}

EHLO_PIPELINING = b"250-upstream.test\r\n250-PIPELINING\r\n250-SIZE 10000000\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-upstream.test\r\n250 8BITMIME\r\n"


# -- Deferreds --------------------------------------------------------------------------------


def result_of(d: defer.Deferred[T]) -> T:
    """The result of a Deferred that must have fired successfully already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    result = results[0]
    if isinstance(result, Failure):
        d.addErrback(lambda _: None)  # handled here; keep the failure out of the GC log
        raise AssertionError(f"{d!r} failed: {result.getTraceback()}")
    value: T = result
    return value


def failure_of(d: defer.Deferred[Any]) -> Failure:
    """The Failure of a Deferred that must have failed already (the failure is consumed)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    assert isinstance(results[0], Failure), f"{d!r} succeeded with {results[0]!r}"
    failure: Failure = results[0]
    return failure


def has_fired(d: defer.Deferred[Any]) -> bool:
    return bool(d.called)


# -- configuration and values -----------------------------------------------------------------


def provider_config(**overrides: Any) -> ProviderConfig:
    """A plain-SMTP provider on loopback with distinct per-stage timeouts."""
    values: dict[str, Any] = {
        "name": "p",
        "host": "127.0.0.1",
        "port": 25,
        "tls": "none",
        "helo": "relay.test",
        **TIMEOUTS,
    }
    values.update(overrides)
    return ProviderConfig(**values)


def message(
    *recipients: str,
    queue_id: str = "Q1",
    sender: str = "sender@example.test",
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
) -> OutboundMessage:
    return OutboundMessage(
        queue_id=queue_id,
        sender=sender,
        recipients=recipients or ("a@example.test",),
        body=body,
    )


# -- transports -------------------------------------------------------------------------------


@implementer(ITCPTransport)
class RecordingTransport(StringTransport):
    """A StringTransport that records TCP_NODELAY and every write() separately.

    Its peer is 127.0.0.1:25, the host provider_config() names (StringTransport's default is
    192.168.1.1, which the client would rightly refuse to send clear-text AUTH to).
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 25))
        self.writes: list[bytes] = []
        self.no_delay: bool | None = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return bool(self.no_delay)

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.disconnecting = True


class TCPLikeTransport(RecordingTransport):
    """abortConnection like twisted.internet.tcp: ``disconnecting`` stays False.

    StringTransport sets ``disconnecting`` on abort, which makes LineReceiver stop at once;
    a real TCP transport does not, so the rest of a received chunk is still parsed.
    """

    def abortConnection(self) -> None:
        self.disconnected = True


@implementer(ITLSTransport)
class TLSTransport(RecordingTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_started_with: list[Any] = []

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started_with.append(contextFactory)


@implementer(ITLSTransport)
class TCPLikeTLSTransport(TCPLikeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_started_with: list[Any] = []

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started_with.append(contextFactory)


class Upstream:
    """The server side of one connection: what the client wrote, and replies to it."""

    def __init__(self, protocol: IProtocol, transport: RecordingTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    @classmethod
    def connect(cls, protocol: IProtocol, transport: RecordingTransport | None = None) -> Upstream:
        transport = transport if transport is not None else RecordingTransport()
        protocol.makeConnection(transport)
        return cls(protocol, transport)

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        """Everything the client wrote since the last take()."""
        value = self.transport.value()
        self.transport.clear()
        self.transport.writes.clear()
        return value

    def lose(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or error.ConnectionDone()))

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


# -- providers --------------------------------------------------------------------------------

Answer = Callable[[OutboundMessage], list[RecipientResult]]


_DEFAULT_REPLY = {
    Kind.DELIVERED: "250 2.0.0 Ok",
    Kind.TEMPORARY: "451 4.3.0 try later",
    Kind.PERMANENT: "550 5.1.1 no such user",
}


def answer_all(kind: Kind, reply: str | None = None) -> Answer:
    return lambda m: all_results(m, kind, reply or _DEFAULT_REPLY[kind])


def answer_by_recipient(kinds: dict[str, Kind]) -> Answer:
    """Each recipient's kind from ``kinds`` (DELIVERED for any not named)."""

    def answer(m: OutboundMessage) -> list[RecipientResult]:
        results = []
        for r in m.recipients:
            kind = kinds.get(r, Kind.DELIVERED)
            results.append(RecipientResult(r, kind, _DEFAULT_REPLY[kind]))
        return results

    return answer


@implementer(IProvider)
class FakeProvider:
    """Answers each delivery with ``answer(message)``, at once or when the test says so."""

    def __init__(
        self,
        name: str,
        answer: Answer | None = None,
        hold: bool = False,
        on_temporary: str = "next",
        on_permanent: str = "fail",
    ) -> None:
        self.name = name
        self.on_temporary = on_temporary
        self.on_permanent = on_permanent
        self.answer = answer or answer_all(Kind.DELIVERED)
        self.hold = hold
        self.delivered: list[OutboundMessage] = []
        self.held: list[tuple[OutboundMessage, defer.Deferred[list[RecipientResult]]]] = []
        self.closed = False
        # What status() reports: set by a test (health, alerts, the status page).
        self.state = "closed"
        self.open_connections = 0
        self.next_probe_at: float | None = None
        self.last_setup_error: ProviderError | None = None

    def status(self) -> ProviderStatus:
        return ProviderStatus(
            self.state,  # type: ignore[arg-type]
            self.open_connections,
            self.next_probe_at,
            self.last_setup_error,
        )

    def deliver(
        self, message: OutboundMessage, progress: Progress | None = None
    ) -> defer.Deferred[list[RecipientResult]]:
        self.delivered.append(message)
        if self.hold:
            d: defer.Deferred[list[RecipientResult]] = defer.Deferred()
            self.held.append((message, d))
            return d
        return defer.succeed(self.answer(message))

    def release(self) -> None:
        """Answer every held delivery."""
        held, self.held = self.held, []
        for m, d in held:
            d.callback(self.answer(m))

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


# -- spool ------------------------------------------------------------------------------------


def make_spool(root: Path, now: Callable[[], float] = lambda: 1000.0) -> Spool:
    spool = Spool(root, InlineRunner(), now=now)
    spool.prepare()
    return spool


def envelope(
    queue_id: str = "0000000000000100000001",
    recipients: Sequence[str] = ("a@example.test",),
    received_at: float = 0.0,
) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        sender="sender@example.test",
        recipients=tuple(recipients),
        received_at=received_at,
        client="127.0.0.1",
        helo="client.test",
    )


def store(spool: Spool, env: Envelope, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    """Accept a message durably, as the inbound side does; returns the queue ID."""
    writer = spool.open_writer(env)
    writer.write(body)
    return result_of(writer.commit())


# -- logs -------------------------------------------------------------------------------------


class LogCapture:
    """Collects every twisted.logger event while installed (use as a context manager)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def texts(self) -> Iterator[str]:
        """Each event rendered, plus the repr of all its fields and any failure's traceback."""
        for event in self.events:
            yield formatEvent(event) or ""
            yield repr(event)
            failure = event.get("log_failure")
            if isinstance(failure, Failure):
                yield failure.getTraceback()
