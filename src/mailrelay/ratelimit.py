"""Rate limiting by GCRA: one float of state per limited thing, no timers of its own.

``Gcra`` paces one stream (an upstream provider's sending rate). ``KeyedRateLimiter`` answers
"may this key go now?" for many keys (client addresses, envelope senders) in O(1) memory per key
and O(1) amortised time per call, forgetting keys as soon as their state says nothing any more.
Every method takes ``now`` from the caller, whose clock is injected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

# A wait shorter than this is float noise (the pool's wake-up landed one ulp before the
# theoretical time): treat it as "now", or the pool would schedule zero-length wake-ups forever.
_EPSILON = 1e-9


def _positive(wait: float) -> float:
    return wait if wait > _EPSILON else 0.0


def _slack(now: float) -> float:
    """Rounding allowance for times near ``now``: an ulp of Unix time today is 2.4e-7 s, so a
    take exactly one interval after the last must not be refused for a few ulps."""
    return _EPSILON + abs(now) * 1e-14


class Gcra:
    """Generic cell rate algorithm: `rate` units per second, bursts up to `burst` units.

    The whole state is one number, the theoretical arrival time (TAT): when the units taken so
    far would all have been paid for at ``rate``. ``cost`` units conform at ``now`` if taking
    them leaves TAT no further than ``burst`` units ahead of ``now``.
    """

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate < 0:
            raise ValueError("rate must not be negative")
        if burst <= 0:
            raise ValueError("burst must be positive")
        self._rate = rate  # 0: unlimited
        self._burst = burst
        self._tat = -math.inf

    @property
    def rate(self) -> float:
        return self._rate

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` units conform; 0.0 if they do now. Does not consume."""
        if self._rate == 0 or cost <= 0:
            return 0.0
        # A cost larger than the burst could never fit: it conforms once the bucket is empty
        # (TAT <= now), and take() then pushes TAT out by the whole cost.
        fits = min(cost, self._burst)
        return _positive(max(self._tat, now) + (fits - self._burst) / self._rate - now)

    def take(self, now: float, cost: float = 1.0) -> None:
        """Consume ``cost`` units at ``now``, whether they conform or not (the caller asked
        ``wait`` first); later waits are pushed out by the whole cost."""
        if self._rate == 0 or cost <= 0:
            return
        # A caller woken a little late (the reactor's timer fired after the slot) is counted
        # from its slot, not from the late moment: otherwise every wake-up's lateness is lost
        # and 200/s comes out as 170/s. Only lateness under one unit is made up, so an idle
        # spell never turns into a burst.
        late_within_one_unit = now - self._tat < 1.0 / self._rate
        start = self._tat if late_within_one_unit else now
        self._tat = max(start, self._tat) + cost / self._rate

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate at ``now``, keeping the units already owed: a debt of 3 units is
        0.3 s at 10/s and 0.6 s at 5/s. Going to or from unlimited forgives the debt."""
        if rate < 0:
            raise ValueError("rate must not be negative")
        if rate == self._rate:
            return
        if self._rate == 0 or rate == 0:
            self._tat = -math.inf
        else:
            owed = max(0.0, self._tat - now) * self._rate
            self._tat = now + owed / rate
        self._rate = rate


class KeyedRateLimiter:
    """GCRA per key: ``rate`` units per second and key, bursts of up to ``burst`` units.

    State is one float per key, its TAT, in an OrderedDict in order of last use (a key that takes
    a unit moves to the end). A key whose TAT is not in the future is owed nothing: it behaves
    exactly like a key never seen, so it is dropped. Each call pops expired keys off the front,
    a few at a time (amortised O(1)). A conforming take leaves TAT at most ``burst / rate``
    after the moment of the take, so once the front key (used longest ago) is still owed
    something, every key held took a unit within the last ``burst / rate`` seconds: memory is
    bounded by the keys active in that window, give or take the few the lazy sweep has not
    reached yet.

    At most ``max_keys`` are held. When a new key arrives and the table is full of live keys,
    the one used longest ago is evicted (it forgets what it owes and gets a fresh burst next
    time): the recent keys, the ones that matter, keep being limited, and memory stays bounded
    whatever the number of keys. ``on_evict`` is called for each eviction (the inbound factory
    counts them and logs the first). Refusing to track new keys instead (fail-open for them)
    would let every new key through unlimited until the table drains.

    ``rate == 0`` means unlimited: ``allow`` is always True and nothing is stored.
    """

    SWEEP_PER_CALL = 4  # expired keys popped per call: more than the at most one a call adds

    def __init__(
        self,
        rate: float,
        burst: float,
        max_keys: int = 100_000,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        if rate < 0 or math.isnan(rate) or math.isinf(rate):
            raise ValueError("rate must be a finite number, not negative")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._on_evict = on_evict
        self._interval = 1.0 / rate if rate else 0.0
        # How far ahead of now a conforming take may push TAT: burst units' worth of time.
        self._tolerance = burst * self._interval
        # An OrderedDict, not a dict: popping a plain dict from the front leaves dummy slots that
        # every later look at the front walks over (O(n) each); this one is a linked list.
        self._tat: OrderedDict[str, float] = OrderedDict()
        self.evictions = 0

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def __len__(self) -> int:
        """Keys held now (expired ones not yet swept included)."""
        return len(self._tat)

    def allow(self, key: str, now: float) -> bool:
        """Take one unit for ``key`` if it conforms at ``now``; False (nothing taken) if not."""
        if not self._rate:
            return True
        tats = self._tat
        self._sweep(now, self.SWEEP_PER_CALL)
        tat = self._held_tat(key, now)
        new_tat = (now if tat is None or tat < now else tat) + self._interval
        if new_tat - now > self._tolerance + _slack(now):
            return False
        if tat is not None:
            tats[key] = new_tat
            tats.move_to_end(key)  # the most recently used
            return True
        if len(tats) >= self._max_keys:
            self._evict_oldest(now)
        tats[key] = new_tat
        return True

    def conforms(self, key: str, now: float) -> bool:
        """Whether ``allow(key, now)`` would succeed; takes nothing."""
        if not self._rate:
            return True
        tat = self._held_tat(key, now)
        tat = now if tat is None else tat
        return max(tat, now) + self._interval - now <= self._tolerance + _slack(now)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until one unit for ``key`` conforms; 0.0 if it does now."""
        if not self._rate:
            return 0.0
        tat = self._held_tat(key, now)
        tat = now if tat is None else tat
        wait = max(tat, now) + self._interval - self._tolerance - now
        return wait if wait > _slack(now) else 0.0

    def _held_tat(self, key: str, now: float) -> float | None:
        """The key's TAT, never more than one burst ahead of ``now``: a conforming take
        leaves it at most that far ahead, so anything further comes from a wall clock that
        was stepped back (NTP), which must not lock a client out for the size of the step."""
        tat = self._tat.get(key)
        if tat is None:
            return None
        ceiling = now + self._tolerance
        if tat > ceiling:
            # Stored, so that the key then drains from here like any other.
            self._tat[key] = tat = ceiling
        return tat

    def sweep(self, now: float) -> None:
        """Drop every expired key at the front now (the lazy sweep, all at once)."""
        self._sweep(now, len(self._tat))

    def _sweep(self, now: float, budget: int) -> None:
        tats = self._tat
        while budget > 0 and tats:
            key, tat = tats.popitem(last=False)
            if tat > now:
                # The key used longest ago is still owed something: every key held was used
                # within the window (see the class docstring). A later key may have expired
                # before it; a later call drops that one.
                tats[key] = tat
                tats.move_to_end(key, last=False)
                return
            budget -= 1

    def _evict_oldest(self, now: float) -> None:
        self._sweep(now, len(self._tat))
        if len(self._tat) < self._max_keys:
            return
        self._tat.popitem(last=False)
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict()


class MailRateLimits:
    """The inbound MAIL limits, shared by every connection: per client address and per
    envelope sender. A MAIL goes only if both conform, and only then takes from both."""

    def __init__(self, per_client: KeyedRateLimiter, per_sender: KeyedRateLimiter) -> None:
        self.per_client = per_client
        self.per_sender = per_sender

    @staticmethod
    def sender_key(sender: str) -> str:
        """The lower-cased address; the null sender is its own key, ``<>``."""
        return sender.lower() if sender else "<>"

    def check(self, client: str, sender: str, now: float) -> str | None:
        """None if this MAIL may go (it is counted); else why not: ``rate_client`` or
        ``rate_sender`` (nothing is counted)."""
        sender = self.sender_key(sender)
        if not self.per_client.conforms(client, now):
            return "rate_client"
        if not self.per_sender.conforms(sender, now):
            return "rate_sender"
        self.per_client.allow(client, now)
        self.per_sender.allow(sender, now)
        return None
