"""An acceptor process: SMTP sessions on inherited listening sockets, mail into the spool.

Started by the relay process (supervisor.py), never by hand:

    python -m mailrelay.acceptors.worker SETTINGS

SETTINGS (JSON, see AcceptorSettings) carries the relay process's own smtp, limits and spool
configuration, so an acceptor works exactly as that process does even if the config file has
changed since, and the file descriptors of the listening sockets it inherits.

It runs the same inbound code as the relay process (RelaySMTPFactory, the durable spool write,
the reply ordering) with its share of the inbound limits, and writes frames (channel.py) on its
stdout: every message it made durable, its log events, its metrics. It stops on SIGTERM (stops
listening, lets commits in flight finish and be reported, flushes the pipe) and when its stdin
reaches end of file (the relay process is gone: an orphan must not accept mail no one
delivers).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, protocol, stdio, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger, formatEvent, globalLogBeginner
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.acceptors.channel import (
    LOG_EVENT,
    MAX_FRAME,
    MAX_LOG_EVENT,
    METRICS,
    frame,
    queued_frame,
)
from mailrelay.acceptors.samples import snapshot
from mailrelay.blocking import IO_THREADS, IOThreads
from mailrelay.config import LimitsConfig, SMTPConfig, SpoolConfig, per_process_share
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.factory import ProxyHeaderFactory, RelaySMTPFactory
from mailrelay.logformat import is_plain
from mailrelay.metrics import Metrics
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool

log = Logger(namespace="mailrelay.acceptor")

SNAPSHOT_INTERVAL = 1.0
_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


@attrs.frozen
class InheritedListener:
    fd: int
    family: str  # a key of _FAMILIES
    proxied: bool = False


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


@attrs.frozen
class AcceptorSettings:
    index: int
    smtp: SMTPConfig  # smtp.processes included: the share of the limits is taken here
    limits: LimitsConfig
    spool: SpoolConfig  # its path absolute
    listeners: tuple[InheritedListener, ...]

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self, recurse=True), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AcceptorSettings:
        raw = json.loads(text)
        return cls(
            index=int(raw["index"]),
            smtp=SMTPConfig(**_tuples(raw["smtp"])),
            limits=LimitsConfig(**raw["limits"]),
            spool=SpoolConfig(**raw["spool"]),
            listeners=tuple(InheritedListener(**x) for x in raw["listeners"]),
        )

    def command_line(self) -> list[str]:
        """argv of the acceptor: this interpreter, so the same installation."""
        return [sys.executable, "-m", "mailrelay.acceptors.worker", self.to_json()]


def _forwarded(event: dict[str, Any]) -> bytes | None:
    """A log event as the relay process re-emits it: its text, formatted here (fields that are
    not plain values do not cross), and its plain fields for JSON logs."""
    level = event.get("log_level")
    text = formatEvent(event)
    failure = event.get("log_failure")
    record: dict[str, Any] = {}
    if isinstance(failure, Failure):
        record["error"] = failure.getErrorMessage()
        text += "\n" + failure.getTraceback()
    if not text:
        return None
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and is_plain(value):
            record[key] = value
    record["log_text"] = text[:MAX_LOG_EVENT]
    record["log_level"] = getattr(level, "name", "info")
    record["log_namespace"] = str(event.get("log_namespace") or "-")
    record["log_time"] = event.get("log_time") or time.time()
    try:
        data = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "replace")
    except ValueError:  # a circular list, say
        data = b""
    if not data or len(data) > MAX_FRAME // 2:  # (huge fields are never ours) the text alone
        essentials = {k: record[k] for k in ("log_text", "log_level", "log_namespace", "log_time")}
        data = json.dumps(essentials).encode()
    return data


class _Channel(protocol.Protocol):
    """Our end of the pipes: frames out on stdout, end of file on stdin means stop."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._open = True

    def send(self, data: bytes) -> None:
        if self._open and self.transport is not None:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        pass  # the relay process sends nothing; it closes stdin to stop us

    def readConnectionLost(self) -> None:
        log.info("the relay process closed our pipe: stopping")
        if self._reactor.running:
            self._reactor.stop()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._open = False
        if not self.lost.called:
            self.lost.callback(None)
        if self._reactor.running:
            self._reactor.stop()

    def close(self) -> defer.Deferred[None]:
        """Flush what is written, then close; fires when done."""
        if self._open and self.transport is not None:
            self.transport.loseConnection()
        return self.lost


class Acceptor:
    def __init__(self, reactor: Any, settings: AcceptorSettings, channel: _Channel) -> None:
        self._reactor = reactor
        self._index = index = settings.index
        self._channel = channel
        smtp, limits = per_process_share(settings.smtp, settings.limits)
        spool_config = settings.spool
        self.pool = IOThreads(reactor, IO_THREADS, name=f"mailrelay-acceptor{index}-io")
        self.metrics = Metrics()
        spool = Spool(Path(spool_config.path), self.pool, reactor.seconds)
        disk = FreeSpace(spool_config.path, spool_config.min_free_space, reactor)
        self.factory = RelaySMTPFactory(
            smtp,
            reactor,
            spool,
            self._queued,
            self.metrics,
            free_space=disk if spool_config.min_free_space > 0 else None,
            limits=limits,
        )
        self._ports: list[IListeningPort] = []
        self._snapshots = task.LoopingCall(self._send_snapshot)
        self._snapshots.clock = reactor
        self._last_snapshot = b""

    def _queued(self, envelope: Envelope, body: bytes | None) -> None:
        # Written before the client's 250 (our caller writes it when we return): the relay
        # process learns of the message no later than the client does.
        self._channel.send(queued_frame(envelope, body))

    def _send_snapshot(self) -> None:
        data = snapshot(self.metrics.registry)
        if data != self._last_snapshot:
            self._last_snapshot = data
            self._channel.send(frame(METRICS, data))

    def listen(self, listeners: Sequence[InheritedListener]) -> None:
        for listener in listeners:
            factory: protocol.ServerFactory = self.factory
            if listener.proxied:
                factory = ProxyHeaderFactory(self.factory)
            port = self._reactor.adoptStreamPort(listener.fd, _FAMILIES[listener.family], factory)
            os.close(listener.fd)  # adoptStreamPort took a copy
            self._ports.append(port)
        self.pool.start()
        self._snapshots.start(SNAPSHOT_INTERVAL, now=False)
        log.info(
            "acceptor {index} accepting on {count} listener(s)",
            index=self._index,
            count=len(self._ports),
        )

    async def stop(self) -> None:
        """No new connections; commits in flight finish and are reported; the pipe is flushed."""
        await defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self._ports])
        self._ports = []
        # Joins the I/O threads: a commit running now completes, and its result is waiting
        # in the reactor's queue; one more turn reports it (and writes the client's 250).
        self.pool.stop()
        await task.deferLater(self._reactor, 0, lambda: None)
        if self._snapshots.running:
            self._snapshots.stop()
        self._send_snapshot()
        await self._channel.close()


def _install_log_forwarding(channel: _Channel, reactor: Any) -> None:
    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        data = _forwarded(event)
        if data is None:
            return
        if threadable.isInIOThread():
            channel.send(frame(LOG_EVENT, data))
        else:
            reactor.callFromThread(channel.send, frame(LOG_EVENT, data))

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        (text,) = args
        settings = AcceptorSettings.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        print(f"mailrelay acceptor: bad settings ({e}); started by the relay only", file=sys.stderr)
        return 2

    from twisted.internet import reactor

    # Our frames own file descriptor 1: a stray print() must not land in the middle of one.
    channel_fd = os.dup(1)
    os.dup2(2, 1)
    channel = _Channel(reactor)
    stdio.StandardIO(channel, stdin=0, stdout=channel_fd, reactor=reactor)  # type: ignore[call-arg]  # the POSIX one
    _install_log_forwarding(channel, reactor)

    acceptor = Acceptor(reactor, settings, channel)
    reactor.callWhenRunning(acceptor.listen, settings.listeners)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromCoroutine(acceptor.stop())
    )
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
