"""The relay process's side of its acceptor processes (see the package docstring).

Starts ``smtp.processes - 1`` acceptors once the SMTP listeners listen, handing each the
listening sockets; enqueues what they report, re-emits their log events, keeps their metrics;
restarts one that exits (after a pause that grows while it keeps dying young) and then rescans
queue/ for a message it made durable but could not report; stops them all (end of file on
their stdin, SIGKILL after ``stop_timeout``) before the queue stops, so every report is in.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import InvalidLogLevelError, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailrelay.acceptors.channel import (
    LOG_EVENT,
    METRICS,
    QUEUED,
    QUEUED_ID,
    FrameError,
    FrameReader,
    decode_queued,
    decode_queued_id,
)
from mailrelay.acceptors.samples import RemoteSamples
from mailrelay.acceptors.worker import AcceptorSettings, InheritedListener
from mailrelay.config import LimitsConfig, SMTPConfig, SpoolConfig
from mailrelay.inbound.listeners import Listening
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import ACCEPTOR_TAGS

log = Logger(namespace="mailrelay.acceptors")

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
# An acceptor that lived this long is not crash-looping: its next restart is quick again.
STABLE_AFTER = 30.0
STOP_TIMEOUT = 30.0
# Seconds before a rescan of queue/ that failed is tried again.
RESCAN_RETRY = 10.0
_STDERR_LINE_MAX = 4096
_FIRST_FD = 3  # the acceptor's listening sockets: 3, 4, ...


def _tcp_family(listening: Listening) -> str | None:
    """ "inet" or "inet6" for a TCP listener; None for a UNIX one (not shared: worker.py)."""
    family = listening.port.socket.family  # type: ignore[attr-defined]  # tcp/unix Port
    return {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}.get(family)


# What an acceptor gets of our environment: what it takes to run this Python the same way
# (the interpreter's own variables, its library path, locale, time zone), nothing else: a
# provider's password_env secret stays in this process.
_ENVIRONMENT = ("PATH", "HOME", "LD_LIBRARY_PATH", "LANG", "TZ", "TMPDIR")
_ENVIRONMENT_PREFIXES = ("PYTHON", "LC_")


def acceptor_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        k: v for k, v in environ.items() if k in _ENVIRONMENT or k.startswith(_ENVIRONMENT_PREFIXES)
    }


class _AcceptorProcess(protocol.ProcessProtocol):
    def __init__(
        self, supervisor: AcceptorSupervisor, index: int, tag: int, started_at: float
    ) -> None:
        self._supervisor = supervisor
        self.index = index
        self.tag = tag  # in every queue ID it makes
        self.started_at = started_at
        self._frames = FrameReader()
        self._stderr = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        # stdin stays open and unused: its end of file (this process gone) stops the acceptor.
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._stderr_received(data)
            return
        try:
            for kind, payload in self._frames.feed(data):
                self._supervisor.frame_received(self.index, kind, payload)
        except FrameError as e:
            log.error(
                "acceptor {index} sent a broken stream ({why}): stopping it",
                index=self.index,
                why=str(e),
            )
            self.kill()

    def _stderr_received(self, data: bytes) -> None:
        # A traceback or a message from the interpreter itself (ours go through frames).
        self._stderr += data
        *lines, self._stderr = self._stderr.split(b"\n")
        if len(self._stderr) > _STDERR_LINE_MAX:
            lines.append(self._stderr)
            self._stderr = b""
        for line in lines:
            if line.strip():
                log.warn(
                    "acceptor {index}: {line}",
                    index=self.index,
                    line=line[:_STDERR_LINE_MAX].decode("utf-8", "replace"),
                )

    def kill(self) -> None:
        with contextlib.suppress(error.ProcessExitedAlready, AttributeError):
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def stop(self) -> None:
        """End of file on its stdin: it stops listening, reports what is in flight, exits."""
        with contextlib.suppress(AttributeError):
            self.transport.closeStdin()  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        if self._stderr.strip():
            self._stderr_received(b"\n")
        self._supervisor.acceptor_ended(self, reason)
        self.ended.callback(None)


class AcceptorSupervisor(service.Service):
    def __init__(
        self,
        reactor: Any,
        ports: defer.Deferred[list[Listening]],
        smtp: SMTPConfig,
        limits: LimitsConfig,
        spool: SpoolConfig,
        enqueue: Callable[[Envelope], None],
        enqueue_id: Callable[[str], None],
        rescan: Callable[[int], defer.Deferred[int]],
        metrics: Metrics,
        remote: RemoteSamples,
        stop_timeout: float = STOP_TIMEOUT,
        spawn: Callable[..., Any] | None = None,
        acceptance_directory_fsync: bool = True,
    ) -> None:
        """``acceptance_directory_fsync``: what this process decided for its spool (see
        mailrelay.spool.filesystems); its acceptors make their acceptances the same way."""
        self._reactor = reactor
        self._count = smtp.processes
        self._ports = ports
        self._smtp = smtp
        self._limits = limits
        self._spool = attrs.evolve(spool, path=os.path.abspath(spool.path))
        self._acceptance_directory_fsync = acceptance_directory_fsync
        self._enqueue = enqueue
        self._enqueue_id = enqueue_id
        self._rescan = rescan
        self._metrics = metrics
        self._remote = remote
        self._stop_timeout = stop_timeout
        self._spawn = spawn if spawn is not None else reactor.spawnProcess
        self._listening: list[Listening] = []
        self._running: dict[int, _AcceptorProcess] = {}
        self._rescan_pending: set[int] = set()  # tags of exited acceptors not yet rescanned
        self._restart_delay: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping = False
        self._shutdown_trigger: Any = None
        self._last_tag = 0

    # -- lifecycle --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        # At the very start of shutdown, not when the stop reaches this service (after the
        # drain time): an acceptor exiting meanwhile is not to be restarted.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self._shutting_down
        )
        self._ports.addCallback(self._start_all)
        self._ports.addErrback(lambda f: log.failure("starting the acceptor processes", f))

    def _shutting_down(self) -> None:
        self._stopping = True

    def _start_all(self, listening: list[Listening]) -> list[Listening]:
        self._listening = [x for x in listening if _tcp_family(x) is not None]
        if not self._listening:
            log.warn(
                "smtp.processes = {processes} but no tcp: listener: acceptor processes share"
                " TCP listeners only, so this process accepts all mail alone",
                processes=self._count,
            )
            return listening
        if not self._stopping:
            for index in range(1, self._count):
                self._start(index)
        return listening

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        listeners = [
            InheritedListener(_FIRST_FD + i, _tcp_family(x) or "", x.proxied)
            for i, x in enumerate(self._listening)
        ]
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for listener, listening in zip(listeners, self._listening, strict=True):
            child_fds[listener.fd] = listening.port.fileno()  # type: ignore[attr-defined]
        tag = self._new_tag()
        argv = AcceptorSettings(
            index,
            tag,
            self._smtp,
            self._limits,
            self._spool,
            tuple(listeners),
            self._acceptance_directory_fsync,
        ).command_line()
        process = _AcceptorProcess(self, index, tag, self._reactor.seconds())
        try:
            self._spawn(
                process,
                argv[0],
                argv,
                env=acceptor_environment(os.environ),
                path=os.getcwd(),
                childFDs=child_fds,
            )
        except Exception as e:  # fork or exec refused (EAGAIN, ENOMEM): try again later
            self._metrics.acceptor_restarts.inc()
            delay = self._next_delay(index, lived=0.0)
            log.error(
                "cannot start acceptor {index} ({why}): trying again in {delay:.0f}s",
                index=index,
                why=str(e) or type(e).__name__,
                delay=delay,
            )
            self._restarts[index] = self._reactor.callLater(delay, self._start, index)
            return
        self._running[index] = process
        log.info("acceptor {index} started (pid {pid})", index=index, pid=process.pid)

    def _new_tag(self) -> int:
        """A queue ID tag no running acceptor has, nor, while another is free, an exited one
        whose rescan is still to succeed: each start gets its own, so the rescan after an exit
        (adopt_unindexed, and the clean-up of tmp/) can tell that process's files from any
        other's."""
        running = {p.tag for p in self._running.values()}  # at most 64 of the 254
        for taken in (running | self._rescan_pending, running):
            for _ in range(ACCEPTOR_TAGS):
                self._last_tag = self._last_tag % ACCEPTOR_TAGS + 1
                if self._last_tag not in taken:
                    return self._last_tag
        raise AssertionError("more running acceptors than tags")

    def _next_delay(self, index: int, lived: float) -> float:
        """The pause before restarting acceptor ``index``: doubling while it dies young."""
        delay = self._restart_delay.get(index, FIRST_RESTART_DELAY)
        if lived >= STABLE_AFTER:
            delay = FIRST_RESTART_DELAY
        self._restart_delay[index] = min(delay * 2, MAX_RESTART_DELAY)
        return delay

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        return defer.Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        if self._shutdown_trigger is not None:
            with contextlib.suppress(ValueError):  # (fired already)
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        processes = list(self._running.values())
        for process in processes:
            process.stop()
        if not processes:
            return
        ended = defer.DeferredList([p.ended for p in processes])
        timer = self._reactor.callLater(self._stop_timeout, self._kill_left)
        await ended
        if timer.active():
            timer.cancel()

    def _kill_left(self) -> None:
        for process in list(self._running.values()):
            log.warn(
                "acceptor {index} still running {timeout}s after it was told to stop: killing it",
                index=process.index,
                timeout=self._stop_timeout,
            )
            process.kill()

    # -- from the acceptors -----------------------------------------------------------------

    def frame_received(self, index: int, kind: bytes, payload: bytes) -> None:
        if kind == QUEUED:
            self._enqueue(decode_queued(payload))
        elif kind == QUEUED_ID:
            self._enqueue_id(decode_queued_id(payload))
        elif kind == LOG_EVENT:
            self._republish(index, payload)
        elif kind == METRICS:
            try:
                self._remote.update(index, payload)
            except (ValueError, RecursionError) as e:
                raise FrameError(str(e)) from None

    def _republish(self, index: int, payload: bytes) -> None:
        try:
            event = json.loads(payload)
            if not isinstance(event, dict) or not isinstance(event.get("log_text"), str):
                raise ValueError("not an event")
            level = LogLevel.levelWithName(str(event.get("log_level", "info")))
            when = float(event.get("log_time", self._reactor.seconds()))
        except (ValueError, TypeError, RecursionError, InvalidLogLevelError) as e:
            raise FrameError(f"bad log event: {e}") from None
        event.update(
            log_format="{log_text}",
            log_level=level,
            log_time=when,
            log_namespace=str(event.get("log_namespace") or "mailrelay.acceptor"),
            acceptor=index,
        )
        globalLogPublisher(event)

    def acceptor_ended(self, process: _AcceptorProcess, reason: Failure) -> None:
        index = process.index
        if self._running.get(index) is process:
            del self._running[index]
        self._remote.retire(index)
        if self._stopping:
            if not reason.check(error.ProcessDone):
                log.warn(
                    "acceptor {index} stopped: {why}", index=index, why=reason.getErrorMessage()
                )
            return
        lived = self._reactor.seconds() - process.started_at
        delay = self._next_delay(index, lived)
        self._metrics.acceptor_restarts.inc()
        log.error(
            "acceptor {index} exited ({why}) after {lived:.1f}s: restarting it in {delay:.0f}s",
            index=index,
            why=reason.getErrorMessage(),
            lived=lived,
            delay=delay,
        )
        # It may have made a message durable and died before reporting it. processEnded comes
        # after its pipes are drained, so every report it sent is in: what is left under its
        # tag in queue/ is exactly what it did not report.
        self._rescan_after_exit(index, process.tag)
        self._restarts[index] = self._reactor.callLater(delay, self._start, index)

    def _rescan_after_exit(self, index: int, tag: int) -> None:
        if self._stopping:
            return  # the next start indexes the whole spool anyway
        self._rescan_pending.add(tag)

        def done(_: object) -> None:
            self._rescan_pending.discard(tag)

        def failed(f: Failure) -> None:
            log.failure(
                "rescan of queue/ after acceptor {index} exited; again in {retry:.0f}s",
                f,
                index=index,
                retry=RESCAN_RETRY,
            )
            self._reactor.callLater(RESCAN_RETRY, self._rescan_after_exit, index, tag)

        self._rescan(tag).addCallbacks(done, failed)

    @property
    def pids(self) -> dict[int, int | None]:
        """Acceptor index -> pid of the running ones (for tests and the log)."""
        return {index: p.pid for index, p in self._running.items()}
