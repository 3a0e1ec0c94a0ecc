"""Helpers for driving the inbound ESMTP protocol without sockets.

A ``Session`` is one connection: the real factory (loopback gate included), a ``StringTransport``
carrying the peer address, a ``task.Clock`` and a real ``Spool`` in a temporary directory.
``StatvfsStub`` stands in for ``os.statvfs`` behind a ``FreeSpace`` check.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailrelay.blocking import BlockingRunner, InlineRunner
from mailrelay.config import SMTPConfig
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.factory import RelaySMTPFactory
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.metrics import Metrics
from mailrelay.spool.format import Envelope, StoredMessage, decode_message
from mailrelay.spool.store import Spool

HOSTNAME = "relay.test"
LOCAL_V4 = IPv4Address("TCP", "127.0.0.1", 40000)


def smtp_config(**overrides: Any) -> SMTPConfig:
    """An SMTPConfig with a fixed host name, so banners and replies are predictable."""
    overrides.setdefault("hostname", HOSTNAME)
    return SMTPConfig(**overrides)


class ManualRunner:
    """A BlockingRunner whose calls wait until the test completes them, in order.

    Lets a test look at the protocol while an fsync is still pending.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[defer.Deferred[Any], Callable[[], Any]]] = []

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((d, lambda: f(*args, **kwargs)))
        return d

    def complete(self) -> None:
        """Run the oldest pending call for real and fire its Deferred with the outcome."""
        d, call = self.pending.pop(0)
        try:
            result = call()
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def fail(self, error: Exception) -> None:
        """Fire the oldest pending call's Deferred with ``error`` without running it."""
        d, _ = self.pending.pop(0)
        d.errback(error)


@attrs.define
class Session:
    factory: RecordingFactory
    proto: RelayESMTP
    transport: StringTransport
    spool: Spool
    clock: Clock
    metrics: Metrics
    accepted: list[Envelope]
    _seen: int = 0

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def replies(self) -> list[str]:
        """Reply lines written since the last call (CRLF removed)."""
        out = self.transport.value()
        new, self._seen = out[self._seen :], len(out)
        assert new == b"" or new.endswith(b"\r\n"), f"partial reply line: {new!r}"
        return [line.decode("ascii") for line in new.split(b"\r\n")[:-1]]

    def codes(self) -> list[str]:
        """The first two fields (code and enhanced status) of each new reply line."""
        return [" ".join(line.split(" ")[:2]) for line in self.replies()]

    def start_mail(self, recipients: int = 1) -> None:
        """EHLO, MAIL and RCPTs, all accepted; discards those replies."""
        self.send(b"EHLO client.test\r\nMAIL FROM:<sender@example.com>\r\n")
        for i in range(recipients):
            self.send(b"RCPT TO:<rcpt%d@example.org>\r\n" % i)
        replies = self.replies()
        assert replies[-1 - recipients].startswith("250 2.1.0"), replies
        assert all(r.startswith("250 2.1.5") for r in replies[-recipients:]), replies

    def start_data(self, recipients: int = 1) -> None:
        self.start_mail(recipients)
        self.send(b"DATA\r\n")
        assert self.replies() == ["354 End data with <CR><LF>.<CR><LF>"]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def queue_files(self) -> list[Path]:
        return sorted(self.spool.queue.iterdir())

    def tmp_files(self) -> list[Path]:
        return sorted(self.spool.tmp.iterdir())

    def stored(self) -> list[StoredMessage]:
        return [decode_message(p.read_bytes()) for p in self.queue_files()]

    def disconnect(self) -> None:
        """What the reactor does when the TCP connection goes away.

        ``FileDescriptor.connectionLost`` stops and drops the registered producer first.
        """
        self.transport.loseConnection()
        if self.transport.producer is not None:
            self.transport.producer.stopProducing()
            self.transport.producer = None
        self.proto.connectionLost(None)


class SmallBufferTransport(StringTransport):
    """A StringTransport whose send buffer fills up, as a TCP transport's does.

    Like ``FileDescriptor``: every write that leaves more than ``limit`` unsent bytes pauses the
    registered streaming producer; ``drain()`` (the client reading everything) resumes it.
    """

    def __init__(self, limit: int, peerAddress: IAddress | None = None) -> None:
        super().__init__(peerAddress=peerAddress)
        self.limit = limit
        self.unsent = 0
        self.most_unsent = 0
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        self.most_unsent = max(self.most_unsent, self.unsent)
        if self.producer is not None and self.streaming and self.unsent > self.limit:
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unsent = 0
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()


class StatvfsStub:
    """A stand-in for ``os.statvfs`` (monkeypatch it in): reports ``free`` bytes available to
    unprivileged users, or raises ``error``; records the path of every call.

    ``f_bsize`` and ``f_bfree`` are deliberately different from ``f_frsize`` and ``f_bavail``,
    so a check that multiplies the wrong fields gets the wrong answer.
    """

    def __init__(self, free: int, frsize: int = 4096) -> None:
        self.free = free
        self.frsize = frsize
        self.error: OSError | None = None
        self.calls: list[str] = []

    def __call__(self, path: str | os.PathLike[str]) -> os.statvfs_result:
        self.calls.append(os.fspath(path))
        if self.error is not None:
            raise self.error
        assert self.free % self.frsize == 0, "free must be whole fragments"
        bavail = self.free // self.frsize
        return os.statvfs_result(
            (self.frsize * 16, self.frsize, bavail * 4, bavail * 2, bavail, 1000, 900, 800, 0, 255)
        )


class RecordingFactory(RelaySMTPFactory):
    """The real factory, keeping what it was built with where tests can reach it."""

    def __init__(
        self,
        root: Path,
        config: SMTPConfig,
        runner: BlockingRunner,
        free_space: FreeSpace | None = None,
    ) -> None:
        self.spool = Spool(root / "spool", runner)
        self.spool.prepare()
        self.clock = Clock()
        self.metrics = Metrics()
        self.accepted: list[Envelope] = []
        self.bodies: list[bytes | None] = []  # what each accepted message's body was
        super().__init__(
            config,
            self.clock,
            self.spool,
            self._accept,
            self.metrics,
            free_space=free_space,
        )

    def _accept(self, envelope: Envelope, body: bytes | None) -> None:
        self.accepted.append(envelope)
        self.bodies.append(body)


def make_factory(
    root: Path,
    config: SMTPConfig | None = None,
    runner: BlockingRunner | None = None,
    free_space: FreeSpace | None = None,
) -> RecordingFactory:
    return RecordingFactory(
        root,
        config if config is not None else smtp_config(),
        runner if runner is not None else InlineRunner(),
        free_space,
    )


def open_session(
    root: Path,
    config: SMTPConfig | None = None,
    peer: IAddress = LOCAL_V4,
    runner: BlockingRunner | None = None,
    transport: StringTransport | None = None,
    free_space: FreeSpace | None = None,
) -> Session:
    """Build the protocol through the real factory and connect it to a StringTransport."""
    factory = make_factory(root, config, runner, free_space)
    proto = factory.buildProtocol(peer)
    assert isinstance(proto, RelayESMTP), f"factory refused {peer}"
    if transport is None:
        transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return Session(
        factory, proto, transport, factory.spool, factory.clock, factory.metrics, factory.accepted
    )
