"""A circuit breaker per provider: stop sending to a provider that keeps failing, probe it later.

CLOSED: traffic flows; consecutive session failures are counted. At ``threshold`` in a row the
breaker OPENs for ``cooldown`` seconds: no traffic. Then it turns HALF_OPEN and asks its owner
(``on_probe``) for exactly one probe connection. The probe's session coming up CLOSEs it again;
the probe failing re-OPENs it with the cooldown doubled, up to ``max_cooldown``.

One IDelayedCall per breaker, never one per message: a thousand queued messages behind an open
breaker cost nothing until the probe succeeds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailrelay.logger import Logger


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


# What the breaker owes its owner, delivered in order and one at a time (see _notify).
_Change = tuple[BreakerState, BreakerState]
_Probe = int  # the half-open period the probe was asked for


class CircuitBreaker:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int,
        cooldown: float,
        max_cooldown: float,
        on_probe: Callable[[], object],
        on_change: Callable[[BreakerState, BreakerState], object] | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if cooldown <= 0:
            raise ValueError("cooldown must be positive")
        if max_cooldown < cooldown:
            raise ValueError("max_cooldown must not be less than cooldown")
        self._clock = clock
        self._threshold = threshold
        self._base_cooldown = cooldown
        self._max_cooldown = max_cooldown
        self._on_probe = on_probe
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = cooldown  # the next OPEN period; doubles on each failed probe
        self._open_until: float | None = None
        self._timer: IDelayedCall | None = None
        self._stopped = False
        # Callbacks may call back into the breaker (a probe that fails at once because its
        # password is missing). The state is always updated before any callback runs, and the
        # callbacks are queued and run one at a time, never nested: the owner sees transitions
        # in the order they happened, so a metric set in on_change ends on the current state.
        self._pending: deque[_Change | _Probe] = deque()
        self._notifying = False
        self._half_open_epoch = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def open_until(self) -> float | None:
        """When OPEN: the time the half-open probe is due; otherwise None."""
        return self._open_until

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def cooldown(self) -> float:
        """The length of the next (or current) OPEN period."""
        return self._cooldown

    def allows_traffic(self) -> bool:
        return self._state is BreakerState.CLOSED

    def record_success(self) -> None:
        """A transaction completed, or the probe's session came up.

        Closes the breaker from any state: a late success while OPEN (a connection set up
        before it opened delivered a message) is proof that the provider takes mail."""
        self._failures = 0
        self._cooldown = self._base_cooldown
        self._cancel_timer()
        self._open_until = None
        self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """A failure the provider is to blame for (a session that could not be set up)."""
        if self._state is BreakerState.OPEN:
            # Connections begun before the breaker opened may still fail afterwards; they say
            # nothing new about the provider and must not extend the cooldown.
            return
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self._max_cooldown)
            self._open()
        elif self._failures >= self._threshold:
            self._open()

    def trip(self) -> None:
        """A failure that retrying cannot mend (credentials rejected): open now, whatever the
        count, so the provider is not asked again before the cooldown (a login lockout)."""
        if self._state is BreakerState.CLOSED:
            self._failures = max(self._failures + 1, self._threshold)
            self._open()
        else:
            self.record_failure()

    def stop(self) -> None:
        """Shutdown: cancel the timer, and schedule no new one."""
        self._stopped = True
        self._cancel_timer()

    def _open(self) -> None:
        self._cancel_timer()
        self._open_until = self._clock.seconds() + self._cooldown
        if not self._stopped:
            self._timer = self._clock.callLater(self._cooldown, self._half_open)
        self._transition(BreakerState.OPEN)

    def _half_open(self) -> None:
        self._timer = None
        self._open_until = None
        self._half_open_epoch += 1
        self._transition(BreakerState.HALF_OPEN, probe=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _transition(self, new: BreakerState, probe: bool = False) -> None:
        old, self._state = self._state, new
        if old is not new:
            self._pending.append((old, new))
        if probe:
            self._pending.append(self._half_open_epoch)
        self._notify()

    def _notify(self) -> None:
        if self._notifying:
            return  # the outer call delivers it once the current callback has returned
        self._notifying = True
        try:
            while self._pending:
                item = self._pending.popleft()
                try:
                    if isinstance(item, tuple):
                        if self._on_change is not None:
                            self._on_change(*item)
                    elif self._state is BreakerState.HALF_OPEN and item == self._half_open_epoch:
                        # Still the half-open period this probe was for: an on_change that
                        # already failed it (re-opened the breaker) gets no stale probe.
                        self._on_probe()
                except Exception:
                    # A bug in the owner's callback must not wedge the breaker's own state.
                    self.log.failure("circuit breaker: callback failed")
        finally:
            self._notifying = False
