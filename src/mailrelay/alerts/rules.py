"""Alert rules with hysteresis, and the manager that turns readings into notifications.

Each rule looks at a monitor reading and says, per condition, whether it is bad (fire) or good
(resolve); in between, an alert keeps its state. So a backlog that hovers at its threshold
fires once, and resolves once when it has really drained (below threshold x clear_ratio).
A firing alert resolves only after ``clear_after`` seconds of good readings in a row, so a
provider whose breaker flaps (open, closed, open...) is one alert, not a notification a
minute. While an alert stays active it is sent again every ``repeat_interval`` seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailrelay import __version__
from mailrelay.humanize import age, size
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.monitor import Reading

NoticeKind = Literal["firing", "repeat", "resolved"]


class ChannelError(Exception):
    """A channel gave up on a notification; the text is safe to log (no secret in it)."""


@attrs.frozen
class Condition:
    """What one rule says about one reading."""

    name: str  # backlog, oldest_age, disk_low, provider_down:<name>
    bad: bool  # fire (if not active)
    good: bool  # resolve (if active); neither: keep the current state
    value: float | None
    threshold: float
    summary: str  # one line, for humans


@attrs.frozen
class Notice:
    """One notification: an alert fires, is still active (repeat), or resolved."""

    name: str
    kind: NoticeKind
    summary: str
    value: float | None
    threshold: float
    since: float  # when it fired
    at: float
    host: str

    def as_json(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "status": self.kind,
            "summary": self.summary,
            "value": self.value,
            "threshold": self.threshold,
            "since": self.since,
            "at": self.at,
            "host": self.host,
            "service": "mailrelay",
            "version": __version__,
        }

    @property
    def subject(self) -> str:
        label = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}[self.kind]
        return f"[mailrelay {self.host}] {label} {self.name}: {self.summary}"


@attrs.frozen
class ActiveAlert:
    name: str
    since: float
    summary: str
    value: float | None
    threshold: float


class Rule(Protocol):
    def conditions(self, reading: Reading) -> Iterable[Condition]: ...


class Channel(Protocol):
    """Where notifications go. ``send`` fires when the notification is delivered, or fails
    once the channel has given up (after its own retries)."""

    name: str

    def send(self, notice: Notice) -> defer.Deferred[None]: ...


@attrs.frozen
class BacklogRule:
    threshold: int
    clear_ratio: float

    def conditions(self, reading: Reading) -> Iterable[Condition]:
        queued = reading.depth.queued
        yield Condition(
            name="backlog",
            bad=queued > self.threshold,
            good=queued <= self.threshold * self.clear_ratio,
            value=queued,
            threshold=self.threshold,
            summary=f"{queued} message(s) waiting for delivery (threshold {self.threshold})",
        )


@attrs.frozen
class OldestAgeRule:
    limit: float
    clear_ratio: float

    def conditions(self, reading: Reading) -> Iterable[Condition]:
        oldest = reading.oldest_age
        limit = age(self.limit)
        summary = (
            "no message waiting for delivery"
            if oldest is None
            else f"the oldest queued message is {age(oldest)} old (limit {limit})"
        )
        yield Condition(
            name="oldest_age",
            bad=oldest is not None and oldest > self.limit,
            good=oldest is None or oldest <= self.limit * self.clear_ratio,
            value=oldest,
            threshold=self.limit,
            summary=summary,
        )


@attrs.frozen
class DiskRule:
    minimum: int
    clear_ratio: float

    def conditions(self, reading: Reading) -> Iterable[Condition]:
        free = reading.free_bytes
        if free is None:
            return  # cannot tell: the alert keeps its state
        yield Condition(
            name="disk_low",
            bad=free < self.minimum,
            good=free >= self.minimum / self.clear_ratio,
            value=free,
            threshold=self.minimum,
            summary=(f"{size(free)} free on the spool's filesystem (limit {size(self.minimum)})"),
        )


@attrs.frozen
class ProviderDownRule:
    def conditions(self, reading: Reading) -> Iterable[Condition]:
        for p in reading.providers:
            if p.state == "closed":
                summary = f"provider {p.name} is up again"
            else:
                summary = f"provider {p.name} is down: circuit breaker {p.state}"
                if p.last_error_class:
                    summary += f" (last error: {p.last_error_class}: {p.last_error})"
            yield Condition(
                name=f"provider_down:{p.name}",
                # Half-open is a probe between two open periods: still down, not yet up.
                bad=p.state == "open",
                good=p.state == "closed",
                value=None,
                threshold=0,
                summary=summary,
            )


class AlertManager:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        rules: Sequence[Rule],
        channels: Sequence[Channel],
        metrics: Metrics,
        host: str,
        repeat_interval: float,
        clear_after: float = 0.0,
    ) -> None:
        self._clock = clock
        self._rules = tuple(rules)
        self._channels = tuple(channels)
        self._metrics = metrics
        self._host = host
        self._repeat_interval = repeat_interval
        self._clear_after = clear_after
        self._active: dict[str, ActiveAlert] = {}
        self._good_since: dict[str, float] = {}  # firing alerts whose readings are good
        self._last_sent: dict[str, float] = {}

    def active(self) -> list[ActiveAlert]:
        """Alerts firing now, oldest first."""
        return sorted(self._active.values(), key=lambda a: (a.since, a.name))

    def evaluate(self, reading: Reading) -> None:
        """One reading through every rule: what fires, repeats or resolves is sent now."""
        now = self._clock.seconds()
        for rule in self._rules:
            for c in rule.conditions(reading):
                active = self._active.get(c.name)
                if active is None:
                    if c.bad:
                        self._active[c.name] = ActiveAlert(
                            c.name, now, c.summary, c.value, c.threshold
                        )
                        self._metrics.alert_active.labels(c.name).set(1)
                        self._notify(c, "firing", since=now, now=now)
                    continue
                if c.good:
                    good_since = self._good_since.setdefault(c.name, now)
                    if now - good_since < self._clear_after:
                        continue  # good, but not for long enough yet
                    del self._active[c.name]
                    del self._good_since[c.name]
                    self._last_sent.pop(c.name, None)
                    self._metrics.alert_active.labels(c.name).set(0)
                    self._notify(c, "resolved", since=active.since, now=now)
                    continue
                self._good_since.pop(c.name, None)
                self._active[c.name] = attrs.evolve(active, summary=c.summary, value=c.value)
                if (
                    self._repeat_interval > 0
                    and now - self._last_sent[c.name] >= self._repeat_interval
                ):
                    self._notify(c, "repeat", since=active.since, now=now)

    def _notify(self, c: Condition, kind: NoticeKind, since: float, now: float) -> None:
        self._last_sent[c.name] = now
        notice = Notice(c.name, kind, c.summary, c.value, c.threshold, since, now, self._host)
        for channel in self._channels:
            d = defer.maybeDeferred(channel.send, notice)
            d.addCallbacks(
                self._sent,
                self._not_sent,
                callbackArgs=(channel, notice),
                errbackArgs=(channel, notice),
            )

    def _sent(self, _: object, channel: Channel, notice: Notice) -> None:
        self._metrics.alert_notifications.labels(channel.name, "sent").inc()

    def _not_sent(self, failure: Failure, channel: Channel, notice: Notice) -> None:
        self._metrics.alert_notifications.labels(channel.name, "failed").inc()
        # A channel's own errors are phrased to be shown (no webhook URL, no secret); anything
        # else could quote what it was given, so only its type is logged.
        error = (
            failure.getErrorMessage()
            if isinstance(failure.value, ChannelError)
            else type(failure.value).__name__
        )
        self.log.error(
            "alert {alert} ({status}) could not be sent by {channel}: {error}",
            alert=notice.name,
            status=notice.kind,
            channel=channel.name,
            error=error,
            event="alert_not_sent",
        )


class LogChannel:
    """Every notification as one log line: warn when it fires or repeats, info when resolved."""

    name = "log"
    log = Logger(namespace="mailrelay.alerts")

    def send(self, notice: Notice) -> defer.Deferred[None]:
        emit = self.log.info if notice.kind == "resolved" else self.log.warn
        emit(
            "alert {alert} {status}: {summary}",
            alert=notice.name,
            status=notice.kind,
            summary=notice.summary,
            value=notice.value,
            threshold=notice.threshold,
            since=notice.since,
            event="alert",
        )
        return defer.succeed(None)
