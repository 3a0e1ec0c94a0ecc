"""The SMTP sessions when the relay stops (RelaySMTPFactory.close_sessions,
RelayESMTP.shut_down): RFC 5321 3.8's 421, and no message left unanswered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from mailrelay.inbound.factory import SHUTDOWN_GRACE
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.spool.store import SpoolWriteError

from .helpers_inbound import HOSTNAME, LOCAL_V4, ManualRunner, Session, open_session

SHUTTING_DOWN = f"421 4.3.2 {HOSTNAME} Service shutting down, closing connection"


def _open(tmp_path: Path, runner: Any = None) -> Session:
    s = open_session(tmp_path, runner=runner)
    assert s.replies() == [f"220 {HOSTNAME} ESMTP mailrelay"]
    return s


def _fired(d: defer.Deferred[None]) -> bool:
    fired: list[object] = []
    d.addBoth(fired.append)
    return bool(fired)


def _shutdown_closes(s: Session) -> float:
    return s.metrics.sessions_closed.labels("shutdown")._value.get()  # type: ignore[attr-defined, no-any-return]


def test_an_idle_session_gets_421_at_once_and_the_stop_waits_for_its_close(
    tmp_path: Path,
) -> None:
    s = _open(tmp_path)
    s.send(b"EHLO client.test\r\n")
    s.replies()
    stopped = s.factory.close_sessions()
    assert s.replies() == [SHUTTING_DOWN]
    assert s.closed
    assert not _fired(stopped)  # the TCP connection is not gone yet
    s.disconnect()
    s.clock.advance(0)  # the stop goes on in the next turn, not inside connectionLost
    assert _fired(stopped)
    assert _shutdown_closes(s) == 1


def test_a_transaction_before_data_is_dropped_with_421_and_nothing_is_queued(
    tmp_path: Path,
) -> None:
    s = _open(tmp_path)
    s.start_mail()
    s.factory.close_sessions()
    assert s.replies() == [SHUTTING_DOWN]
    s.send(b"DATA\r\n")  # too late: nothing more is read
    assert s.replies() == []
    assert s.queue_files() == [] and s.accepted == []


def test_a_message_being_received_is_finished_answered_and_then_closed(
    tmp_path: Path,
) -> None:
    s = _open(tmp_path)
    s.start_data()
    s.send(b"Subject: half\r\n")
    stopped = s.factory.close_sessions()
    assert s.replies() == [] and not s.closed
    s.send(b"\r\nthe rest\r\n.\r\nQUIT\r\n")
    replies = s.replies()
    assert replies[0].startswith("250 2.0.0 Ok: queued as "), replies
    assert replies[1:] == [SHUTTING_DOWN]  # the pipelined QUIT is not run: 421, not 221
    assert s.closed
    assert len(s.queue_files()) == 1 and len(s.accepted) == 1
    s.disconnect()
    s.clock.advance(0)  # the stop goes on in the next turn, not inside connectionLost
    assert _fired(stopped)


def test_a_message_waiting_on_its_fsync_gets_its_250_before_the_421(tmp_path: Path) -> None:
    runner = ManualRunner()
    s = _open(tmp_path, runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.factory.close_sessions()
    assert s.replies() == [] and not s.closed
    runner.complete()
    replies = s.replies()
    assert replies[0].startswith("250 2.0.0 Ok: queued as "), replies
    assert replies[1:] == [SHUTTING_DOWN]
    assert len(s.accepted) == 1


def test_a_failing_fsync_during_the_stop_is_answered_451_then_421(tmp_path: Path) -> None:
    runner = ManualRunner()
    s = _open(tmp_path, runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.factory.close_sessions()
    runner.fail(SpoolWriteError("No space left on device"))
    assert s.replies() == [
        "451 4.3.0 Local error: message not accepted, try again later",
        SHUTTING_DOWN,
    ]
    assert s.queue_files() == [] and s.accepted == []


def test_a_message_rejected_at_its_dot_during_the_stop_gets_its_550_then_421(
    tmp_path: Path,
) -> None:
    s = _open(tmp_path)
    s.start_data()
    s.factory.close_sessions()
    s.send(b"bare\nLF\r\n.\r\n")
    replies = s.replies()
    assert replies[0].startswith("550 5.5.2"), replies
    assert replies[1:] == [SHUTTING_DOWN]
    assert s.closed


def test_a_session_that_does_not_finish_in_the_grace_is_aborted(tmp_path: Path) -> None:
    s = _open(tmp_path)
    s.start_data()
    s.send(b"Subject: never ends\r\n")
    stopped = s.factory.close_sessions()
    s.clock.advance(SHUTDOWN_GRACE - 0.1)
    assert not s.closed
    s.clock.advance(0.1)
    assert s.closed and s.replies() == []  # no reply: the client retries the message
    s.disconnect()
    s.clock.advance(0)  # the stop goes on in the next turn, not inside connectionLost
    assert _fired(stopped)
    assert s.tmp_files() == [] and s.queue_files() == []


def test_without_sessions_the_stop_does_not_wait(tmp_path: Path) -> None:
    s = _open(tmp_path)
    s.disconnect()
    s.clock.advance(0)  # the stop goes on in the next turn, not inside connectionLost
    assert _fired(s.factory.close_sessions())


def test_a_session_that_would_start_during_the_stop_is_refused_with_421(
    tmp_path: Path,
) -> None:
    s = _open(tmp_path)
    s.disconnect()
    s.factory.close_sessions()
    proto = s.factory.buildProtocol(LOCAL_V4)
    assert proto is not None and not isinstance(proto, RelayESMTP)
    transport = StringTransport(peerAddress=LOCAL_V4)
    proto.makeConnection(transport)
    assert transport.value() == (
        f"421 4.3.2 {HOSTNAME} Service shutting down, try again later\r\n".encode()
    )
    assert transport.disconnecting


def test_a_second_stop_call_waits_for_the_same_sessions(tmp_path: Path) -> None:
    s = _open(tmp_path)
    s.start_data()
    first = s.factory.close_sessions()
    second = s.factory.close_sessions()
    assert not _fired(first) and not _fired(second)
    s.send(b"x\r\n.\r\n")
    s.disconnect()
    s.clock.advance(0)  # the stop goes on in the next turn, not inside connectionLost
    assert _fired(first) and _fired(second)
    assert s.clock.getDelayedCalls() == []  # the grace timer is gone with the last session


def test_a_factory_listening_again_after_a_stop_takes_sessions_again(tmp_path: Path) -> None:
    s = _open(tmp_path)
    s.disconnect()
    s.factory.close_sessions()
    s.factory.doStart()  # a listening port started again (SMTPListeners started after a stop)
    assert isinstance(s.factory.buildProtocol(LOCAL_V4), RelayESMTP)
