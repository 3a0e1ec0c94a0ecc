"""At stop, /health/ready turns 503 first and the SMTP listeners wait http.drain_time."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailrelay.service import _ReadinessService


def test_readiness_stops_at_once_without_a_drain_time() -> None:
    readiness = _ReadinessService(Clock(), 0.0)
    readiness.startService()
    assert readiness.stopService() is None
    assert not readiness.running


def test_readiness_turns_off_then_waits_the_drain_time() -> None:
    clock = Clock()
    readiness = _ReadinessService(clock, 6.0)
    readiness.startService()
    d = readiness.stopService()
    assert d is not None
    assert not readiness.running  # /health/ready says 503 from now on
    clock.advance(5.9)
    assert not d.called  # the listeners are still open
    clock.advance(0.1)
    assert d.called
