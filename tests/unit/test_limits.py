"""Shaping per provider: GCRA rates, the daily quota, throttle back-off. No real time: plain
numbers, and task.Clock for a simulated dispatcher."""

from __future__ import annotations

import bisect
from calendar import timegm

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from mailrelay.outbound.limits import (
    DailyQuota,
    Gcra,
    ProviderLimits,
    Throttle,
    is_throttling_reply,
)


class Dispatcher:
    """What the pool does: start transactions as fast as the limits allow, and when they
    don't, schedule ONE wake-up for the delay they return."""

    def __init__(self, clock: Clock, limits: ProviderLimits, recipients: int = 1) -> None:
        self.clock = clock
        self.limits = limits
        self.recipients = recipients
        self.started: list[float] = []
        self.backlog = 0
        self.wakeups = 0
        self._timer: IDelayedCall | None = None

    def submit(self, count: int) -> None:
        self.backlog += count
        self.pump()

    def pump(self) -> None:
        while self.backlog:
            now = self.clock.seconds()
            if self.limits.quota_exhausted(now):
                return
            delay = self.limits.delay(now, self.recipients)
            if delay > 0:
                if self._timer is None:
                    self._timer = self.clock.callLater(delay, self._wake)
                return
            self.limits.take(now, self.recipients)
            self.started.append(now)
            self.backlog -= 1

    def _wake(self) -> None:
        self._timer = None
        self.wakeups += 1
        self.pump()

    def run_until(self, end: float) -> None:
        """Jump from one wake-up to the next, as a reactor would."""
        while True:
            calls = self.clock.getDelayedCalls()
            assert len(calls) <= 1  # one wake-up at a time, however long the backlog
            if not calls or calls[0].getTime() > end:
                break
            self.clock.advance(calls[0].getTime() - self.clock.seconds())
        self.clock.advance(max(0.0, end - self.clock.seconds()))


def fifty_per_second(clock: Clock | None = None) -> Dispatcher:
    """A dispatcher for a provider limited to 50 messages/s, and nothing else."""
    limits = ProviderLimits(rate=50, recipient_rate=0, daily_quota=0, connections=4)
    return Dispatcher(Clock() if clock is None else clock, limits)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any closed interval of ``window`` seconds."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_right(ordered, t + window) - i for i, t in enumerate(ordered)), default=0
    )


def min_in_window(times: list[float], start: float, end: float, window: float = 1.0) -> int:
    """The fewest events in any half-open window [t, t + window) inside [start, end]."""
    ordered = sorted(times)
    starts = [t for t in ordered if start <= t <= end - window] + [start]
    return min(
        bisect.bisect_left(ordered, t + window) - bisect.bisect_left(ordered, t) for t in starts
    )


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return float(timegm((year, month, day, hour, minute, 0)))


# -- Gcra ------------------------------------------------------------------------------------


def test_dispatcher_at_50_per_second_sends_50_in_every_second() -> None:
    clock = Clock()
    clock.advance(1000.123)  # not a round start time
    d = fifty_per_second(clock)
    d.submit(10_000)
    start = clock.seconds()
    d.run_until(start + 10)
    in_run = [t - start for t in d.started if t < start + 10]
    assert 499 <= len(in_run) <= 501
    assert max_in_window(in_run) <= 51  # closed window: both edges may hold a message
    assert min_in_window(in_run, 0, 10) >= 49
    # One wake-up per message at most, and never more than one pending (run_until checks).
    assert d.wakeups <= len(d.started)
    assert d.backlog > 9000


def test_dispatcher_idle_then_burst_does_not_burst() -> None:
    """A burst of 1: after an idle minute, 50/s still means 50 in the first second."""
    d = fifty_per_second()
    d.submit(1)
    d.clock.advance(60)
    d.submit(200)
    d.run_until(d.clock.seconds() + 0.999)
    assert len([t for t in d.started if t >= 60]) == 50


def test_recipient_rate_with_batches_bigger_than_the_rate() -> None:
    """20 recipients per transaction at 5 recipients/s: a transaction every 4 s."""
    clock = Clock()
    limits = ProviderLimits(rate=0, recipient_rate=5, daily_quota=0, connections=4)
    d = Dispatcher(clock, limits, recipients=20)
    d.submit(100)
    d.run_until(60)
    assert d.started == pytest.approx([4.0 * n for n in range(16)])  # 0, 4, ... 60
    assert d.wakeups == 15


def test_cost_larger_than_burst_conforms_when_idle_and_pushes_later_waits() -> None:
    g = Gcra(5)
    assert g.wait(0, 20) == 0.0
    g.take(0, 20)
    assert g.wait(0, 1) == pytest.approx(4.0)
    assert g.wait(3.5, 20) == pytest.approx(0.5)
    assert g.wait(4.0, 20) == 0.0


def test_wait_does_not_consume() -> None:
    g = Gcra(10)
    for _ in range(5):
        assert g.wait(0) == 0.0
    g.take(0)
    assert g.wait(0) == pytest.approx(0.1)
    assert g.wait(0.05) == pytest.approx(0.05)
    assert g.wait(0.1) == 0.0


def test_burst() -> None:
    g = Gcra(10, burst=3)
    for _ in range(3):
        assert g.wait(0) == 0.0
        g.take(0)
    assert g.wait(0) == pytest.approx(0.1)
    assert g.wait(0, 2) == pytest.approx(0.2)


def test_float_noise_is_no_wait() -> None:
    """A wake-up landing one ulp before the theoretical time must not schedule another."""
    g = Gcra(3)
    g.take(0.1)
    tat = 0.1 + 1 / 3
    assert g.wait(tat - 1e-15) == 0.0


def test_set_rate_keeps_the_units_owed() -> None:
    g = Gcra(10)
    g.take(0, 5)  # 5 units owed: 0.5 s at 10/s
    assert g.wait(0) == pytest.approx(0.5)
    g.set_rate(5, now=0)
    assert g.wait(0) == pytest.approx(1.0)  # the same 5 units at 5/s
    g.set_rate(10, now=0)
    assert g.wait(0) == pytest.approx(0.5)  # and back
    g.set_rate(5, now=0.25)  # 2.5 units still owed at 0.25
    assert g.wait(0.25) == pytest.approx(0.5)
    assert g.rate == 5


def test_set_rate_after_the_debt_is_paid_owes_nothing() -> None:
    g = Gcra(10)
    g.take(0, 5)
    g.set_rate(1, now=10)
    assert g.wait(10) == 0.0
    g.take(10)
    assert g.wait(10) == pytest.approx(1.0)


def test_set_rate_to_and_from_unlimited() -> None:
    g = Gcra(10)
    g.take(0, 100)
    g.set_rate(0, now=0)
    assert g.wait(0, 1000) == 0.0
    g.take(0, 1000)
    g.set_rate(10, now=0)  # the unlimited period left no debt
    assert g.wait(0) == 0.0


def test_unlimited_rates_never_wait() -> None:
    limits = ProviderLimits(rate=0, recipient_rate=0, daily_quota=0, connections=4)
    for n in range(1000):
        assert limits.delay(0, 50) == 0.0
        limits.take(0, 50)
        assert not limits.quota_exhausted(0)
        assert limits.quota.used(0) == n + 1
    g = Gcra(0)
    g.take(0, 1e9)
    assert g.wait(0, 1e9) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(-1, 1), (1, 0)])
def test_gcra_rejects_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        Gcra(rate, burst)


@given(
    rate=st.sampled_from([0.5, 1, 3, 7, 10, 50, 123.4]),
    burst=st.sampled_from([1.0, 2.0, 5.0]),
    steps=st.lists(
        st.one_of(
            st.floats(min_value=0, max_value=0.3, allow_nan=False),  # advance
            st.just("take"),  # take if it conforms
        ),
        max_size=500,
    ),
)
def test_property_no_window_exceeds_rate_plus_burst(
    rate: float, burst: float, steps: list[float | str]
) -> None:
    g = Gcra(rate, burst)
    now = 0.0
    taken: list[float] = []
    for step in steps:
        if step == "take":
            if g.wait(now) == 0.0:
                g.take(now)
                taken.append(now)
        else:
            assert isinstance(step, float)
            now += step
    assert max_in_window(taken) <= rate * 1 + burst


# -- DailyQuota ------------------------------------------------------------------------------


def test_quota_exhausted_then_resets_at_utc_midnight() -> None:
    q = DailyQuota(3)
    evening = utc(2024, 3, 9, 23, 58)
    midnight = utc(2024, 3, 10)
    for n in range(3):
        assert not q.exhausted(evening)
        q.take(evening + n)
    assert q.exhausted(evening + 60)
    assert q.used(evening + 60) == 3
    assert q.resets_at(evening) == midnight
    assert q.exhausted(midnight - 0.001)
    assert not q.exhausted(midnight)
    assert q.used(midnight) == 0
    q.take(midnight)
    assert q.used(midnight + 1) == 1
    assert q.resets_at(midnight) == utc(2024, 3, 11)


def test_no_quota() -> None:
    q = DailyQuota(0)
    for _ in range(100):
        q.take(0)
    assert not q.exhausted(0)
    assert q.used(0) == 100


def test_provider_quota() -> None:
    limits = ProviderLimits(rate=0, recipient_rate=0, daily_quota=2, connections=1)
    limits.take(10, 1)
    limits.take(11, 1)
    assert limits.quota_exhausted(12)
    assert limits.delay(12, 1) == 0.0  # the quota is asked separately
    assert not limits.quota_exhausted(86400)


# -- Throttle --------------------------------------------------------------------------------


def test_throttle_halves_pauses_and_recovers_linearly() -> None:
    t = Throttle()
    assert t.factor(0) == 1.0
    assert t.wait(0) == 0.0
    t.on_throttle(100)
    assert t.factor(100) == 0.5
    assert t.wait(100) == 1.0
    assert t.wait(100.5) == 0.5
    assert t.wait(101) == 0.0
    assert t.factor(101) == 0.5  # no recovery during the pause
    assert t.factor(116) == pytest.approx(0.75)  # then +1.0 per 60 s
    assert t.factor(130) == pytest.approx(0.9833, abs=1e-4)
    assert t.factor(131) == 1.0
    assert t.factor(1000) == 1.0


def test_throttle_replies_during_the_pause_are_the_same_congestion() -> None:
    t = Throttle()
    t.on_throttle(100)
    t.on_throttle(100)  # four connections throttled at once
    t.on_throttle(100.5)
    assert t.factor(100.5) == 0.5
    assert t.pause_until == 101


def test_further_throttles_before_recovery_halve_again_and_double_the_pause() -> None:
    t = Throttle()
    now = 0.0
    pauses: list[float] = []
    for _ in range(10):
        t.on_throttle(now)
        pauses.append(t.wait(now))
        now = t.pause_until  # the next reply as soon as we start sending again
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert t.factor(now) == 1 / 32  # floored


def test_the_pause_resets_once_fully_recovered() -> None:
    t = Throttle()
    t.on_throttle(0)
    t.on_throttle(1)  # factor 0.25, pause 2 (until 3)
    assert t.wait(1) == 2.0
    assert t.factor(1) == 0.25
    t.on_throttle(47.9)  # not quite recovered (at 48): 4 s
    assert t.wait(47.9) == 4.0
    t = Throttle()
    t.on_throttle(0)
    t.on_throttle(31)  # factor back to 1 at 31: a fresh start
    assert t.wait(31) == 1.0
    assert t.factor(31) == 0.5


def test_provider_limits_under_throttle() -> None:
    limits = ProviderLimits(rate=10, recipient_rate=0, daily_quota=0, connections=8)
    assert limits.connection_limit(0) == 8
    limits.throttled(0)
    assert limits.delay(0, 1) == 1.0  # the pause
    assert limits.connection_limit(0) == 4
    limits.take(1, 1)
    assert limits.delay(1, 1) == pytest.approx(0.2, rel=0.05)  # ~5/s now
    assert limits.delay(1.2, 1) == 0.0  # (the factor recovered a little meanwhile)
    assert limits.connection_limit(16) == 6  # 8 * (0.5 + 15/60)
    assert limits.connection_limit(31) == 8
    limits.take(31, 1)
    assert limits.delay(31, 1) == pytest.approx(0.1)  # back to 10/s


def test_unlimited_provider_throttled_gets_fewer_connections_but_stays_unlimited() -> None:
    limits = ProviderLimits(rate=0, recipient_rate=0, daily_quota=0, connections=4)
    now = 0.0
    for _ in range(5):
        limits.throttled(now)
        now = limits.throttle.pause_until
    assert limits.connection_limit(now) == 1  # never 0
    limits.take(now, 1)
    assert limits.delay(now, 100) == 0.0


def test_dispatcher_slows_down_after_a_throttle_reply() -> None:
    d = fifty_per_second()
    d.submit(100_000)
    d.run_until(10)
    d.limits.throttled(d.clock.seconds())
    before = len(d.started)
    d.run_until(10.999)
    assert len(d.started) == before  # paused for 1 s
    d.run_until(12)
    assert 20 <= len(d.started) - before <= 30  # about half the rate
    d.run_until(50)
    later = [t for t in d.started if t >= 49]
    assert 49 <= len(later) <= 51  # recovered


# -- is_throttling_reply ---------------------------------------------------------------------

THROTTLING = [
    (454, "454 Throttling failure: Maximum sending rate exceeded."),
    (454, "454 Throttling failure: Daily message quota exceeded."),
    (
        421,
        "421 4.7.0 Temporary server error. Please try again later. PRX4"
        " [AM0PR0102MB3185.eurprd01.prod.exchangelabs.com] throttled",
    ),
    (
        421,
        "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating"
        " from your IP address. To protect our users from spam, mail sent from your IP"
        " address has been temporarily rate limited.",
    ),
    (421, "421 4.3.2 Too many concurrent SMTP connections; please try again later."),
    (421, "421 Service not available, closing transmission channel"),
    (451, "451 4.7.1 rate limit exceeded, try again later"),
    (450, "450 4.7.1 Client host rejected: too many connections"),
    (452, "452 4.7.0 Throttled: sending too fast"),
    (451, "451 4.7.1 Ratelimit reached"),
]

NOT_THROTTLING = [
    (450, "450 mailbox busy"),
    (450, "450 4.2.1 The user you are trying to contact is receiving mail at a rate that"),
    (550, "550 5.7.1 Throttling: you are rate limited forever"),
    (554, "554 too many complaints"),
    (550, "550 5.1.1 User unknown"),
    (452, "452 4.5.3 Too many recipients"),
    (451, "451 4.3.0 Temporary lookup failure"),
    (454, "454 4.7.0 TLS not available due to temporary reason"),
    (454, "454 4.7.0 Temporary authentication failure"),
    (250, "250 2.0.0 Ok: queued as ABC, not throttled"),
]


@pytest.mark.parametrize(("code", "text"), THROTTLING)
def test_throttling_replies(code: int, text: str) -> None:
    assert is_throttling_reply(code, text)
    assert is_throttling_reply(None, text)  # the text alone says the same


@pytest.mark.parametrize(("code", "text"), NOT_THROTTLING)
def test_not_throttling_replies(code: int, text: str) -> None:
    assert not is_throttling_reply(code, text)
    assert not is_throttling_reply(None, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4.7.0 throttled, slow down", True),  # only an enhanced code: 4xx-looking
        ("5.7.0 throttled", False),
        ("connection lost: throttled?", False),  # no code at all: not a reply
        ("", False),
        ("  421-4.7.0 try later\r\n421 4.7.0 try later", True),
        ("4210 throttled", False),
    ],
)
def test_throttling_text_without_a_code(text: str, expected: bool) -> None:
    assert is_throttling_reply(None, text) is expected


def test_the_code_decides_over_the_text() -> None:
    assert not is_throttling_reply(550, "421 throttled")
    assert is_throttling_reply(421, "")


def test_a_late_wake_up_is_counted_from_its_slot_so_the_pace_holds() -> None:
    gcra = Gcra(10.0)
    gcra.take(0.0)
    # The timer fired 5 ms after the 0.1 s slot: the next slot is still 0.2, not 0.205.
    gcra.take(0.105)
    assert gcra.wait(0.105) == pytest.approx(0.095)


def test_an_idle_spell_longer_than_one_unit_is_not_saved_up_as_a_burst() -> None:
    gcra = Gcra(10.0)
    gcra.take(0.0)
    gcra.take(5.0)  # long idle: counted from now
    assert gcra.wait(5.0) == pytest.approx(0.1)
