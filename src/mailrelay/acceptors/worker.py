"""An acceptor process: SMTP sessions on inherited listening sockets, mail into the spool.

Started by the relay process (supervisor.py), never by hand:

    python -m mailrelay.acceptors SETTINGS      (__main__.py: signals first, then main())

SETTINGS (JSON, see AcceptorSettings) carries the relay process's own smtp, limits and spool
configuration, so an acceptor works exactly as that process does even if the config file has
changed since, and the file descriptors of the listening sockets it inherits.

It runs the same inbound code as the relay process (RelaySMTPFactory, the durable spool write,
the reply ordering) with its share of the inbound limits, and writes frames (channel.py) on its
stdout: every message it made durable, its log events, its metrics. It stops when its stdin
reaches end of file: the relay process closes it to stop it, and the kernel closes it when the
relay process is gone (an orphan must not accept mail no one delivers). Stopping: no more
connections, commits in flight finish and are reported, the pipe is flushed. It ignores
SIGTERM, SIGINT, SIGHUP and SIGUSR1: a signal sent to the whole process group (systemd's stop,
Ctrl-C, a log-rotation pkill) is the relay process's to act on, and the relay keeps accepting
through its drain time.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet import defer, protocol, stdio, task
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
)
from twisted.logger import ILogObserver, globalLogBeginner
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
from mailrelay.logformat import event_text, is_plain
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.netwrite import write_now
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool

log = Logger(namespace="mailrelay.acceptor")

SNAPSHOT_INTERVAL = 1.0
# TCP only: Twisted's UNIX port would chmod the relay's socket file to its default mode when
# adopted, and unlink it when closed; a unix: listener is served by the relay process alone.
_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


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
    tag: int  # in every queue ID it makes (spool.store.new_queue_id)
    smtp: SMTPConfig  # smtp.processes included: the share of the limits is taken here
    limits: LimitsConfig
    spool: SpoolConfig  # its path absolute
    listeners: tuple[InheritedListener, ...]
    # The relay process's decision for the spool (mailrelay.spool.filesystems), not made again.
    acceptance_directory_fsync: bool = True

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self, recurse=True), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AcceptorSettings:
        raw = json.loads(text)
        return cls(
            index=int(raw["index"]),
            tag=int(raw["tag"]),
            smtp=SMTPConfig(**_tuples(raw["smtp"])),
            limits=LimitsConfig(**raw["limits"]),
            spool=SpoolConfig(**raw["spool"]),
            listeners=tuple(InheritedListener(**x) for x in raw["listeners"]),
            acceptance_directory_fsync=bool(raw.get("acceptance_directory_fsync", True)),
        )

    def command_line(self) -> list[str]:
        """argv of the acceptor: this interpreter, so the same installation."""
        return [sys.executable, "-m", "mailrelay.acceptors", self.to_json()]


def _forwarded(event: dict[str, Any]) -> bytes | None:
    """A log event as the relay process re-emits it: its text, formatted here (fields that are
    not plain values do not cross), and its plain fields for JSON logs."""
    level = event.get("log_level")
    text = event_text(event)
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


@implementer(IHalfCloseableProtocol)
class _Channel(protocol.Protocol):
    """Our end of the pipes: frames out on stdout, end of file on stdin means stop (half
    closed: stdout stays open for the reports of the commits still in flight)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._open = True

    def send(self, data: bytes) -> None:
        if self._open and self.transport is not None:
            write_now(self.transport, data)

    def dataReceived(self, data: bytes) -> None:
        pass  # the relay process sends nothing; it closes stdin to stop us

    def readConnectionLost(self) -> None:
        _stop_reactor(self._reactor)

    def writeConnectionLost(self) -> None:
        self._lost()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost()

    def _lost(self) -> None:
        # Nobody reads our reports any more: stop at once (an orphan).
        self._open = False
        if not self.lost.called:
            self.lost.callback(None)
        _stop_reactor(self._reactor)

    def close(self) -> defer.Deferred[None]:
        """Flush what is written, then close; fires when done."""
        if self._open and self.transport is not None:
            # A paused producer would be resumed by the last write instead of the pipe being
            # closed (Twisted's FileDescriptor.doWrite): it goes first.
            cast(IConsumer, self.transport).unregisterProducer()
            self.transport.loseConnection()
        return self.lost


class _ListeningPort(TypingProtocol):
    def stopReading(self) -> None: ...
    def startReading(self) -> None: ...


@implementer(IPushProducer)
class ReportBackpressure:
    """Registered with the report pipe as its producer: when the relay process does not read
    our reports (stopped, stuck) and Twisted's buffer for the pipe passes its limit (64 KiB,
    behind the kernel's own 64 KiB), no new connection is taken until the pipe drains.
    Otherwise the reports of what we accept meanwhile would pile up in memory without bound;
    the connections wait in the listening socket's backlog, or go to the relay process.
    Sessions already open carry on."""

    def __init__(self, ports: Callable[[], Sequence[_ListeningPort]]) -> None:
        self._ports = ports
        self.paused = False

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        log.warn("the relay process is not reading this acceptor's reports: not accepting")
        for port in self._ports():
            port.stopReading()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        log.info("the relay process reads this acceptor's reports again: accepting")
        for port in self._ports():
            port.startReading()

    def stopProducing(self) -> None:
        pass


_stop_requested: list[bool] = []


def _stop_reactor(reactor: Any) -> None:
    """reactor.stop(), once: a second call while it stops raises ReactorNotRunning."""
    if not _stop_requested and reactor.running:
        _stop_requested.append(True)
        reactor.stop()


class Acceptor:
    def __init__(self, reactor: Any, settings: AcceptorSettings, channel: _Channel) -> None:
        self._reactor = reactor
        self._index = index = settings.index
        self._channel = channel
        smtp, limits = per_process_share(settings.smtp, settings.limits)
        spool_config = settings.spool
        self.pool = IOThreads(reactor, IO_THREADS, name=f"mailrelay-acceptor{index}-io")
        self.metrics = Metrics()
        spool = Spool(
            Path(spool_config.path),
            self.pool,
            reactor.seconds,
            id_tag=settings.tag,
            acceptance_directory_fsync=settings.acceptance_directory_fsync,
        )
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
        self._stopping = False
        # Reports that cannot leave pause accepting (see ReportBackpressure).
        self.backpressure = ReportBackpressure(
            lambda: [] if self._stopping else cast(list[_ListeningPort], self._ports)
        )
        self._snapshots = task.LoopingCall(self._send_snapshot_unless_paused)
        self._snapshots.clock = reactor
        self._last_snapshot = b""
        self.exit_code = 0

    def _queued(self, envelope: Envelope, body: bytes | None) -> None:
        # Buffered for the pipe as the client's 250 goes out; if we die before the pipe takes
        # it, the relay process finds the file when it rescans queue/ after our exit. The body
        # stays here: the relay process reads it from the spool (channel.py says why).
        self._channel.send(queued_frame(envelope))

    def _send_snapshot_unless_paused(self) -> None:
        # While the relay process reads nothing, a snapshot a second would pile up behind the
        # reports; each replaces the one before, so the first after the pause is enough.
        if not self.backpressure.paused:
            self._send_snapshot()

    def _send_snapshot(self) -> None:
        data = snapshot(self.metrics.registry)
        if data != self._last_snapshot:
            self._last_snapshot = data
            self._channel.send(frame(METRICS, data))

    def listen(self, listeners: Sequence[InheritedListener]) -> None:
        try:
            self._listen(listeners)
        except Exception:
            # Half started is worse than not started: exit, and the relay restarts us.
            log.failure("acceptor {index} cannot listen", index=self._index)
            self.exit_code = 1
            _stop_reactor(self._reactor)

    def _listen(self, listeners: Sequence[InheritedListener]) -> None:
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
        """No new connections; the sessions end (a message being received is finished and
        answered first); commits in flight finish and are reported; the pipe is flushed."""
        self._stopping = True
        await defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self._ports])
        self._ports = []
        await self.factory.close_sessions()
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
    channel_transport = stdio.StandardIO(channel, stdin=0, stdout=channel_fd, reactor=reactor)  # type: ignore[call-arg]  # the POSIX one
    _install_log_forwarding(channel, reactor)

    acceptor = Acceptor(reactor, settings, channel)
    channel_transport.registerProducer(acceptor.backpressure, True)
    reactor.callWhenRunning(acceptor.listen, settings.listeners)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromCoroutine(acceptor.stop())
    )
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]  # ReactorBase.run
    return acceptor.exit_code


if __name__ == "__main__":
    sys.exit(main())
