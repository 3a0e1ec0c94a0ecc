"""KeyedRateLimiter and MailRateLimits: GCRA per key, one float per key, keys that expire."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.outbound import limits
from mailrelay.ratelimit import Gcra, KeyedRateLimiter, MailRateLimits


def test_gcra_lives_in_ratelimit_and_outbound_uses_the_same_class() -> None:
    assert limits.Gcra is Gcra


def test_a_key_gets_its_burst_then_one_unit_per_interval() -> None:
    limiter = KeyedRateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after("a", 0.0) == pytest.approx(0.5)
    assert not limiter.allow("a", 0.49)
    assert limiter.allow("a", 0.5)
    assert not limiter.allow("a", 0.5)
    # Quiet for long enough and the whole burst is back, never more.
    assert [limiter.allow("a", 10.0) for _ in range(4)] == [True, True, True, False]


def test_keys_are_independent() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)


def test_a_refused_request_takes_nothing() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1)
    assert limiter.allow("a", 0.0)
    for _ in range(100):
        assert not limiter.allow("a", 0.5)
    assert limiter.allow("a", 1.0)


def test_conforms_answers_without_taking() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1)
    assert limiter.conforms("a", 0.0) and limiter.conforms("a", 0.0)
    assert limiter.allow("a", 0.0)
    assert not limiter.conforms("a", 0.5)
    assert limiter.conforms("a", 1.0)


def test_rate_zero_is_unlimited_and_stores_nothing() -> None:
    limiter = KeyedRateLimiter(rate=0.0, burst=1)
    assert all(limiter.allow(str(i % 3), 0.0) for i in range(10_000))
    assert limiter.conforms("a", 0.0) and limiter.retry_after("a", 0.0) == 0.0
    assert len(limiter) == 0


def test_exact_spacing_conforms_at_unix_time_magnitudes() -> None:
    """At 1.7e9 s an ulp is 2.4e-7 s: a unit exactly one interval later must not be refused
    for rounding."""
    limiter = KeyedRateLimiter(rate=10.0, burst=1)
    now = 1_700_000_000.0
    for _ in range(1000):
        assert limiter.allow("a", now)
        assert not limiter.allow("a", now)
        now += 0.1


def test_a_key_whose_tat_has_passed_is_dropped() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=5)
    for i in range(10):
        assert limiter.allow(f"k{i}", 0.0)
    assert len(limiter) == 10
    # One unit each is owed for 1 s; afterwards the keys carry no information.
    limiter.allow("late", 1.0)
    limiter.allow("late", 1.0)
    limiter.allow("late", 1.0)
    assert len(limiter) == 1  # the lazy sweep has caught up (4 per call)
    limiter.sweep(100.0)
    assert len(limiter) == 0


def test_a_key_used_again_moves_behind_the_others() -> None:
    """The front is the key used longest ago: a busy key is never swept while it owes."""
    limiter = KeyedRateLimiter(rate=1.0, burst=10)
    for _ in range(5):
        limiter.allow("busy", 0.0)  # owes until t=5
    limiter.allow("other", 0.5)  # owes until t=1.5
    limiter.allow("busy", 1.0)  # owes until t=6
    limiter.sweep(2.0)
    assert len(limiter) == 1
    assert limiter.retry_after("busy", 2.0) == 0.0  # 4 of its 10 units still owed
    assert [limiter.allow("busy", 2.0) for _ in range(7)] == [True] * 6 + [False]


def test_memory_stays_bounded_over_a_million_distinct_keys() -> None:
    """1000 new keys a second, each owing 1/rate = 1 s (at most burst/rate = 5 s): the
    limiter holds about the keys of the last second, however many it has seen."""
    limiter = KeyedRateLimiter(rate=1.0, burst=5, max_keys=100_000)
    allow = limiter.allow
    now = 0.0
    most = 0
    for i in range(1_000_000):
        now += 0.001
        assert allow(str(i), now)
        if i % 1000 == 0:
            most = max(most, len(limiter))
    assert most <= 1_005
    assert limiter.evictions == 0
    limiter.sweep(now + 1.0)
    assert len(limiter) == 0


def test_memory_stays_bounded_when_every_key_takes_its_whole_burst() -> None:
    limiter = KeyedRateLimiter(rate=10.0, burst=5)
    now = 0.0
    most = 0
    for i in range(50_000):
        now += 0.01
        for _ in range(6):
            limiter.allow(f"k{i}", now)  # 5 taken, 1 refused: owes 0.5 s
        most = max(most, len(limiter))
    assert most <= 0.5 / 0.01 + 5


def test_a_full_limiter_forgets_the_key_used_longest_ago() -> None:
    evicted: list[int] = []
    limiter = KeyedRateLimiter(rate=1.0, burst=1, max_keys=3, on_evict=lambda: evicted.append(1))
    for key in "abc":
        assert limiter.allow(key, 0.0)
    assert limiter.allow("d", 0.1)  # "a" goes
    assert len(limiter) == 3 and limiter.evictions == 1 and evicted == [1]
    assert limiter.allow("a", 0.2)  # forgotten: a fresh burst (fail-open for the oldest)
    assert not limiter.allow("d", 0.2)  # the recent keys are still limited
    assert not limiter.allow("c", 0.2)


def test_a_full_limiter_drops_expired_keys_before_evicting() -> None:
    limiter = KeyedRateLimiter(rate=1.0, burst=1, max_keys=2)
    limiter.allow("a", 0.0)
    limiter.allow("b", 0.5)
    assert limiter.allow("c", 1.2)  # "a" expired at 1.0: no eviction needed
    assert limiter.evictions == 0
    assert not limiter.allow("b", 1.2)


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"),
    [(-1.0, 1, 10), (math.nan, 1, 10), (math.inf, 1, 10), (1.0, 0, 10), (1.0, 1, 0)],
)
def test_bad_parameters_are_refused(rate: float, burst: float, max_keys: int) -> None:
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate, burst, max_keys)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    burst=st.integers(min_value=1, max_value=5),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=2.0), st.sampled_from("abc")),
        max_size=200,
    ),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, str]]
) -> None:
    """Per key, in every window [t0, t1]: allowed <= burst + rate * (t1 - t0). And the sweep
    never changes an answer: a limiter that keeps every key answers the same."""
    limiter = KeyedRateLimiter(rate, burst)
    now = 0.0
    allowed: dict[str, list[float]] = {}
    for gap, key in steps:
        now += gap
        reference = _reference_conforms(allowed.get(key, []), now, rate, burst)
        result = limiter.allow(key, now)
        assert result == reference
        if result:
            allowed.setdefault(key, []).append(now)
    for times in allowed.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + rate * (times[j] - start) + 1e-6


def _reference_conforms(times: list[float], now: float, rate: float, burst: int) -> bool:
    """GCRA replayed from every unit ever allowed (no expiry, no eviction)."""
    tat = -math.inf
    for t in times:
        tat = max(tat, t) + 1 / rate
    return max(tat, now) + 1 / rate - now <= burst / rate + 1e-9


# -- MailRateLimits --------------------------------------------------------------------------


def _mail_limits(client: float = 0.0, sender: float = 0.0) -> MailRateLimits:
    return MailRateLimits(KeyedRateLimiter(client, 1), KeyedRateLimiter(sender, 1))


def test_sender_key_is_lower_cased_and_the_null_sender_is_its_own_key() -> None:
    limits = _mail_limits(sender=1.0)
    assert limits.check("127.0.0.1", "Alice@Example.COM", 0.0) is None
    assert limits.check("127.0.0.1", "alice@example.com", 0.0) == "rate_sender"
    assert limits.check("127.0.0.1", "", 0.0) is None
    assert limits.check("127.0.0.1", "", 0.0) == "rate_sender"
    assert MailRateLimits.sender_key("") == "<>"


def test_a_mail_refused_for_its_sender_takes_nothing_from_its_client() -> None:
    limits = _mail_limits(client=1.0, sender=1.0)
    assert limits.check("10.0.0.1", "a@x", 0.0) is None
    # Back to the client's pace, but a@x still owes: refused for the sender only.
    assert limits.check("10.0.0.2", "a@x", 0.0) == "rate_sender"
    assert limits.check("10.0.0.2", "b@x", 0.0) is None
    assert limits.check("10.0.0.1", "c@x", 0.0) == "rate_client"
