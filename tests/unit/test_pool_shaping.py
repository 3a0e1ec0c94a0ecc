"""SMTPProvider shaping and protection: recipient batches, rate limits, throttling, the daily
quota, the circuit breaker and connection age; on a MemoryReactorClock, the test playing the
upstream (see test_pool.py)."""

from __future__ import annotations

import pytest

from mailrelay.outbound.breaker import BreakerState
from mailrelay.outbound.results import FailureClass, Kind, OutboundMessage
from tests.unit.fakes import EHLO_PIPELINING, has_fired, message, result_of
from tests.unit.test_pool import Pool, finish, mail_from, msg, sent


def rcpts(n: int) -> tuple[str, ...]:
    return tuple(f"r{i:02d}@example.test" for i in range(n))


def answer_transaction(
    up, recipients: int, final: bytes = b"250 2.0.0 Ok: queued as X\r\n"
) -> bytes:  # type: ignore[no-untyped-def]
    """Answer one pipelined transaction of ``recipients`` RCPTs; returns what was sent."""
    written = up.take()
    up.reply(b"250 ok\r\n" + b"250 ok\r\n" * recipients + b"354 go\r\n")
    payload = up.take()
    assert payload.endswith(b"\r\n.\r\n")
    up.reply(final)
    return written


# -- batching -----------------------------------------------------------------------------------


def test_45_recipients_in_batches_of_20_20_5_batch_delay_apart_one_merged_result() -> None:
    p = Pool(connections=1, batch_size=20, batch_delay=1.5)
    m = OutboundMessage("Q1", "s@example.test", rcpts(45), b"Subject: x\r\n\r\nhi\r\n")
    d = p.provider.deliver(m)
    up = p.open()
    transactions: list[tuple[float, list[bytes]]] = []
    for size in (20, 20, 5):
        written = answer_transaction(up, size)
        rcpt_lines = [line for line in written.split(b"\r\n") if line.startswith(b"RCPT TO")]
        transactions.append((p.reactor.seconds(), rcpt_lines))
        if size != 5:
            assert up.take() == b""  # nothing before batch_delay has passed
            p.reactor.advance(1.49)
            assert up.take() == b""
            p.reactor.advance(0.01)
    assert [len(lines) for _, lines in transactions] == [20, 20, 5]
    assert [t for t, _ in transactions] == [0.0, 1.5, 3.0]
    # Every recipient exactly once, in order, across the batches.
    sent_rcpts = [line[9:-1].decode() for _, lines in transactions for line in lines]
    assert tuple(sent_rcpts) == m.recipients
    results = result_of(d)
    assert [r.recipient for r in results] == list(m.recipients)
    assert {r.kind for r in results} == {Kind.DELIVERED}
    assert p.attempts == 1


def test_batch_size_zero_sends_every_recipient_in_one_transaction() -> None:
    p = Pool(connections=1, batch_size=0)
    d = p.provider.deliver(OutboundMessage("Q1", "s@example.test", rcpts(45), b"x\r\n"))
    up = p.open()
    answer_transaction(up, 45)
    assert len(result_of(d)) == 45


def test_batch_delay_zero_sends_the_next_batch_at_once() -> None:
    p = Pool(connections=1, batch_size=2, batch_delay=0)
    d = p.provider.deliver(OutboundMessage("Q1", "s@example.test", rcpts(3), b"x\r\n"))
    up = p.open()
    answer_transaction(up, 2)
    answer_transaction(up, 1)
    assert [r.kind for r in result_of(d)] == [Kind.DELIVERED] * 3


def test_batches_merge_mixed_outcomes_per_recipient() -> None:
    p = Pool(connections=1, batch_size=2, batch_delay=0)
    d = p.provider.deliver(OutboundMessage("Q1", "s@example.test", rcpts(3), b"x\r\n"))
    up = p.open()
    up.take()
    up.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
    up.take()
    up.reply(b"250 2.0.0 Ok: queued as A\r\n")
    answer_transaction(up, 1, final=b"451 4.3.0 later\r\n")
    results = result_of(d)
    assert [(r.kind, r.code) for r in results] == [
        (Kind.DELIVERED, 250),
        (Kind.PERMANENT, 550),
        (Kind.TEMPORARY, 451),
    ]


def test_when_a_batch_finds_the_provider_down_the_rest_fail_over_at_once() -> None:
    p = Pool(connections=1, batch_size=2, batch_delay=10)
    d = p.provider.deliver(OutboundMessage("Q1", "s@example.test", rcpts(5), b"x\r\n"))
    p.refuse()
    results = result_of(d)  # no batch_delay waited
    assert len(results) == 5
    assert {(r.kind, r.failure) for r in results} == {(Kind.TEMPORARY, FailureClass.CONNECT)}


# -- rate limits --------------------------------------------------------------------------------


def test_rate_limit_spaces_transactions_with_one_timer() -> None:
    p = Pool(connections=2, rate=10.0)
    ds = [p.provider.deliver(msg(n)) for n in range(1, 31)]
    ups = [p.open(), p.open()]
    started: list[float] = []
    while len(started) < 30:
        for up in ups:
            if sent(up):
                started.append(p.reactor.seconds())
                finish(up)
        # One wake-up timer for the provider however many messages wait (plus each
        # connection's own stage timer).
        calls = [c for c in p.reactor.getDelayedCalls() if c.active()]
        assert len(calls) <= 1 + len(ups)
        if len(started) < 30:
            p.reactor.advance(min(c.getTime() for c in calls) - p.reactor.seconds())
    gaps = [round(b - a, 2) for a, b in zip(started, started[1:], strict=False)]
    assert min(gaps) >= 0.1 - 1e-9
    assert started[-1] == pytest.approx(2.9, abs=0.02)
    assert all(result_of(d)[0].kind is Kind.DELIVERED for d in ds)


def test_recipient_rate_holds_back_a_big_transaction() -> None:
    p = Pool(connections=1, recipient_rate=5.0, batch_size=0)
    first = p.provider.deliver(message(*rcpts(10), queue_id="Q1"))
    second = p.provider.deliver(message(*rcpts(1), queue_id="Q2"))
    up = p.open()
    answer_transaction(up, 10)
    assert result_of(first)
    p.reactor.advance(1.0)
    assert up.take() == b""  # 10 recipients at 5/s: the next may start after 2 s
    p.reactor.advance(1.0)
    answer_transaction(up, 1)
    assert result_of(second)[0].kind is Kind.DELIVERED


def test_throttling_reply_slows_the_provider_down() -> None:
    p = Pool(connections=1, rate=10.0)
    first = p.provider.deliver(msg(1))
    up = p.open()
    up.take()
    up.reply(b"250 ok\r\n454 4.7.0 Throttling failure: Maximum sending rate exceeded.\r\n")
    up.reply(b"554 no valid recipients\r\n")
    [r] = result_of(first)
    assert (r.kind, r.failure, r.code) == (Kind.TEMPORARY, FailureClass.RCPT, 454)
    assert (
        p.metrics.registry.get_sample_value("mailrelay_upstream_throttled_total", {"provider": "p"})
        == 1
    )
    assert p.provider.limits.throttle.factor(p.reactor.seconds()) == pytest.approx(0.5)


def test_daily_quota_answers_unavailable_once_used_up() -> None:
    p = Pool(connections=1, daily_quota=2)
    ds = [p.provider.deliver(msg(n)) for n in (1, 2)]
    up = p.open()
    for _ in ds:
        sent(up)
        finish(up)
    [r] = result_of(p.provider.deliver(msg(3)))
    assert (r.kind, r.failure) == (Kind.TEMPORARY, FailureClass.UNAVAILABLE)
    assert "daily quota of 2 transactions used" in r.reply


# -- circuit breaker ----------------------------------------------------------------------------


def test_breaker_opens_after_threshold_failures_then_nothing_waits() -> None:
    p = Pool(connections=1, breaker_threshold=3, breaker_cooldown=30.0)
    for n in range(3):
        d = p.provider.deliver(msg(n))
        p.refuse()
        assert result_of(d)[0].failure is FailureClass.CONNECT
    assert p.provider.breaker.state is BreakerState.OPEN
    attempts = p.attempts
    [r] = result_of(p.provider.deliver(msg(9)))  # at once, without a connection attempt
    assert (r.kind, r.failure) == (Kind.TEMPORARY, FailureClass.UNAVAILABLE)
    assert "circuit breaker open" in r.reply
    assert p.attempts == attempts
    assert (
        p.metrics.registry.get_sample_value("mailrelay_upstream_breaker_state", {"provider": "p"})
        == 2
    )


def open_breaker(p: Pool) -> None:
    for n in range(p.config.breaker_threshold):
        d = p.provider.deliver(msg(100 + n))
        p.refuse()
        result_of(d)
    assert p.provider.breaker.state is BreakerState.OPEN


def test_half_open_probe_success_closes_the_breaker_and_traffic_returns() -> None:
    p = Pool(connections=1, breaker_threshold=2, breaker_cooldown=30.0)
    open_breaker(p)
    attempts = p.attempts
    p.reactor.advance(29)
    assert p.attempts == attempts
    p.reactor.advance(1)
    assert p.attempts == attempts + 1  # the probe, with no message on it
    assert p.provider.breaker.state is BreakerState.HALF_OPEN
    # While the probe runs, messages still go elsewhere at once.
    [r] = result_of(p.provider.deliver(msg(1)))
    assert r.failure is FailureClass.UNAVAILABLE
    up = p.open(EHLO_PIPELINING)
    assert p.provider.breaker.state is BreakerState.CLOSED
    d = p.provider.deliver(msg(2))
    assert sent(up) and p.attempts == attempts + 1  # carried by the probe's connection
    finish(up)
    assert result_of(d)[0].kind is Kind.DELIVERED


def test_failed_probe_reopens_for_twice_as_long() -> None:
    p = Pool(connections=1, breaker_threshold=1, breaker_cooldown=10.0, breaker_max_cooldown=15.0)
    open_breaker(p)
    p.reactor.advance(10)
    p.refuse()  # the probe fails
    assert p.provider.breaker.state is BreakerState.OPEN
    assert p.provider.breaker.open_until == p.reactor.seconds() + 15  # 20 s, capped at 15
    attempts = p.attempts
    p.reactor.advance(14.9)
    assert p.attempts == attempts
    p.reactor.advance(0.1)
    assert p.attempts == attempts + 1


def test_transactions_that_time_out_open_the_breaker() -> None:
    p = Pool(connections=1, breaker_threshold=2, command_timeout=5.0)
    for n in (1, 2):
        d = p.provider.deliver(msg(n))
        up = p.open()
        assert sent(up)
        p.reactor.advance(5)  # no reply to MAIL/RCPT/DATA
        up.lose()
        assert result_of(d)[0].failure is FailureClass.TIMEOUT
    assert p.provider.breaker.state is BreakerState.OPEN


def test_a_completed_transaction_resets_the_failure_count() -> None:
    p = Pool(connections=1, breaker_threshold=2)
    d = p.provider.deliver(msg(1))
    p.refuse()
    result_of(d)
    d = p.provider.deliver(msg(2))
    up = p.open()
    sent(up)
    finish(up, b"550 5.7.1 rejected\r\n")  # an answer, even a 5xx, proves the provider up
    result_of(d)
    assert p.provider.breaker.consecutive_failures == 0


# -- connection age -----------------------------------------------------------------------------


def test_a_connection_older_than_max_connection_age_is_not_reused() -> None:
    p = Pool(connections=1, max_connection_age=100.0, keepalive=0, idle_timeout=1000.0)
    d = p.provider.deliver(msg(1))
    old = p.open()
    sent(old)
    finish(old)
    result_of(d)
    p.reactor.advance(100)
    d = p.provider.deliver(msg(2))
    assert old.take() == b"QUIT\r\n"
    old.reply(b"221 bye\r\n")
    old.lose()
    new = p.open()
    assert [line.split(b" SIZE")[0] for line in sent(new)] == [mail_from(2)]
    finish(new)
    assert result_of(d)[0].kind is Kind.DELIVERED


# -- review mends ------------------------------------------------------------------------------


def test_throttling_quits_only_the_connections_above_the_new_limit() -> None:
    p = Pool(connections=4)
    ds = [p.provider.deliver(msg(n)) for n in range(1, 9)]
    ups = [p.open() for _ in range(4)]
    for up in ups:  # each connection is throttled at MAIL
        up.take()
        up.reply(b"454 4.7.0 Throttling failure: Maximum sending rate exceeded.\r\n")
        up.reply(b"503 no\r\n503 no\r\n")
    quits = 0
    for up in ups:
        written = up.take()
        if b"RSET" in written:
            up.reply(b"250 reset\r\n")
            written += up.take()
        quits += b"QUIT" in written
    limit = p.provider.limits.connection_limit(p.reactor.seconds())
    assert limit == 2
    assert quits == 4 - limit  # not every connection
    assert sum(1 for d in ds if has_fired(d)) == 4  # the throttled four, passed on


def test_a_421_greeting_while_a_session_delivers_throttles_instead_of_failing_over() -> None:
    p = Pool(connections=4, breaker_threshold=2)
    ds = [p.provider.deliver(msg(n)) for n in range(1, 5)]
    first = p.open()
    for _ in range(3):
        p.accept().reply(b"421 4.7.0 Too many connections\r\n")
    assert p.provider.breaker.state is BreakerState.CLOSED
    assert p.provider.limits.connection_limit(p.reactor.seconds()) < 4
    # The waiting messages stay for the live session, none failed over.
    assert not any(has_fired(d) for d in ds)
    for _ in ds:
        while not sent(first):
            p.reactor.advance(0.5)  # the throttling pause
        finish(first)
    assert [result_of(d)[0].kind for d in ds] == [Kind.DELIVERED] * 4


def test_credentials_rejected_open_the_breaker_at_once_and_setups_go_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MR_POOL_PW", "not-the-password")
    p = Pool(
        connections=4,
        username="user",
        password_env="MR_POOL_PW",
        breaker_threshold=3,
    )
    ds = [p.provider.deliver(msg(n)) for n in range(1, 5)]
    assert p.attempts == 4  # no failure yet: the pool opens what it may
    up = p.open(b"250-upstream.test\r\n250 AUTH PLAIN\r\n")
    assert b"AUTH PLAIN " in up.take()
    up.reply(b"535 5.7.8 Authentication credentials invalid\r\n")
    assert p.provider.breaker.state is BreakerState.OPEN  # one rejection, not three
    assert all(has_fired(d) for d in ds)


def test_after_a_failed_setup_the_pool_tries_one_connection_at_a_time() -> None:
    p = Pool(connections=4)
    d = p.provider.deliver(msg(1))
    p.refuse()
    result_of(d)
    ds = [p.provider.deliver(msg(n)) for n in range(2, 6)]
    attempts = p.attempts
    assert attempts == 2  # one new attempt for four waiting messages
    up = p.open()
    # A session came up: the pool may open the rest again.
    assert p.attempts > attempts
    sent(up)
    finish(up)
    assert result_of(ds[0])[0].kind is Kind.DELIVERED


def test_batches_left_unsent_after_a_lost_connection_are_not_uncertain() -> None:
    p = Pool(connections=1, batch_size=2, batch_delay=0)
    d = p.provider.deliver(OutboundMessage("Q1", "s@example.test", rcpts(4), b"x\r\n"))
    up = p.open()
    up.take()
    up.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    up.take()
    up.lose()  # after the final dot of the first batch
    results = result_of(d)
    assert [r.uncertain for r in results] == [True, True, False, False]
    assert [r.code for r in results[2:]] == [None, None]


def test_each_batch_but_the_last_is_reported_before_the_next_starts() -> None:
    p = Pool(connections=1, batch_size=2, batch_delay=0)
    reported: list[list[str]] = []

    async def progress(part: list) -> None:  # type: ignore[type-arg]
        reported.append([r.recipient for r in part])

    d = p.provider.deliver(OutboundMessage("Q1", "s@example.test", rcpts(5), b"x\r\n"), progress)
    up = p.open()
    answer_transaction(up, 2)
    assert reported == [list(rcpts(2))]
    answer_transaction(up, 2)
    answer_transaction(up, 1)
    assert reported == [list(rcpts(2)), list(rcpts(4)[2:])]
    assert len(result_of(d)) == 5


def test_a_password_that_is_not_utf8_is_an_auth_failure_naming_no_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MR_POOL_PW", "ab\udcffcd")
    p = Pool(connections=1, username="user", password_env="MR_POOL_PW")
    [r] = result_of(p.provider.deliver(msg(1)))
    assert p.attempts == 0
    assert r.failure is FailureClass.AUTH
    assert "password_env MR_POOL_PW is not valid UTF-8" in r.reply
    assert "udcff" not in r.reply and "\\x" not in r.reply
