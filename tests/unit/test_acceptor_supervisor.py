"""AcceptorSupervisor on a MemoryReactorClock with a fake spawn: what it starts (argv, the
inherited listening sockets), what it does with each frame, how it restarts an acceptor that
exits and how it stops them all."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import attrs
import pytest
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from mailrelay.acceptors.channel import LOG_EVENT, METRICS, frame, queued_frame
from mailrelay.acceptors.samples import MergedRegistry, RemoteSamples, snapshot
from mailrelay.acceptors.supervisor import (
    FIRST_RESTART_DELAY,
    MAX_RESTART_DELAY,
    RESCAN_RETRY,
    STABLE_AFTER,
    AcceptorSupervisor,
    acceptor_environment,
)
from mailrelay.acceptors.worker import AcceptorSettings, InheritedListener, _forwarded
from mailrelay.config import LimitsConfig, SMTPConfig, SpoolConfig
from mailrelay.inbound.listeners import Listening
from mailrelay.metrics import Metrics
from mailrelay.spool.format import Envelope
from tests.unit.fakes import LogCapture

RESTARTS = "mailrelay_acceptor_restarts_total"
ENVELOPE = Envelope(
    queue_id="0000000000000100000001",
    sender="app@example.test",
    recipients=("a@example.test",),
    received_at=1000.0,
    client="127.0.0.1",
    helo="client.test",
)


class FakeSocket:
    def __init__(self, family: socket.AddressFamily) -> None:
        self.family = family


class FakePort:
    """A listening port as far as the supervisor looks: its socket's family and its fd."""

    def __init__(self, fd: int, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.socket = FakeSocket(family)
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def listening_on(
    fd: int, family: socket.AddressFamily = socket.AF_INET, proxied: bool = False
) -> Listening:
    port: Any = FakePort(fd, family)
    return Listening(port, proxied)


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def signalProcess(self, signal: str) -> None:
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(signal)

    def closeStdin(self) -> None:
        self.stdin_closed = True


@attrs.define
class Spawned:
    protocol: Any
    executable: str
    args: list[str]
    env: dict[str, str]
    path: str
    child_fds: dict[int, int | str]
    transport: FakeProcessTransport
    at: float

    @property
    def settings(self) -> AcceptorSettings:
        return AcceptorSettings.from_json(self.args[-1])

    @property
    def index(self) -> int:
        return self.settings.index

    def send(self, data: bytes) -> None:
        self.protocol.childDataReceived(1, data)

    def end(self, reason: BaseException) -> None:
        self.transport.pid = None
        self.protocol.processEnded(Failure(reason))


class World:
    def __init__(
        self,
        processes: int = 3,
        listening: list[Listening] | None = None,
        ports: defer.Deferred[list[Listening]] | None = None,
        stop_timeout: float = 10.0,
        acceptance_directory_fsync: bool = True,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.smtp = SMTPConfig(processes=processes, hostname="relay.test", max_connections=90)
        self.limits = LimitsConfig(connections_per_peer=30)
        self.spool = SpoolConfig(path="relative-spool")
        self.listening = listening or [listening_on(17)]
        self.ports = ports if ports is not None else defer.succeed(self.listening)
        self.enqueued: list[Envelope] = []
        self.enqueued_ids: list[str] = []
        self.rescans = 0
        self.rescan_tags: list[int] = []
        self.rescan_result: defer.Deferred[int] | None = None
        self.failing_tags: set[int] = set()  # their rescans always fail
        self.metrics = Metrics()
        self.remote = RemoteSamples()
        self.spawned: list[Spawned] = []
        self._next_pid = 4000
        self.supervisor = AcceptorSupervisor(
            self.reactor,
            self.ports,
            self.smtp,
            self.limits,
            self.spool,
            self.enqueued.append,
            self.enqueued_ids.append,
            self.rescan,
            self.metrics,
            self.remote,
            stop_timeout=stop_timeout,
            spawn=self.spawn,
            acceptance_directory_fsync=acceptance_directory_fsync,
        )

    def spawn(
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str,
        childFDs: dict[int, int | str],
    ) -> FakeProcessTransport:
        self._next_pid += 1
        transport = FakeProcessTransport(self._next_pid)
        self.spawned.append(
            Spawned(
                protocol,
                executable,
                list(args),
                env,
                path,
                dict(childFDs),
                transport,
                self.reactor.seconds(),
            )
        )
        protocol.makeConnection(transport)
        return transport

    def rescan(self, tag: int) -> defer.Deferred[int]:
        self.rescans += 1
        self.rescan_tags.append(tag)
        if self.rescan_result is not None:
            return self.rescan_result
        if tag in self.failing_tags:
            return defer.fail(OSError("spool unreadable"))
        return defer.succeed(0)

    def start(self) -> None:
        self.supervisor.startService()

    def running(self) -> dict[int, Spawned]:
        """The latest child of each index that has not ended."""
        pids = self.supervisor.pids
        return {s.index: s for s in self.spawned if pids.get(s.index) == s.transport.pid}

    def restarts(self) -> float:
        return self.metrics.registry.get_sample_value(RESTARTS) or 0.0


def crashed() -> error.ProcessTerminated:
    return error.ProcessTerminated(exitCode=1)


# -- starting ---------------------------------------------------------------------------------


def test_start_spawns_processes_minus_one_acceptors_with_the_listening_sockets() -> None:
    w = World(processes=3)
    with LogCapture() as logs:
        w.start()
    assert [s.index for s in w.spawned] == [1, 2]
    for child in w.spawned:
        assert child.executable == sys.executable
        assert child.args[:3] == [sys.executable, "-m", "mailrelay.acceptors"]
        assert child.child_fds == {0: "w", 1: "r", 2: "r", 3: 17}
        assert child.path == os.getcwd()
        assert child.env == acceptor_environment(os.environ)
        settings = child.settings
        assert settings.listeners == (InheritedListener(3, "inet", False),)
        # The whole config, not the share: the acceptor takes its share itself.
        assert settings.smtp == w.smtp
        assert settings.limits == w.limits
        assert settings.spool.path == os.path.abspath("relative-spool")
    assert w.supervisor.pids == {1: 4001, 2: 4002}
    texts = [formatEvent(e) for e in logs.events]
    assert "acceptor 1 started (pid 4001)" in texts
    assert "acceptor 2 started (pid 4002)" in texts


@pytest.mark.parametrize("directory_fsync", [True, False])
def test_acceptors_are_told_how_the_relay_process_makes_acceptances_durable(
    directory_fsync: bool,
) -> None:
    """Decided once, from the spool's file system (mailrelay.spool.filesystems), not again."""
    w = World(processes=2, acceptance_directory_fsync=directory_fsync)
    w.start()
    [child] = w.spawned
    assert child.settings.acceptance_directory_fsync is directory_fsync


def test_every_tcp_listener_is_handed_on_in_order_from_fd_3_but_no_unix_one() -> None:
    """Twisted's UNIX port chmods the socket file when adopted and unlinks it when closed: a
    unix: listener stays the relay process's alone (review: mode 600 became 666)."""
    listening = [
        listening_on(21, socket.AF_INET, False),
        listening_on(23, socket.AF_UNIX, False),
        listening_on(22, socket.AF_INET6, True),
    ]
    w = World(processes=2, listening=listening)
    w.start()
    [child] = w.spawned
    assert child.child_fds == {0: "w", 1: "r", 2: "r", 3: 21, 4: 22}
    assert child.settings.listeners == (
        InheritedListener(3, "inet", False),
        InheritedListener(4, "inet6", True),
    )


def test_with_only_unix_listeners_no_acceptor_starts_and_the_log_says_why() -> None:
    w = World(processes=3, listening=[listening_on(23, socket.AF_UNIX, False)])
    with LogCapture() as logs:
        w.start()
    assert w.spawned == []
    assert any("no tcp: listener" in formatEvent(e) for e in logs.events)


def test_the_environment_of_an_acceptor_carries_no_secret() -> None:
    environ = {"PATH": "/usr/bin", "PYTHONPATH": "/src", "LANG": "C.UTF-8", "SES_PASSWORD": "x"}
    assert acceptor_environment(environ) == {
        "PATH": "/usr/bin",
        "PYTHONPATH": "/src",
        "LANG": "C.UTF-8",
    }


def test_acceptors_start_only_once_the_listeners_listen() -> None:
    ports: defer.Deferred[list[Listening]] = defer.Deferred()
    w = World(processes=2, ports=ports)
    w.start()
    assert w.spawned == []
    ports.callback(w.listening)
    assert [s.index for s in w.spawned] == [1]


def test_listeners_that_fail_start_no_acceptor_and_no_unhandled_error() -> None:
    ports: defer.Deferred[list[Listening]] = defer.Deferred()
    w = World(processes=2, ports=ports)
    w.start()
    ports.errback(Failure(OSError("address in use")))
    assert w.spawned == []
    assert w.supervisor.stopService().called


def test_stopped_before_the_listeners_listen_starts_nothing() -> None:
    ports: defer.Deferred[list[Listening]] = defer.Deferred()
    w = World(processes=2, ports=ports)
    w.start()
    assert w.supervisor.stopService().called
    ports.callback(w.listening)
    assert w.spawned == []


def test_one_process_starts_no_acceptor() -> None:
    w = World(processes=1)
    w.start()
    assert w.spawned == []


# -- frames -----------------------------------------------------------------------------------


def test_queued_frames_are_enqueued_in_order() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    other = attrs.evolve(ENVELOPE, queue_id="0000000000000100000002")
    child.send(queued_frame(ENVELOPE) + queued_frame(other))
    assert w.enqueued == [ENVELOPE, other]


def test_a_frame_split_across_reads_is_enqueued_once_whole() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    data = queued_frame(ENVELOPE)
    for i in range(len(data) - 1):
        child.send(data[i : i + 1])
    assert w.enqueued == []
    child.send(data[-1:])
    assert w.enqueued == [ENVELOPE]
    assert child.transport.signals == []


def test_metrics_frames_reach_the_remote_samples() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    acceptor = Metrics()
    acceptor.messages_received.inc(7)
    acceptor.smtp_open_connections.set(3)
    child.send(frame(METRICS, snapshot(acceptor.registry)))
    merged = MergedRegistry(w.metrics.registry, w.remote)
    values = {s.name: s.value for f in merged.collect() for s in f.samples if not s.labels}
    assert values["mailrelay_messages_received_total"] == 7
    assert values["mailrelay_smtp_open_connections"] == 3


def test_log_events_are_republished_with_the_acceptor_index() -> None:
    w = World(processes=3)
    w.start()
    second = w.spawned[1]
    event = {
        "log_format": "{queue_id} received from=<{sender}> {{literal braces}}",
        "log_level": LogLevel.info,
        "log_namespace": "mailrelay.inbound.delivery",
        "log_time": 1234.5,
        "queue_id": "0000000000000100000001",
        "sender": "app@example.test",
        "event": "received",
    }
    data = _forwarded(event)
    assert data is not None
    with LogCapture() as logs:
        second.send(frame(LOG_EVENT, data))
    [got] = [e for e in logs.events if e.get("acceptor") == 2]
    assert formatEvent(got) == (
        "0000000000000100000001 received from=<app@example.test> {literal braces}"
    )
    assert got["log_level"] is LogLevel.info
    assert got["log_namespace"] == "mailrelay.inbound.delivery"
    assert got["log_time"] == 1234.5
    assert got["event"] == "received"
    assert got["queue_id"] == "0000000000000100000001"
    assert second.transport.signals == []


def test_a_warning_keeps_its_level() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    data = _forwarded({"log_format": "disk low", "log_level": LogLevel.warn})
    assert data is not None
    with LogCapture() as logs:
        child.send(frame(LOG_EVENT, data))
    [got] = [e for e in logs.events if e.get("acceptor") == 1]
    assert got["log_level"] is LogLevel.warn and formatEvent(got) == "disk low"


@pytest.mark.parametrize(
    "data",
    [
        b"Xgarbage",  # an unknown kind
        frame(LOG_EVENT, b"not json"),
        frame(LOG_EVENT, b'{"no_text": 1}'),
        frame(LOG_EVENT, b'{"log_text": "x", "log_level": "loud"}'),
        frame(METRICS, b"not a snapshot"),
        frame(b"Q", b"{}"),
        frame(b"W", b"\x00\x00\xff\xff{}"),
    ],
)
def test_a_broken_stream_kills_the_acceptor(data: bytes) -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    with LogCapture() as logs:
        child.send(data)
    assert child.transport.signals == ["KILL"]
    assert w.enqueued == []
    assert any(
        "acceptor 1 sent a broken stream" in formatEvent(e) and e["log_level"] is LogLevel.error
        for e in logs.events
    )


@pytest.mark.parametrize("kind", [LOG_EVENT, METRICS])
def test_deeply_nested_json_is_a_broken_stream_too(kind: bytes) -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    child.send(frame(kind, b"[" * 100_000))
    assert child.transport.signals == ["KILL"]


def test_frames_before_a_broken_one_in_the_same_read_are_still_enqueued() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    child.send(queued_frame(ENVELOPE) + b"?\x00\x00\x00\x00")
    assert w.enqueued == [ENVELOPE]
    assert child.transport.signals == ["KILL"]


def test_stderr_lines_are_logged_as_warnings() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    with LogCapture() as logs:
        child.protocol.childDataReceived(2, b"Traceback (most recent call last):\n  File ")
        child.protocol.childDataReceived(2, b'"x.py"\n\nBoom: cut')
        texts = [formatEvent(e) for e in logs.events]
        assert texts == [
            "acceptor 1: Traceback (most recent call last):",
            'acceptor 1:   File "x.py"',
        ]
        assert all(e["log_level"] is LogLevel.warn for e in logs.events)
        child.end(crashed())  # the unfinished last line is logged at the end
        texts = [formatEvent(e) for e in logs.events]
    assert "acceptor 1: Boom: cut" in texts
    assert child.transport.signals == []  # stderr is no frame: nothing broken


def test_a_stderr_line_without_end_is_logged_in_bounded_pieces() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    with LogCapture() as logs:
        child.protocol.childDataReceived(2, b"x" * 10_000)
    texts = [formatEvent(e) for e in logs.events]
    assert texts and all(len(t) <= 4096 + len("acceptor 1: ") for t in texts)


# -- restarts ---------------------------------------------------------------------------------


def restart_call(w: World) -> Any:
    """The pending restart (besides it, a rescan may be pending too)."""
    [call] = [c for c in w.reactor.getDelayedCalls() if c.func == w.supervisor._start]
    return call


def test_an_acceptor_that_exits_is_restarted_after_a_delay_and_queue_is_rescanned() -> None:
    w = World(processes=3)
    w.start()
    first, second = w.spawned
    acceptor = Metrics()
    acceptor.messages_received.inc(4)
    acceptor.smtp_open_connections.set(2)
    first.send(frame(METRICS, snapshot(acceptor.registry)))
    w.reactor.advance(5)
    with LogCapture() as logs:
        first.end(crashed())
    assert w.restarts() == 1
    assert w.supervisor.pids == {2: second.transport.pid}
    # At once, for its own files: its pipe is drained, every report it sent is in.
    assert w.rescan_tags == [first.settings.tag]
    assert first.settings.tag != second.settings.tag
    assert any(
        "acceptor 1 exited" in formatEvent(e) and "restarting it in 1s" in formatEvent(e)
        for e in logs.events
    )
    # Its counters stay (a counter never goes backwards), its gauges leave with it.
    values, _ = w.remote.totals()
    assert values[("mailrelay_messages_received_total", ())] == 4
    assert ("mailrelay_smtp_open_connections", ()) not in values
    w.reactor.advance(FIRST_RESTART_DELAY - 0.01)
    assert len(w.spawned) == 2
    w.reactor.advance(0.01)
    assert len(w.spawned) == 3
    restarted = w.spawned[2]
    assert restarted.index == 1
    assert restarted.child_fds == first.child_fds
    assert w.supervisor.pids == {1: restarted.transport.pid, 2: second.transport.pid}
    assert second.transport.signals == []  # the others are left alone


def test_an_acceptor_that_keeps_dying_young_waits_longer_each_time() -> None:
    w = World(processes=2)
    w.start()
    delays = []
    for _ in range(9):
        child = w.spawned[-1]
        w.reactor.advance(0.5)  # dies young
        child.end(crashed())
        died_at = w.reactor.seconds()
        call = restart_call(w)
        delays.append(call.getTime() - died_at)
        w.reactor.advance(call.getTime() - died_at)
        assert w.spawned[-1].at == call.getTime()
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert delays[-1] == MAX_RESTART_DELAY
    assert w.restarts() == 9
    assert w.rescans == 9


def test_the_delay_is_short_again_after_an_acceptor_lived_long_enough() -> None:
    w = World(processes=2)
    w.start()
    for _ in range(3):  # dies young three times: next delay would be 8 s
        w.reactor.advance(0.5)
        w.spawned[-1].end(crashed())
        w.reactor.advance(restart_call(w).getTime() - w.reactor.seconds())
    assert len(w.spawned) == 4
    w.reactor.advance(STABLE_AFTER)
    w.spawned[-1].end(crashed())
    call = restart_call(w)
    assert call.getTime() - w.reactor.seconds() == FIRST_RESTART_DELAY
    # And it grows again from there if the next one dies young.
    w.reactor.advance(FIRST_RESTART_DELAY)
    w.reactor.advance(0.5)
    w.spawned[-1].end(crashed())
    call = restart_call(w)
    assert call.getTime() - w.reactor.seconds() == 2 * FIRST_RESTART_DELAY


def test_a_killed_broken_acceptor_is_restarted_too() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    child.send(b"?\x00\x00\x00\x00")
    assert child.transport.signals == ["KILL"]
    child.end(error.ProcessTerminated(signal=9))
    w.reactor.advance(FIRST_RESTART_DELAY)
    assert len(w.spawned) == 2 and w.spawned[1].index == 1


def test_a_failing_rescan_is_logged_not_raised() -> None:
    w = World(processes=2)
    w.start()
    w.rescan_result = defer.fail(OSError("spool unreadable"))
    with LogCapture() as logs:
        w.spawned[0].end(crashed())
    failures = [e for e in logs.events if isinstance(e.get("log_failure"), Failure)]
    assert failures and "rescan of queue/" in formatEvent(failures[0])
    failures[0]["log_failure"].trap(OSError)
    w.rescan_result = None
    w.reactor.advance(RESCAN_RETRY)
    assert w.rescans == 2  # tried again, for the same tag
    assert w.rescan_tags[0] == w.rescan_tags[1] == w.spawned[0].settings.tag
    assert len(w.spawned) == 2  # restarted all the same


def test_every_start_gets_a_tag_no_running_acceptor_has() -> None:
    w = World(processes=4)
    w.start()
    tags = [c.settings.tag for c in w.spawned]
    assert len(set(tags)) == 3 and 0 not in tags  # 0 is the relay process's
    for _ in range(300):  # restarts wrap around the 254 tags, never onto a running one
        child = w.spawned[-3]
        child.end(crashed())
        w.reactor.advance(restart_call(w).getTime() - w.reactor.seconds())
        running = [c.settings.tag for c in w.spawned[-3:]]
        assert len(set(running)) == 3 and all(1 <= t <= 254 for t in running)
    # 255 is the sendmail command's: never an acceptor's, so an acceptor's exit never clears
    # a message the pickup is moving in.
    assert {c.settings.tag for c in w.spawned} == set(range(1, 255))


# -- stopping ---------------------------------------------------------------------------------


def test_stop_closes_every_acceptors_stdin_and_fires_when_all_have_ended() -> None:
    w = World(processes=3)
    w.start()
    first, second = w.spawned
    d = w.supervisor.stopService()
    assert first.transport.stdin_closed and second.transport.stdin_closed
    assert first.transport.signals == [] and second.transport.signals == []
    assert not d.called
    first.end(error.ProcessDone(0))
    assert not d.called
    second.end(error.ProcessDone(0))
    assert d.called
    assert w.reactor.getDelayedCalls() == []  # the KILL timer was cancelled
    w.reactor.advance(1000)
    assert first.transport.signals == []
    assert len(w.spawned) == 2  # nothing restarted
    assert w.rescans == 0
    assert w.restarts() == 0


def test_stop_kills_what_is_still_running_after_stop_timeout() -> None:
    w = World(processes=3, stop_timeout=10.0)
    w.start()
    first, second = w.spawned
    d = w.supervisor.stopService()
    first.end(error.ProcessDone(0))
    w.reactor.advance(9.9)
    assert second.transport.signals == []
    with LogCapture() as logs:
        w.reactor.advance(0.1)
    assert second.transport.signals == ["KILL"]
    assert first.transport.signals == []
    assert any(
        "acceptor 2 still running 10.0s after it was told to stop" in formatEvent(e)
        for e in logs.events
    )
    assert not d.called
    second.end(error.ProcessTerminated(signal=9))
    assert d.called
    assert len(w.spawned) == 2


def test_stop_during_a_restart_delay_cancels_the_restart() -> None:
    w = World(processes=2)
    w.start()
    w.spawned[0].end(crashed())
    d = w.supervisor.stopService()
    assert d.called  # nothing running
    w.reactor.advance(MAX_RESTART_DELAY)
    assert len(w.spawned) == 1


def test_stop_with_no_acceptor_fires_at_once() -> None:
    w = World(processes=1)
    w.start()
    assert w.supervisor.stopService().called


def test_a_spawn_that_fails_does_not_hang_stop() -> None:
    w = World(processes=2)

    def failing_spawn(*args: Any, **kwargs: Any) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    w.supervisor._spawn = failing_spawn
    with LogCapture() as logs:
        w.start()
        assert any("cannot start acceptor 1" in formatEvent(e) for e in logs.events)
        assert w.supervisor.pids == {}
        d = w.supervisor.stopService()
    assert d.called  # nothing to wait for


def test_a_spawn_that_fails_is_tried_again_later() -> None:
    w = World(processes=2)
    real_spawn = w.supervisor._spawn
    attempts = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(11, "Resource temporarily unavailable")
        return real_spawn(*args, **kwargs)

    w.supervisor._spawn = failing_once
    with LogCapture():
        w.start()
        assert w.spawned == []
        w.reactor.advance(FIRST_RESTART_DELAY)
    assert len(w.spawned) == 1
    assert list(w.supervisor.pids) == [1]


def test_an_acceptor_exiting_once_shutdown_has_begun_is_not_restarted() -> None:
    """A signal to the whole process group stops acceptors during the relay's drain time,
    before the stop reaches the supervisor: not a crash (review)."""
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    [(trigger, args, kwargs)] = w.reactor.triggers["before"]["shutdown"]
    trigger(*args, **kwargs)  # what the reactor calls first at shutdown
    with LogCapture() as logs:
        child.end(error.ProcessTerminated(signal=15))
    w.reactor.advance(100)
    assert len(w.spawned) == 1
    assert w.restarts() == 0 and w.rescans == 0
    assert not any(e["log_level"] is LogLevel.error for e in logs.events)


def test_a_report_by_queue_id_reaches_enqueue_id() -> None:
    w = World(processes=2)
    w.start()
    [child] = w.spawned
    child.send(frame(b"I", b"0661425E4A11F2C3D4E5F6"))
    assert w.enqueued_ids == ["0661425E4A11F2C3D4E5F6"]
    child.send(frame(b"I", b"../etc/passwd"))
    assert child.transport.signals == ["KILL"]


def test_a_tag_whose_rescan_has_not_succeeded_is_not_given_again() -> None:
    w = World(processes=2)
    w.start()
    stuck = w.spawned[0].settings.tag
    w.failing_tags.add(stuck)
    with LogCapture() as logs:
        w.spawned[0].end(crashed())
        for _ in range(300):  # restarts wrap around the 254 tags
            w.reactor.advance(restart_call(w).getTime() - w.reactor.seconds())
            assert w.spawned[-1].settings.tag != stuck
            w.spawned[-1].end(crashed())
        w.failing_tags.clear()
        w.reactor.advance(RESCAN_RETRY)  # its rescan succeeds at last: the tag is free again
        assert stuck not in w.supervisor._rescan_pending
    for event in logs.events:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            failure.trap(OSError)
