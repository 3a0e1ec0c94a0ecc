"""SMTPProvider: a pool of persistent connections on a MemoryReactorClock.

The pool connects through a real HostnameEndpoint; MemoryReactorClock records each connectTCP
and the test plays the network: it accepts a connection (a RecordingTransport) or refuses it.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.endpoints import connectProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mailrelay.metrics import Metrics
from mailrelay.outbound.pool import SHUTDOWN_GRACE, SMTPProvider
from mailrelay.outbound.results import IProvider, Kind, OutboundMessage
from mailrelay.outbound.transaction import NO_8BITMIME
from tests.unit.fakes import (
    EHLO_PIPELINING,
    EHLO_PLAIN,
    TIMEOUTS,
    LogCapture,
    Upstream,
    has_fired,
    message,
    provider_config,
    result_of,
)


def msg(n: int) -> OutboundMessage:
    """Message n, recognisable on the wire by its sender."""
    return message("rcpt@example.test", queue_id=f"Q{n}", sender=f"m{n}@example.test")


def mail_from(n: int) -> bytes:
    return b"MAIL FROM:<m%d@example.test>" % n


def msg_8bit(n: int) -> OutboundMessage:
    return OutboundMessage(
        f"Q{n}", f"m{n}@example.test", ("rcpt@example.test",), b"caf\xc3\xa9\r\n", body_8bit=True
    )


class Pool:
    def __init__(self, **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.config = provider_config(**config)
        self.provider = SMTPProvider(self.config, self.reactor, self.metrics)
        self.accepted = 0  # connection attempts handled so far

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(self) -> Upstream:
        """Complete the next pending connection attempt."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[self.accepted]
        self.accepted += 1
        return Upstream.connect(factory.buildProtocol(None))

    def refuse(self) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[self.accepted]
        factory.clientConnectionFailed(
            self.reactor.connectors[self.accepted], Failure(error.ConnectionRefusedError())
        )
        self.accepted += 1
        self.reactor.advance(1)  # HostnameEndpoint gives up on its next attempt tick

    def open(self, ehlo: bytes = EHLO_PIPELINING) -> Upstream:
        """Accept the next connection and answer greeting and EHLO."""
        up = self.accept()
        up.reply(b"220 upstream.test\r\n" + ehlo)
        return up

    def connections_counted(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mailrelay_upstream_connections_total", {"provider": "p", "result": result}
        )
        return value or 0.0


def finish(up: Upstream, final: bytes = b"250 2.0.0 Ok: queued as X\r\n") -> None:
    """Answer one pipelined single-recipient transaction (the payload is consumed)."""
    up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert up.take().endswith(b"\r\n.\r\n")
    up.reply(final)


def sent(up: Upstream) -> list[bytes]:
    """The MAIL FROM lines the client has written so far (consumes the output)."""
    return [line for line in up.take().split(b"\r\n") if line.startswith(b"MAIL FROM")]


def test_provides_iprovider() -> None:
    from zope.interface.verify import verifyObject

    assert verifyObject(IProvider, Pool().provider)


def test_first_delivery_opens_exactly_one_connection() -> None:
    p = Pool(port=2525, connect_timeout=7.0)
    d = p.provider.deliver(msg(1))
    assert p.attempts == 1
    host, port, _factory, timeout, _bind = p.reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 2525, 7.0)
    assert not has_fired(d)
    up = p.open()
    assert sent(up) == [mail_from(1) + b" SIZE=%d" % len(msg(1).body)]
    finish(up)
    [r] = result_of(d)
    assert r.kind is Kind.DELIVERED
    assert p.connections_counted("ok") == 1


def test_messages_share_one_ready_connection_in_fifo_order() -> None:
    p = Pool(connections=1)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2, 3)]
    assert p.attempts == 1
    up = p.open()
    order = []
    for n in (1, 2, 3):
        [line] = sent(up)
        order.append(line.split(b" SIZE")[0])
        finish(up)
        assert result_of(ds[n - 1])[0].kind is Kind.DELIVERED
    assert order == [mail_from(1), mail_from(2), mail_from(3)]
    assert p.attempts == 1  # no new connection per message
    # Later messages reuse the idle connection too.
    d4 = p.provider.deliver(msg(4))
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(4)]
    finish(up)
    result_of(d4)
    assert p.attempts == 1


def test_never_more_connections_than_configured_and_fifo_across_them() -> None:
    p = Pool(connections=2)
    ds = [p.provider.deliver(msg(n)) for n in range(1, 6)]
    assert p.attempts == 2
    ups = [p.open(), p.open()]
    assert p.provider.open_connections == 2
    started: list[bytes] = []
    for _ in range(5):
        for up in ups:
            lines = sent(up)
            if lines:
                started += [line.split(b" SIZE")[0] for line in lines]
                finish(up)
    assert started == [mail_from(n) for n in range(1, 6)]
    assert [result_of(d)[0].kind for d in ds] == [Kind.DELIVERED] * 5
    assert p.attempts == 2


def test_connection_is_replaced_after_max_messages() -> None:
    p = Pool(connections=1, max_messages_per_connection=2)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2, 3)]
    first = p.open()
    for _ in (1, 2):
        sent(first)
        finish(first)
    assert [r.kind for d in ds[:2] for r in result_of(d)] == [Kind.DELIVERED] * 2
    assert first.take() == b"QUIT\r\n"
    # The connection saying QUIT still counts toward the pool size: no second one yet.
    assert p.attempts == 1
    assert not has_fired(ds[2])
    first.reply(b"221 bye\r\n")
    assert first.closing
    first.lose()
    # Gone: the third message, still waiting, gets a new connection.
    assert p.attempts == 2
    second = p.open()
    assert [line.split(b" SIZE")[0] for line in sent(second)] == [mail_from(3)]
    finish(second)
    assert result_of(ds[2])[0].kind is Kind.DELIVERED
    assert first.take() == b""


def test_no_new_connection_after_max_messages_when_nothing_waits() -> None:
    p = Pool(connections=1, max_messages_per_connection=1)
    d = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    finish(up)
    result_of(d)
    assert up.take() == b"QUIT\r\n"
    assert p.attempts == 1


@pytest.mark.parametrize("failure", ["refused", "greeting-421", "lost-during-setup", "timeout"])
def test_setup_failure_with_no_live_connection_fails_every_waiting_message(failure: str) -> None:
    """So the router can move on to the next provider at once instead of waiting."""
    p = Pool(connections=2)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2, 3)]
    assert p.attempts == 2
    aborted: list[Upstream] = []
    for _ in range(2):
        if failure == "refused":
            p.refuse()
        elif failure == "greeting-421":
            up = p.accept()
            up.reply(b"421 4.3.2 too busy\r\n")
            aborted.append(up)
        elif failure == "lost-during-setup":
            up = p.accept()
            up.reply(b"220 hi\r\n")
            up.lose(error.ConnectionLost())
        else:
            aborted.append(p.accept())
    if failure == "timeout":
        p.reactor.advance(TIMEOUTS["greeting_timeout"] + 1)
    # At once, not when the aborted connections are finally gone.
    for d in ds:
        results = result_of(d)
        assert [r.kind for r in results] == [Kind.TEMPORARY]
        assert "unavailable" in results[0].reply
        assert "provider p" in results[0].reply
    # An aborted connection counts until the transport reports it lost, as TCP does.
    assert p.provider.open_connections == len(aborted)
    for up in aborted:
        assert up.aborted
        up.lose(error.ConnectionAborted())
    assert p.provider.open_connections == 0
    assert p.attempts == 2  # no reconnecting after the failed setups


def test_message_arriving_while_a_failed_connection_closes_is_not_stranded() -> None:
    """Between a failed setup and the transport reporting the loss, the dead connection
    still fills the pool; a message arriving then must get a fresh attempt once it is gone."""
    p = Pool(connections=1)
    first = p.provider.deliver(msg(1))
    up = p.accept()
    up.reply(b"421 4.3.2 too busy\r\n")
    assert result_of(first)[0].kind is Kind.TEMPORARY
    second = p.provider.deliver(msg(2))  # the dead connection still counts: no attempt yet
    assert p.attempts == 1
    up.lose(error.ConnectionAborted())
    assert p.attempts == 2  # a fresh attempt for the message that waits
    again = p.open()
    sent(again)
    finish(again)
    assert result_of(second)[0].kind is Kind.DELIVERED


def test_first_setup_failure_waits_for_the_other_attempt() -> None:
    p = Pool(connections=2)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2)]
    p.refuse()
    assert not any(has_fired(d) for d in ds)
    up = p.open()
    # The live connection serves both, one after the other.
    sent(up)
    finish(up)
    sent(up)
    finish(up)
    assert [result_of(d)[0].kind for d in ds] == [Kind.DELIVERED, Kind.DELIVERED]


def test_setup_failure_while_another_connection_lives_keeps_messages_waiting() -> None:
    p = Pool(connections=2)
    d1 = p.provider.deliver(msg(1))
    up = p.open()
    assert sent(up)
    d2 = p.provider.deliver(msg(2))  # the one connection is busy: a second is opened
    assert p.attempts == 2
    p.refuse()
    assert not has_fired(d2)
    finish(up)
    result_of(d1)
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(2)]
    finish(up)
    assert result_of(d2)[0].kind is Kind.DELIVERED


def test_auth_failure_is_logged_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "pool-Secret-42"
    monkeypatch.setenv("MAILRELAY_TEST_PASSWORD", secret)
    with LogCapture() as logs:
        p = Pool(username="user", password_env="MAILRELAY_TEST_PASSWORD")
        d = p.provider.deliver(msg(1))
        up = p.accept()
        up.reply(b"220 hi\r\n250-upstream.test\r\n250 AUTH PLAIN\r\n")
        assert up.take().count(b"AUTH PLAIN") == 1
        up.reply(b"535 5.7.8 bad credentials\r\n")
    [r] = result_of(d)
    assert r.kind is Kind.TEMPORARY
    assert "auth" in r.reply
    assert secret not in r.reply
    texts = list(logs.texts())
    assert any("auth" in t for t in texts)
    assert not any(secret in t for t in texts)
    assert p.connections_counted("auth") == 1


def test_lost_idle_connection_is_replaced_on_demand() -> None:
    p = Pool(connections=1)
    d1 = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    finish(up)
    result_of(d1)
    up.lose(error.ConnectionLost())
    assert p.provider.open_connections == 0
    assert p.attempts == 1
    d2 = p.provider.deliver(msg(2))
    assert p.attempts == 2
    second = p.open()
    assert [line.split(b" SIZE")[0] for line in sent(second)] == [mail_from(2)]
    finish(second)
    result_of(d2)


@pytest.mark.parametrize("why", ["idle-timeout", "server-421"])
def test_idle_connection_that_quits_gets_no_message_and_counts_until_closed(why: str) -> None:
    p = Pool(connections=1)
    d1 = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    finish(up)
    result_of(d1)
    if why == "idle-timeout":
        p.reactor.advance(TIMEOUTS["idle_timeout"] + 1)
    else:
        up.reply(b"421 4.4.2 closing idle connection\r\n")
    assert up.take() == b"QUIT\r\n"
    d2 = p.provider.deliver(msg(2))
    assert up.take() == b""  # not sent over the connection that is saying goodbye
    # Still open while it says goodbye: a second one now would be one too many.
    assert p.provider.open_connections == 1
    assert p.attempts == 1
    up.reply(b"221 bye\r\n")
    up.lose()
    assert p.provider.open_connections == 0
    assert p.attempts == 2
    second = p.open()
    assert sent(second)
    finish(second)
    assert result_of(d2)[0].kind is Kind.DELIVERED


def test_busy_connection_lost_gives_temporary_results_and_reconnects_for_the_next() -> None:
    p = Pool(connections=1)
    d1 = p.provider.deliver(msg(1))
    d2 = p.provider.deliver(msg(2))
    up = p.open()
    sent(up)
    up.lose(error.ConnectionLost())
    [r] = result_of(d1)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, False)
    assert not has_fired(d2)
    assert p.attempts == 2
    second = p.open()
    assert [line.split(b" SIZE")[0] for line in sent(second)] == [mail_from(2)]


def test_close_lets_a_busy_connection_finish_its_message_then_quits() -> None:
    """After the final dot the message may already be the upstream's: aborting would turn
    every shutdown into a possible duplicate."""
    p = Pool(connections=1)
    d_busy = p.provider.deliver(msg(1))
    d_waiting = p.provider.deliver(msg(2))
    up = p.open()
    assert sent(up)
    up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert up.take().endswith(b"\r\n.\r\n")  # the final dot is out
    closed = p.provider.close()
    [r] = result_of(d_waiting)
    assert (r.kind, r.reply) == (Kind.TEMPORARY, "relay shutting down")
    assert not up.aborted
    assert not has_fired(closed)
    up.reply(b"250 2.0.0 Ok: queued as X\r\n")
    [r] = result_of(d_busy)
    assert (r.kind, r.uncertain) == (Kind.DELIVERED, False)
    assert up.take() == b"QUIT\r\n"
    assert not has_fired(closed)
    up.reply(b"221 bye\r\n")
    assert up.closing
    up.lose()
    assert result_of(closed) is None
    assert p.provider.open_connections == 0
    assert not [c for c in p.reactor.getDelayedCalls() if c.active()]  # grace timer cancelled
    # New work is refused at once, without connecting.
    [r] = result_of(p.provider.deliver(msg(3)))
    assert (r.kind, r.reply) == (Kind.TEMPORARY, "relay shutting down")
    assert p.attempts == 1


def test_close_lets_a_failed_transaction_reset_then_quits() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    closed = p.provider.close()
    up.reply(b"451 4.3.0 later\r\n503 no\r\n503 no\r\n")
    assert result_of(d)[0].kind is Kind.TEMPORARY
    assert up.take() == b"RSET\r\n"
    up.reply(b"250 ok\r\n")
    assert up.take() == b"QUIT\r\n"
    up.reply(b"221 bye\r\n")
    up.lose()
    assert has_fired(closed)


def test_close_aborts_what_is_still_open_after_the_grace_period() -> None:
    p = Pool(connections=2)
    d_busy = p.provider.deliver(msg(1))
    busy = p.open()
    sent(busy)
    busy.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    busy.take()
    d_idle = p.provider.deliver(msg(2))
    idle = p.open()
    sent(idle)
    finish(idle)
    result_of(d_idle)
    closed = p.provider.close()
    assert idle.take() == b"QUIT\r\n"  # and the server never answers it
    p.reactor.advance(SHUTDOWN_GRACE - 0.1)
    assert not has_fired(closed)
    assert not busy.aborted
    p.reactor.advance(0.1)
    assert result_of(closed) is None
    assert busy.aborted and idle.aborted
    # Answered at once, before close() fires, so the result can still be journalled.
    [r] = result_of(d_busy)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, True)
    assert p.connections_counted("shutdown") == 0  # our own abort is no provider failure
    # A late caller is not kept waiting for the transports to report the loss.
    assert has_fired(p.provider.close())
    busy.lose(error.ConnectionAborted())
    idle.lose(error.ConnectionAborted())
    assert p.provider.open_connections == 0
    assert p.reactor.getDelayedCalls() == []


def test_close_aborts_a_connection_still_in_setup_after_the_grace_period() -> None:
    p = Pool(connections=1, greeting_timeout=SHUTDOWN_GRACE * 2)
    d = p.provider.deliver(msg(1))
    up = p.accept()  # the upstream never greets
    closed = p.provider.close()
    result_of(d)
    p.reactor.advance(SHUTDOWN_GRACE)
    assert up.aborted
    assert has_fired(closed)
    assert p.connections_counted("shutdown") == 0
    assert p.connections_counted("timeout") == 0


def test_close_with_nothing_open_fires_at_once_and_twice() -> None:
    p = Pool()
    assert result_of(p.provider.close()) is None
    assert result_of(p.provider.close()) is None
    assert p.reactor.getDelayedCalls() == []


def test_every_close_caller_is_answered() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    first, second = p.provider.close(), p.provider.close()
    finish(up)
    up.reply(b"221 bye\r\n")
    assert not has_fired(first) and not has_fired(second)
    up.lose()
    assert has_fired(first) and has_fired(second)
    result_of(d)


def test_close_quits_idle_connections_politely() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    finish(up)
    result_of(d)
    closed = p.provider.close()
    assert up.take() == b"QUIT\r\n"
    assert not up.aborted
    up.reply(b"221 bye\r\n")
    assert up.closing
    assert not has_fired(closed)
    up.lose()
    assert has_fired(closed)


def test_close_cancels_a_connection_attempt_not_yet_open() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    with LogCapture() as logs:
        closed = p.provider.close()
    assert result_of(d)[0].reply == "relay shutting down"
    assert p.reactor.connectors[0].stoppedConnecting
    assert has_fired(closed)
    assert p.connections_counted("connect") == 0  # our own cancel is no provider failure
    assert not any("failed" in t for t in logs.texts())


def test_connection_in_setup_at_close_is_quit_once_ready() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    up = p.accept()  # connected, no greeting yet
    closed = p.provider.close()
    assert result_of(d)[0].reply == "relay shutting down"
    up.reply(b"220 upstream.test\r\n" + EHLO_PIPELINING)
    assert up.take() == b"EHLO relay.test\r\nQUIT\r\n"
    up.reply(b"221 bye\r\n")
    up.lose()
    assert has_fired(closed)


# -- pool bookkeeping -------------------------------------------------------------------------


@pytest.mark.parametrize("after", ["rset", "transaction"])
def test_an_unsolicited_reply_while_idle_does_not_count_the_connection_twice(after: str) -> None:
    p = Pool(connections=2)
    d = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    if after == "transaction":
        finish(up)
    else:
        finish(up, final=b"451 4.3.0 later\r\n")
        assert up.take() == b"RSET\r\n"
        up.reply(b"250 ok\r\n")
    result_of(d)
    up.reply(b"250 unsolicited\r\n")
    assert up.take() == b""
    assert p.provider.open_connections == 1
    # The one idle connection carries the next message; the one after gets a new connection.
    ds = [p.provider.deliver(msg(n)) for n in (2, 3)]
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(2)]
    assert p.attempts == 2
    finish(up)
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(3)]
    finish(up)
    assert [result_of(d)[0].kind for d in ds] == [Kind.DELIVERED] * 2


def test_an_unsolicited_reply_right_after_setup_does_not_make_the_client_idle_twice() -> None:
    p = Pool(connections=2)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2)]
    first = p.open()
    for _ in ds:  # the first connection serves both while the second one is still set up
        sent(first)
        finish(first)
    second = p.open()  # ready with nothing to do: idle right after EHLO
    assert second.take() == b"EHLO relay.test\r\n"
    assert p.provider.open_connections == 2
    second.reply(b"250-upstream.test\r\n250 PIPELINING\r\n")
    assert second.take() == b""
    assert p.provider.open_connections == 2
    # Three messages: each idle connection takes one, only the third waits.
    more = [p.provider.deliver(msg(n)) for n in (3, 4, 5)]
    assert len(sent(first)) + len(sent(second)) == 2
    assert p.attempts == 2
    assert not any(has_fired(d) for d in more)


def test_connections_never_exceed_the_limit_while_some_are_quitting() -> None:
    """Replaced after max messages while another idles out: QUITting ones still count."""
    p = Pool(connections=2, max_messages_per_connection=1)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2, 3, 4)]
    ups = [p.open(), p.open()]
    for up in ups:
        sent(up)
        finish(up)
        assert up.take() == b"QUIT\r\n"
    assert p.attempts == 2 and p.provider.open_connections == 2
    ups[0].reply(b"221 bye\r\n")
    ups[0].lose()
    assert p.attempts == 3
    third = p.open()
    sent(third)
    ups[1].reply(b"221 bye\r\n")
    ups[1].lose()
    assert p.attempts == 4
    fourth = p.open()
    sent(fourth)
    for up in (third, fourth):
        finish(up)
    assert [result_of(d)[0].kind for d in ds] == [Kind.DELIVERED] * 4


# -- the password -----------------------------------------------------------------------------


def _password_source(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    if kind == "env-unset":
        monkeypatch.delenv("MAILRELAY_TEST_PASSWORD", raising=False)
        return {"password_env": "MAILRELAY_TEST_PASSWORD"}
    if kind == "env-empty":
        monkeypatch.setenv("MAILRELAY_TEST_PASSWORD", "")
        return {"password_env": "MAILRELAY_TEST_PASSWORD"}
    if kind == "file-missing":
        return {"password_file": str(tmp_path / "missing")}
    if kind == "file-unreadable":
        return {"password_file": str(tmp_path)}  # a directory: IsADirectoryError, even as root
    if kind == "file-not-utf8":
        path = tmp_path / "password"
        path.write_bytes(b"\xff\xfe-Secret")
        return {"password_file": str(path)}
    assert kind == "file-empty"
    path = tmp_path / "password"
    path.write_text("\n")
    return {"password_file": str(path)}


@pytest.mark.parametrize(
    "kind",
    ["env-unset", "env-empty", "file-missing", "file-unreadable", "file-not-utf8", "file-empty"],
)
def test_password_not_available_is_an_auth_setup_failure_without_connecting(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _password_source(kind, tmp_path, monkeypatch)
    with LogCapture() as logs:
        p = Pool(connections=2, username="user", **source)
        ds = [p.provider.deliver(msg(n)) for n in (1, 2, 3)]
    # No connection (no AUTH with an empty password), every waiting message answered.
    assert p.attempts == 0
    for d in ds:
        [r] = result_of(d)
        assert r.kind is Kind.TEMPORARY
        assert "unavailable (auth:" in r.reply
        assert "Secret" not in r.reply
    assert p.connections_counted("auth") == 3  # each delivery tried once, failed at once
    texts = list(logs.texts())
    assert any("failed at auth" in t for t in texts)
    assert not any("Secret" in t for t in texts)
    assert p.provider.open_connections == 0


def test_password_failure_leaves_the_pool_usable_once_it_is_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt counter and the waiting queue are not left behind by the failure."""
    path = tmp_path / "password"
    p = Pool(connections=1, username="user", password_file=str(path))
    [r] = result_of(p.provider.deliver(msg(1)))
    assert r.kind is Kind.TEMPORARY
    path.write_text("file-Secret\n")
    d = p.provider.deliver(msg(2))
    assert p.attempts == 1
    up = p.accept()
    up.reply(b"220 hi\r\n250-upstream.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n")
    token = base64.b64encode(b"\0user\0file-Secret")
    assert up.take() == b"EHLO relay.test\r\nAUTH PLAIN " + token + b"\r\n"
    up.reply(b"235 ok\r\n")
    # Only message 2 goes out: message 1 was answered and is no stale entry.
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(2)]
    finish(up)
    assert result_of(d)[0].kind is Kind.DELIVERED


def test_password_failure_while_another_connection_lives_keeps_messages_waiting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "password"
    path.write_text("file-Secret\n")
    p = Pool(connections=2, username="user", password_file=str(path))
    d1 = p.provider.deliver(msg(1))
    up = p.accept()
    up.reply(b"220 hi\r\n250-upstream.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n235 ok\r\n")
    assert sent(up)
    path.unlink()
    d2 = p.provider.deliver(msg(2))  # the second connection cannot be set up
    assert p.attempts == 1
    assert p.connections_counted("auth") == 1
    assert not has_fired(d2)
    finish(up)
    result_of(d1)
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(2)]
    finish(up)
    assert result_of(d2)[0].kind is Kind.DELIVERED


def test_an_exception_while_starting_a_connection_keeps_the_counters_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    def broken_once(endpoint: Any, protocol: Any) -> Any:
        calls.append(protocol)
        if len(calls) == 1:
            raise RuntimeError("no file descriptors left")
        return connectProtocol(endpoint, protocol)

    monkeypatch.setattr("mailrelay.outbound.pool.connectProtocol", broken_once)
    p = Pool(connections=1)
    [r] = result_of(p.provider.deliver(msg(1)))
    assert r.kind is Kind.TEMPORARY
    assert "no file descriptors left" in r.reply
    assert p.connections_counted("connect") == 1
    d = p.provider.deliver(msg(2))
    assert p.attempts == 1
    up = p.open()
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(2)]
    finish(up)
    assert result_of(d)[0].kind is Kind.DELIVERED


# -- 8-bit bodies -----------------------------------------------------------------------------


def test_8bit_message_to_an_upstream_without_8bitmime_fails_over_and_keeps_the_connection() -> None:
    p = Pool(connections=1)
    d1 = p.provider.deliver(msg_8bit(1))
    d2 = p.provider.deliver(msg(2))
    up = p.open(EHLO_PLAIN.replace(b"8BITMIME", b"PIPELINING"))
    [r] = result_of(d1)
    assert (r.kind, r.reply) == (Kind.TEMPORARY, NO_8BITMIME)
    # The same connection carries the next message at once; no MAIL for the 8-bit one.
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(2)]
    finish(up)
    assert result_of(d2)[0].kind is Kind.DELIVERED
    assert p.attempts == 1
    d3 = p.provider.deliver(msg_8bit(3))
    assert result_of(d3)[0].reply == NO_8BITMIME
    assert p.provider.open_connections == 1
    d4 = p.provider.deliver(msg(4))
    assert [line.split(b" SIZE")[0] for line in sent(up)] == [mail_from(4)]
    finish(up)
    result_of(d4)


def test_8bit_message_to_an_upstream_with_8bitmime_is_sent_as_8bitmime() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg_8bit(1))
    up = p.open()
    assert sent(up) == [mail_from(1) + b" SIZE=7 BODY=8BITMIME"]
    finish(up)
    assert result_of(d)[0].kind is Kind.DELIVERED
