"""SMTPProvider: a pool of persistent connections on a MemoryReactorClock.

The pool connects through a real HostnameEndpoint; MemoryReactorClock records each connectTCP
and the test plays the network: it accepts a connection (a RecordingTransport) or refuses it.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mailrelay.metrics import Metrics
from mailrelay.outbound.pool import SMTPProvider
from mailrelay.outbound.results import IProvider, Kind, OutboundMessage
from tests.unit.fakes import (
    EHLO_PIPELINING,
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
    for _ in range(2):
        if failure == "refused":
            p.refuse()
        elif failure == "greeting-421":
            p.accept().reply(b"421 4.3.2 too busy\r\n")
        elif failure == "lost-during-setup":
            up = p.accept()
            up.reply(b"220 hi\r\n")
            up.lose(error.ConnectionLost())
        else:
            p.accept()
    if failure == "timeout":
        p.reactor.advance(TIMEOUTS["greeting_timeout"] + 1)
    for d in ds:
        results = result_of(d)
        assert [r.kind for r in results] == [Kind.TEMPORARY]
        assert "unavailable" in results[0].reply
        assert "provider p" in results[0].reply
    assert p.provider.open_connections == 0


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


def test_idle_connection_that_timed_out_is_not_given_a_message() -> None:
    p = Pool(connections=1)
    d1 = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    finish(up)
    result_of(d1)
    p.reactor.advance(TIMEOUTS["idle_timeout"] + 1)
    assert up.take() == b"QUIT\r\n"
    d2 = p.provider.deliver(msg(2))
    assert up.take() == b""  # not sent over the connection that is saying goodbye
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


def test_close_fails_waiting_messages_and_aborts_busy_connections() -> None:
    p = Pool(connections=1)
    d_busy = p.provider.deliver(msg(1))
    d_waiting = p.provider.deliver(msg(2))
    up = p.open()
    assert sent(up)
    result_of(p.provider.close())
    [r] = result_of(d_waiting)
    assert (r.kind, r.reply) == (Kind.TEMPORARY, "relay shutting down")
    assert up.aborted
    assert not has_fired(d_busy)  # its answer comes with the connection's end
    up.lose(error.ConnectionAborted())
    [r] = result_of(d_busy)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, False)
    # New work is refused at once, without connecting.
    [r] = result_of(p.provider.deliver(msg(3)))
    assert (r.kind, r.reply) == (Kind.TEMPORARY, "relay shutting down")
    assert p.attempts == 1


def test_close_quits_idle_connections_politely() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    up = p.open()
    sent(up)
    finish(up)
    result_of(d)
    result_of(p.provider.close())
    assert up.take() == b"QUIT\r\n"
    assert not up.aborted
    up.reply(b"221 bye\r\n")
    assert up.closing


def test_connection_that_completes_setup_after_close_is_quit() -> None:
    p = Pool(connections=1)
    d = p.provider.deliver(msg(1))
    result_of(p.provider.close())
    assert result_of(d)[0].reply == "relay shutting down"
    up = p.open()
    assert up.take() == b"EHLO relay.test\r\nQUIT\r\n"
