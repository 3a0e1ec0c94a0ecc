"""The circuit breaker per provider, driven by task.Clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.task import Clock

from mailrelay.outbound.breaker import BreakerState, CircuitBreaker
from tests.unit.fakes import LogCapture

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Harness:
    def __init__(
        self, threshold: int = 3, cooldown: float = 30.0, max_cooldown: float = 100.0
    ) -> None:
        self.clock = Clock()
        self.probes = 0
        self.changes: list[tuple[BreakerState, BreakerState]] = []
        # What the owner does in its callbacks; tests set these for re-entrancy.
        self.probe_action: Callable[[], object] = lambda: None
        self.change_action: Callable[[BreakerState, BreakerState], object] = lambda o, n: None
        self.breaker = CircuitBreaker(
            self.clock, threshold, cooldown, max_cooldown, self._on_probe, self._on_change
        )

    def _on_probe(self) -> None:
        self.probes += 1
        self.assert_one_timer_at_most()
        self.probe_action()

    def _on_change(self, old: BreakerState, new: BreakerState) -> None:
        self.changes.append((old, new))
        self.change_action(old, new)

    def fail(self, times: int = 1) -> None:
        for _ in range(times):
            self.breaker.record_failure()
            self.assert_one_timer_at_most()

    def assert_one_timer_at_most(self) -> None:
        calls = self.clock.getDelayedCalls()
        assert len(calls) <= 1
        if self.breaker.state is OPEN and calls:
            assert calls[0].getTime() == self.breaker.open_until

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.assert_one_timer_at_most()


def opened(h: Harness) -> Harness:
    h.fail(3)
    assert h.breaker.state is OPEN
    return h


def test_starts_closed() -> None:
    h = Harness()
    assert h.breaker.state is CLOSED
    assert h.breaker.allows_traffic()
    assert h.breaker.open_until is None
    assert h.breaker.consecutive_failures == 0
    assert h.clock.getDelayedCalls() == []


def test_opens_at_threshold_not_before() -> None:
    h = Harness(threshold=3, cooldown=30)
    h.clock.advance(5)
    h.fail(2)
    assert h.breaker.state is CLOSED
    assert h.breaker.allows_traffic()
    assert h.breaker.consecutive_failures == 2
    assert h.clock.getDelayedCalls() == []
    assert h.changes == []
    h.fail()
    assert h.breaker.state is OPEN
    assert not h.breaker.allows_traffic()
    assert h.breaker.open_until == 35
    assert h.breaker.consecutive_failures == 3
    assert h.changes == [(CLOSED, OPEN)]
    assert len(h.clock.getDelayedCalls()) == 1


def test_success_in_between_resets_the_count() -> None:
    h = Harness(threshold=3)
    h.fail(2)
    h.breaker.record_success()
    assert h.breaker.consecutive_failures == 0
    h.fail(2)
    assert h.breaker.state is CLOSED
    assert h.changes == []  # a success while closed is no transition
    h.fail()
    assert h.breaker.state is OPEN


def test_threshold_of_one() -> None:
    h = Harness(threshold=1)
    h.fail()
    assert h.breaker.state is OPEN


def test_timer_moves_to_half_open_and_asks_for_one_probe() -> None:
    h = opened(Harness(cooldown=30))
    h.advance(29.9)
    assert h.breaker.state is OPEN
    assert h.probes == 0
    h.advance(0.1)
    assert h.breaker.state is HALF_OPEN
    assert not h.breaker.allows_traffic()  # only the probe goes out
    assert h.breaker.open_until is None
    assert h.probes == 1
    assert h.changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert h.clock.getDelayedCalls() == []
    h.advance(1000)  # nothing else happens until the probe reports back
    assert h.probes == 1
    assert h.breaker.state is HALF_OPEN


def test_failed_probe_reopens_with_doubled_cooldown_capped() -> None:
    h = opened(Harness(cooldown=30, max_cooldown=100))
    expected = [60.0, 100.0, 100.0]
    for n, cooldown in enumerate(expected, start=1):
        h.advance(h.breaker.open_until - h.clock.seconds())  # type: ignore[operator]
        assert h.breaker.state is HALF_OPEN
        assert h.probes == n
        h.fail()  # the probe failed
        assert h.breaker.state is OPEN
        assert h.breaker.open_until == h.clock.seconds() + cooldown
        assert h.breaker.cooldown == cooldown
    assert h.changes[-2:] == [(OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_probe_success_closes_and_resets_the_cooldown() -> None:
    h = opened(Harness(threshold=3, cooldown=30, max_cooldown=100))
    h.advance(30)
    h.fail()  # probe failed: 60 s
    h.advance(60)
    assert h.breaker.state is HALF_OPEN
    h.breaker.record_success()
    assert h.breaker.state is CLOSED
    assert h.breaker.allows_traffic()
    assert h.breaker.consecutive_failures == 0
    assert h.breaker.cooldown == 30
    assert h.changes[-1] == (HALF_OPEN, CLOSED)
    assert h.clock.getDelayedCalls() == []
    # The next opening takes the full threshold again, and the base cooldown.
    h.fail(2)
    assert h.breaker.state is CLOSED
    h.fail()
    assert h.breaker.open_until == h.clock.seconds() + 30


def test_failures_while_open_are_ignored() -> None:
    h = opened(Harness(cooldown=30))
    until = h.breaker.open_until
    h.advance(10)
    h.fail(5)  # connections begun before it opened, failing late
    assert h.breaker.state is OPEN
    assert h.breaker.open_until == until
    assert h.breaker.consecutive_failures == 3
    assert h.changes == [(CLOSED, OPEN)]
    h.advance(20)
    assert h.breaker.state is HALF_OPEN


def test_success_while_open_closes_and_cancels_the_timer() -> None:
    h = opened(Harness())
    h.breaker.record_success()  # a connection set up earlier delivered: the provider works
    assert h.breaker.state is CLOSED
    assert h.breaker.open_until is None
    assert h.clock.getDelayedCalls() == []
    h.advance(1000)
    assert h.probes == 0


def test_stop_cancels_the_timer() -> None:
    h = opened(Harness())
    h.breaker.stop()
    assert h.clock.getDelayedCalls() == []
    h.advance(1000)
    assert h.probes == 0
    assert h.breaker.state is OPEN


def test_stop_schedules_no_new_timer() -> None:
    h = Harness()
    h.breaker.stop()
    h.fail(3)  # late failures during shutdown
    assert h.breaker.state is OPEN
    assert h.clock.getDelayedCalls() == []


def test_at_most_one_delayed_call_through_many_cycles() -> None:
    h = Harness(threshold=2, cooldown=1, max_cooldown=8)
    for cycle in range(20):
        h.fail(10)
        for _ in range(cycle % 4):
            h.advance(h.breaker.open_until - h.clock.seconds())  # type: ignore[operator]
            h.fail()  # probe failed
        h.advance(h.breaker.open_until - h.clock.seconds())  # type: ignore[operator]
        assert h.breaker.state is HALF_OPEN
        if cycle % 2:
            h.breaker.record_success()
        else:
            h.fail()
        assert len(h.clock.getDelayedCalls()) <= 1
    assert h.probes == sum(c % 4 + 1 for c in range(20))


def test_probe_failing_synchronously_reopens() -> None:
    """The pool's probe fails inside on_probe (no password): the breaker re-opens at once."""
    h = opened(Harness(cooldown=30, max_cooldown=100))
    h.probe_action = h.breaker.record_failure
    h.advance(30)
    assert h.probes == 1
    assert h.breaker.state is OPEN
    assert h.breaker.open_until == 90
    assert h.changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    assert len(h.clock.getDelayedCalls()) == 1
    h.advance(60)
    assert h.probes == 2
    assert h.breaker.open_until == 190  # capped at 100


def test_probe_succeeding_synchronously_closes() -> None:
    h = opened(Harness())
    h.probe_action = h.breaker.record_success
    h.advance(30)
    assert h.probes == 1
    assert h.breaker.state is CLOSED
    assert h.changes[-2:] == [(OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert h.clock.getDelayedCalls() == []


def test_on_change_reentering_sees_current_state_and_no_stale_probe() -> None:
    """on_change fails the half-open period before on_probe runs: the probe is not asked for,
    and callbacks never nest, so the last change the owner sees is the current state."""
    h = opened(Harness())
    seen: list[BreakerState] = []

    def on_change(old: BreakerState, new: BreakerState) -> None:
        seen.append(h.breaker.state)
        if new is HALF_OPEN:
            h.breaker.record_failure()
            assert h.changes[-1] == (OPEN, HALF_OPEN)  # not yet delivered: no nesting

    h.change_action = on_change
    h.advance(30)
    assert h.probes == 0
    assert h.changes[-2:] == [(OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    assert h.changes[-1][1] is h.breaker.state is OPEN
    assert seen == [HALF_OPEN, OPEN]
    assert len(h.clock.getDelayedCalls()) == 1


def test_on_change_reentering_on_open_closes() -> None:
    h = Harness(threshold=1)
    h.change_action = lambda old, new: h.breaker.record_success() if new is OPEN else None
    h.fail()
    assert h.breaker.state is CLOSED
    assert h.changes == [(CLOSED, OPEN), (OPEN, CLOSED)]
    assert h.clock.getDelayedCalls() == []


def test_a_failing_callback_does_not_wedge_the_breaker() -> None:
    h = Harness(threshold=1)

    def boom(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metric bug")

    h.change_action = boom
    with LogCapture() as logs:
        h.fail()
        assert h.breaker.state is OPEN
        h.advance(30)
    failures = [e["log_failure"] for e in logs.events if "log_failure" in e]
    assert [str(f.value) for f in failures] == ["metric bug", "metric bug"]
    assert h.probes == 1  # still asked for, after the failing on_change
    assert h.breaker.state is HALF_OPEN
    h.breaker.record_success()
    assert h.breaker.state is CLOSED
    assert len(h.changes) == 3


def test_without_on_change() -> None:
    clock = Clock()
    probes: list[None] = []
    breaker = CircuitBreaker(clock, 1, 5, 10, lambda: probes.append(None))
    breaker.record_failure()
    clock.advance(5)
    assert probes == [None]
    assert breaker.state is HALF_OPEN


@pytest.mark.parametrize(
    ("threshold", "cooldown", "max_cooldown"), [(0, 30, 60), (3, 0, 60), (3, 30, 10)]
)
def test_rejects_nonsense(threshold: int, cooldown: float, max_cooldown: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(Clock(), threshold, cooldown, max_cooldown, lambda: None)
