"""Alert rules and the manager, driven by the monitor on a Clock: fire once, resolve once
(hysteresis), repeat while active, one notification per channel."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.logger import LogEvent, globalLogPublisher

from mailrelay.alerts.rules import (
    BacklogRule,
    DiskRule,
    LogChannel,
    Notice,
    OldestAgeRule,
    ProviderDownRule,
)
from tests.unit.ops_fakes import OpsRig, ops_rig


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.notices: list[Notice] = []

    def send(self, notice: Notice) -> defer.Deferred[None]:
        self.notices.append(notice)
        return defer.succeed(None)

    def kinds(self) -> list[tuple[str, str]]:
        return [(n.name, n.kind) for n in self.notices]


class Broken:
    name = "broken"

    def send(self, notice: Notice) -> defer.Deferred[None]:
        return defer.fail(RuntimeError("receiver down"))


def started(rig: OpsRig) -> OpsRig:
    rig.monitor.start()  # samples now, then every interval on the rig's Clock
    return rig


def test_backlog_fires_once_at_101_and_resolves_once_when_drained() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([BacklogRule(100, 0.8)], [recorder], repeat_interval=0)
    started(rig)
    rig.queue.add(100)
    rig.clock.advance(10)
    assert recorder.notices == []  # 100 is not "more than 100"
    rig.queue.add(1)
    rig.clock.advance(10)
    assert recorder.kinds() == [("backlog", "firing")]
    firing = recorder.notices[0]
    assert (firing.value, firing.threshold) == (101, 100)
    assert firing.summary == "101 message(s) waiting for delivery (threshold 100)"
    assert (
        rig.metrics.registry.get_sample_value("mailrelay_alert_active", {"alert": "backlog"}) == 1
    )
    # Hovering around the line: 100, 101, 95, 81 fire nothing more (hysteresis).
    for target in (100, 101, 95, 81, 120):
        rig.queue.drain(len(rig.queue.messages) - target) if target < len(
            rig.queue.messages
        ) else rig.queue.add(target - len(rig.queue.messages))
        rig.clock.advance(10)
    assert recorder.kinds() == [("backlog", "firing")]
    rig.queue.drain()
    rig.clock.advance(10)
    assert recorder.kinds() == [("backlog", "firing"), ("backlog", "resolved")]
    resolved = recorder.notices[1]
    assert resolved.since == firing.at and resolved.value == 0
    rig.clock.advance(100)
    assert len(recorder.notices) == 2
    assert (
        rig.metrics.registry.get_sample_value("mailrelay_alert_active", {"alert": "backlog"}) == 0
    )


def test_an_active_alert_repeats_on_its_interval() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([BacklogRule(5, 0.8)], [recorder], repeat_interval=60)
    started(rig)
    rig.queue.add(6)
    rig.clock.pump([10] * 13)  # 130 s active
    assert recorder.kinds() == [
        ("backlog", "firing"),
        ("backlog", "repeat"),
        ("backlog", "repeat"),
    ]
    assert [n.at - recorder.notices[0].at for n in recorder.notices] == [0, 60, 120]
    assert recorder.notices[1].subject.startswith("[mailrelay relay.test] STILL FIRING backlog: ")


def test_a_message_too_old_fires_and_resolves_when_it_leaves() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([OldestAgeRule(3600, 0.8)], [recorder])
    started(rig)
    rig.queue.add(1, state="deferred")
    rig.clock.advance(3600)
    assert recorder.notices == []
    rig.clock.advance(10)
    assert recorder.kinds() == [("oldest_age", "firing")]
    assert recorder.notices[0].summary == ("the oldest queued message is 60m old (limit 60m)")
    rig.queue.drain()
    rig.clock.advance(10)
    assert recorder.kinds()[-1] == ("oldest_age", "resolved")


def test_disk_low_resolves_only_with_a_margin() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([DiskRule(1000, 0.8)], [recorder])
    started(rig)
    rig.free[0] = 999
    rig.clock.advance(10)
    assert recorder.kinds() == [("disk_low", "firing")]
    for free in (1100, None, 1200):  # above the line, unknown, still under 1250
        rig.free[0] = free
        rig.clock.advance(10)
    assert len(recorder.notices) == 1
    rig.free[0] = 1250
    rig.clock.advance(10)
    assert recorder.kinds()[-1] == ("disk_low", "resolved")


def test_a_provider_alert_fires_when_open_and_resolves_only_when_closed() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([ProviderDownRule()], [recorder])
    started(rig)
    primary = rig.router.chain[0]
    for state in ("half-open", "open", "half-open", "open", "half-open"):
        primary.state = state
        rig.clock.advance(10)
    assert recorder.kinds() == [("provider_down:primary", "firing")]
    assert recorder.notices[0].summary == "provider primary is down: circuit breaker open"
    primary.state = "closed"
    rig.clock.advance(10)
    assert recorder.kinds()[-1] == ("provider_down:primary", "resolved")
    assert recorder.notices[-1].summary == "provider primary is up again"


def test_a_flapping_provider_is_one_alert_until_it_stays_up_for_clear_after() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([ProviderDownRule()], [recorder], repeat_interval=0, clear_after=60)
    started(rig)
    primary = rig.router.chain[0]
    for state in ("open", "closed", "closed", "open", "closed", "half-open", "closed"):
        primary.state = state
        rig.clock.advance(10)
    assert recorder.kinds() == [("provider_down:primary", "firing")]
    rig.clock.pump([10] * 5)  # closed for 50 s in a row
    assert len(recorder.notices) == 1
    rig.clock.advance(10)  # 60 s
    assert recorder.kinds()[-1] == ("provider_down:primary", "resolved")
    assert len(recorder.notices) == 2


def test_every_channel_gets_each_notice_and_failures_are_counted() -> None:
    rig = ops_rig(interval=10)
    recorder = Recorder()
    rig.alert_manager([BacklogRule(0, 0.5)], [Broken(), recorder])
    started(rig)
    rig.queue.add(1)
    rig.clock.advance(10)
    assert recorder.kinds() == [("backlog", "firing")]
    value = rig.metrics.registry.get_sample_value
    assert (
        value("mailrelay_alert_notifications_total", {"channel": "broken", "result": "failed"}) == 1
    )
    assert (
        value("mailrelay_alert_notifications_total", {"channel": "recorder", "result": "sent"}) == 1
    )


def test_the_log_channel_writes_one_line_with_named_fields() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        notice = Notice("backlog", "firing", "101 message(s)", 101, 100, 5.0, 5.0, "relay.test")
        LogChannel().send(notice)
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("event") == "alert"]
    assert len(ours) == 1
    assert ours[0]["alert"] == "backlog" and ours[0]["status"] == "firing"
    assert ours[0]["log_level"].name == "warn"


@pytest.mark.parametrize(
    "kind, label", [("firing", "FIRING"), ("repeat", "STILL FIRING"), ("resolved", "RESOLVED")]
)
def test_notice_subject_and_json(kind: Any, label: str) -> None:
    notice = Notice("backlog", kind, "3 message(s)", 3, 2, 1.0, 2.0, "relay.test")
    assert notice.subject == f"[mailrelay relay.test] {label} backlog: 3 message(s)"
    body = notice.as_json()
    assert body["alert"] == "backlog" and body["status"] == kind and body["host"] == "relay.test"
