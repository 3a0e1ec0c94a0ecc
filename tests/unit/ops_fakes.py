"""Fakes for the operations side (monitor, health, alerts, web): a queue index and providers
whose state a test sets by hand, and a Monitor and Operations built on them with a Clock."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock

from mailrelay.alerts.rules import AlertManager, Rule
from mailrelay.metrics import Metrics
from mailrelay.monitor import Monitor
from mailrelay.outbound.activity import Activity
from mailrelay.queue import QueuedMessage
from mailrelay.spool.store import new_queue_id
from mailrelay.web import Operations
from tests.unit.fakes import FakeProvider


class FakeQueue:
    """``depth()`` and ``oldest()`` over messages a test adds and removes."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.messages: dict[str, str] = {}  # queue ID -> ready / deferred / active
        self.held = 0

    def add(self, count: int = 1, state: str = "ready", received_at: float | None = None) -> None:
        for _ in range(count):
            self.messages[new_queue_id(received_at or self._clock.seconds())] = state

    def drain(self, count: int | None = None) -> None:
        for queue_id in sorted(self.messages)[:count]:
            del self.messages[queue_id]

    def depth(self) -> dict[str, int]:
        states = list(self.messages.values())
        return {s: states.count(s) for s in ("ready", "deferred", "active")} | {"held": self.held}

    def oldest(self, count: int) -> list[QueuedMessage]:
        return [
            QueuedMessage(queue_id, int(queue_id[:14], 16) / 1e6, self.messages[queue_id], None)
            for queue_id in sorted(self.messages)[:count]
        ]


@attrs.define
class FakeRouter:
    chain: tuple[Any, ...]
    others: tuple[Any, ...] = ()

    @property
    def providers(self) -> tuple[Any, ...]:
        return self.chain + self.others


@attrs.define
class OpsRig:
    clock: Clock
    queue: FakeQueue
    router: FakeRouter
    activity: Activity
    monitor: Monitor
    metrics: Metrics
    failed: list[int]  # what the next count of failed/ returns
    free: list[int | None]  # what free space reads as
    accepting: list[bool]

    def operations(self, alerts: Any = None, min_free_space: int = 0) -> Operations:
        return Operations(
            monitor=self.monitor,
            alerts=alerts if alerts is not None else NoAlerts(),
            min_free_space=min_free_space,
            hostname="relay.test",
        )

    def alert_manager(
        self,
        rules: list[Rule],
        channels: list[Any],
        repeat_interval: float = 3600.0,
        clear_after: float = 0.0,
    ) -> AlertManager:
        manager = AlertManager(
            self.clock, rules, channels, self.metrics, "relay.test", repeat_interval, clear_after
        )
        self.monitor.subscribe(manager.evaluate)
        return manager


class NoAlerts:
    def active(self) -> list[Any]:
        return []


def ops_rig(
    providers: tuple[str, ...] = ("primary", "backup"),
    others: tuple[str, ...] = (),
    interval: float = 10.0,
) -> OpsRig:
    clock = Clock()
    clock.advance(1_800_000_000)
    queue = FakeQueue(clock)
    router = FakeRouter(
        tuple(FakeProvider(n) for n in providers), tuple(FakeProvider(n) for n in others)
    )
    activity = Activity(clock)
    failed, free, accepting = [0], [10 * 2**30], [True]
    monitor = Monitor(
        clock,
        queue,
        router,
        activity,
        provider_kinds={},
        free_bytes=lambda: free[0],
        count_failed=lambda: defer.succeed(failed[0]),
        accepting=lambda: accepting[0],
        interval=interval,
    )
    metrics = Metrics()
    metrics.watch(monitor)
    return OpsRig(clock, queue, router, activity, monitor, metrics, failed, free, accepting)
