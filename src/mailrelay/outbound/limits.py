"""Shaping per provider: rates, a daily quota, and backing off when the provider throttles us.

Everything here is arithmetic on the times the caller passes in: O(1) memory per provider, no
timers of its own. The pool asks ``ProviderLimits.delay`` and schedules ONE wake-up for the
answer, however many messages are waiting.
"""

from __future__ import annotations

import math
import re

from mailrelay.ratelimit import Gcra

# A wait shorter than this is float noise (the pool's wake-up landed one ulp before the
# theoretical time): treat it as "now", or the pool would schedule zero-length wake-ups forever.
_EPSILON = 1e-9

_DAY = 86400.0  # Unix time has no leap seconds: every UTC day is exactly this long


def _positive(wait: float) -> float:
    return wait if wait > _EPSILON else 0.0


class DailyQuota:
    """Transactions per UTC calendar day; limit 0 = none."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must not be negative")
        self._limit = limit
        self._day = -1  # days since the epoch, UTC, of self._used
        self._used = 0

    @property
    def limit(self) -> int:
        return self._limit

    def used(self, now: float) -> int:
        """Transactions started today (UTC); counted even without a limit, for metrics."""
        return self._used if _utc_day(now) == self._day else 0

    def exhausted(self, now: float) -> bool:
        return self._limit > 0 and self.used(now) >= self._limit

    def take(self, now: float) -> None:
        day = _utc_day(now)
        if day != self._day:
            self._day, self._used = day, 0
        self._used += 1

    def resets_at(self, now: float) -> float:
        """The next UTC midnight after ``now``."""
        return (_utc_day(now) + 1) * _DAY


def _utc_day(now: float) -> int:
    return math.floor(now / _DAY)


class Throttle:
    """Backs off when the provider says it is throttling us (AIMD), recovers gradually.

    Multiplicative decrease: each throttle reply halves ``factor`` (the share of the configured
    rates and connections we use), down to 1/32. And after a throttle reply no new transaction
    starts for a pause: 1 s, doubling with each further reply before we have fully recovered,
    up to MAX_PAUSE; back to 1 s once the factor is back to 1. Additive increase: the factor
    recovers by 1.0 per RECOVERY_SECONDS, up to 1.0, counted from the end of the pause: we
    learn nothing while sending nothing, and counted from the reply itself a 60 s pause would
    end fully recovered, so persistent throttling would cycle back to a 1 s pause at full rate.

    A reply that arrives during the pause answers a transaction started before we reacted (none
    start during the pause): the same congestion, already acted on, so it is ignored. Otherwise
    four connections throttled at once would cut the rate to 1/16 and pause for 8 s.
    """

    RECOVERY_SECONDS = 60.0
    MIN_FACTOR = 1 / 32
    FIRST_PAUSE = 1.0
    MAX_PAUSE = 60.0

    def __init__(self) -> None:
        self._level = 1.0  # the factor from the last throttle reply to the end of its pause
        self._pause = 0.0  # length of the last pause
        self._pause_until = -math.inf

    @property
    def pause_until(self) -> float:
        """No new transaction before this time (-inf: never paused)."""
        return self._pause_until

    def factor(self, now: float) -> float:
        """In (0, 1]: the share of the configured rates and connections to use now."""
        recovered = max(0.0, now - self._pause_until) / self.RECOVERY_SECONDS
        return min(1.0, self._level + recovered)

    def on_throttle(self, now: float) -> None:
        if now < self._pause_until:
            return  # see the class docstring: the same congestion, already acted on
        factor = self.factor(now)
        if factor >= 1.0:
            self._pause = self.FIRST_PAUSE
        else:
            self._pause = min(max(self._pause * 2, self.FIRST_PAUSE), self.MAX_PAUSE)
        self._level = max(self.MIN_FACTOR, factor / 2)
        self._pause_until = now + self._pause

    def wait(self, now: float) -> float:
        """The remaining pause; 0.0 if none."""
        return _positive(self._pause_until - now)


# "454 4.7.0 TLS not available due to temporary reason" (RFC 3207) and "454 4.7.0 Temporary
# authentication failure" (RFC 4954) share SES's throttling code but are not about our rate.
_NOT_THROTTLING_454 = re.compile(r"\btls\b|starttls|authenticat", re.IGNORECASE)
# "too many" but not "452 4.5.3 Too many recipients": that is a limit per transaction, which
# batching handles; slowing down would not help.
_THROTTLING_WORDS = re.compile(
    r"throttl|rate[ -]?limit|too many(?! recipients)|sending rate", re.IGNORECASE
)
_LEADING_CODE = re.compile(r"^\s*([2-5]\d\d)(?:[ -]|$)")
_ENHANCED_CODE = re.compile(r"(?<![\d.])([245])\.\d{1,3}\.\d{1,3}(?![\d.])")


def is_throttling_reply(code: int | None, text: str) -> bool:
    """Whether a reply says the provider is limiting our rate (so we should slow down).

    454 (SES: "454 Throttling failure: Maximum sending rate exceeded") and 421 (too many
    connections, try later, closing) always; any other 4xx whose text says throttling, rate
    limit or too many. Never a 5xx: a permanent refusal is not a request to slow down. Without
    a code, the text decides, and only if it looks like a 4xx (a leading 4xx code, or else an
    enhanced status code 4.x.x).
    """
    if code is None:
        leading = _LEADING_CODE.match(text)
        if leading:
            code = int(leading.group(1))
        else:
            enhanced = _ENHANCED_CODE.search(text)
            if enhanced is None or enhanced.group(1) != "4":
                return False
            return _THROTTLING_WORDS.search(text) is not None
    if not 400 <= code < 500:
        return False
    if code == 421:
        return True
    if code == 454:
        return _NOT_THROTTLING_454.search(text) is None
    return _THROTTLING_WORDS.search(text) is not None


class ProviderLimits:
    """Everything that decides whether the provider may start one more transaction now.

    Both rates use a burst of 1: strict spacing, so "50 messages/s" means at most 50 (+1 at the
    window's edge) in every second, not 50 on average with a burst of 50 at once. Providers
    (SES's "maximum send rate") count per second, and a burst after an idle minute is exactly
    what gets us throttled. A wake-up that comes a little late is counted from its slot
    (Gcra.take), so timer lateness does not slow the pace down.
    """

    def __init__(
        self, rate: float, recipient_rate: float, daily_quota: int, connections: int
    ) -> None:
        self._rate = rate
        self._recipient_rate = recipient_rate
        self._connections = connections
        self.messages = Gcra(rate, burst=1.0)
        self.recipients = Gcra(recipient_rate, burst=1.0)
        self.quota = DailyQuota(daily_quota)
        self.throttle = Throttle()

    def delay(self, now: float, recipients: int) -> float:
        """0.0: a transaction for ``recipients`` recipients may start now; otherwise the
        seconds until it may (the daily quota aside: see quota_exhausted)."""
        self._apply_throttle(now)
        return max(
            self.messages.wait(now),
            self.recipients.wait(now, recipients),
            self.throttle.wait(now),
        )

    def quota_exhausted(self, now: float) -> bool:
        return self.quota.exhausted(now)

    def take(self, now: float, recipients: int) -> None:
        """A transaction for ``recipients`` recipients is being started now."""
        self._apply_throttle(now)
        self.messages.take(now)
        self.recipients.take(now, recipients)
        self.quota.take(now)

    def throttled(self, now: float) -> None:
        """A throttling reply arrived (see is_throttling_reply)."""
        self.throttle.on_throttle(now)
        self._apply_throttle(now)

    def connection_limit(self, now: float) -> int:
        """Parallel connections to use now: fewer while throttled, so that a provider with no
        configured rate that throttles us still sees us slow down."""
        return max(1, math.floor(self._connections * self.throttle.factor(now)))

    def _apply_throttle(self, now: float) -> None:
        # Lazily, whenever asked: the factor recovers continuously, and an unlimited rate
        # (0) stays unlimited whatever the factor.
        factor = self.throttle.factor(now)
        self.messages.set_rate(self._rate * factor, now)
        self.recipients.set_rate(self._recipient_rate * factor, now)
