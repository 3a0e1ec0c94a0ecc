"""The relay's state, read in one place: for /health, the status page, metrics and alerts.

``Monitor.reading()`` is live (the queue's index and the providers are in memory; free space
is one cached statvfs). Every ``interval`` seconds the monitor also counts failed/ (in the I/O
pool: a directory listing), keeps one queue-depth sample for the status page's chart (an hour
of them at most), and hands the reading to its listeners (the alert rules).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from mailrelay.logger import Logger
from mailrelay.outbound.activity import Activity, FailedRecipient, ProviderEvent
from mailrelay.outbound.results import IProvider
from mailrelay.queue import QueuedMessage

HISTORY_SECONDS = 3600.0


class QueueView(Protocol):
    def depth(self) -> dict[str, int]: ...

    def oldest(self, count: int) -> list[QueuedMessage]: ...


@attrs.frozen
class QueueDepth:
    ready: int = 0
    deferred: int = 0
    active: int = 0  # an attempt is running
    held: int = 0
    failed: int = 0  # dead letters in failed/ (as of the last count)

    @property
    def queued(self) -> int:
        """Messages waiting for delivery: what a backlog is made of (hold and failed aside)."""
        return self.ready + self.deferred + self.active


@attrs.frozen
class QueueSample:
    """One point of the status page's chart."""

    at: float
    ready: int
    deferred: int
    active: int
    held: int


@attrs.frozen
class ProviderHealth:
    name: str
    kind: str  # smtp, maildir
    state: str  # the breaker's: closed, half-open, open
    open_connections: int
    next_probe_at: float | None
    last_success_at: float | None
    last_error_at: float | None
    last_error_class: str | None  # a FailureClass value: connect, tls, auth, rcpt, ...
    last_error: str | None  # the reply or our description, scrubbed like every reply
    in_default_chain: bool

    @property
    def down(self) -> bool:
        """Takes no mail now: its breaker is open, or half-open (probing)."""
        return self.state != "closed"


@attrs.frozen
class Reading:
    at: float
    started_at: float
    depth: QueueDepth
    oldest_received_at: float | None  # of the oldest queued message, None when none is
    free_bytes: int | None  # on the spool's filesystem; None when statvfs fails
    providers: tuple[ProviderHealth, ...]
    accepting: bool  # the SMTP listeners are up (disk space aside: see health.py)
    delivering: bool = True  # the delivery queue runs (started, not stopping)

    @property
    def oldest_age(self) -> float | None:
        if self.oldest_received_at is None:
            return None
        return max(0.0, self.at - self.oldest_received_at)

    @property
    def uptime(self) -> float:
        return max(0.0, self.at - self.started_at)


class ProviderSource(Protocol):
    @property
    def providers(self) -> tuple[IProvider, ...]: ...

    @property
    def chain(self) -> tuple[IProvider, ...]: ...


class Monitor:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        queue: QueueView,
        router: ProviderSource,
        activity: Activity,
        *,
        provider_kinds: dict[str, str],
        free_bytes: Callable[[], int | None],
        count_failed: Callable[[], defer.Deferred[int]],
        accepting: Callable[[], bool],
        interval: float,
        delivering: Callable[[], bool] = lambda: True,
        history_seconds: float = HISTORY_SECONDS,
    ) -> None:
        self._clock = clock
        self._queue = queue
        self._router = router
        self._activity = activity
        self._kinds = provider_kinds
        self._free_bytes = free_bytes
        self._count_failed = count_failed
        self._accepting = accepting
        self._delivering = delivering
        self.interval = interval
        self.started_at = clock.seconds()
        self._failed = 0
        self._history: deque[QueueSample] = deque(
            maxlen=max(2, int(history_seconds / interval) + 1)
        )
        self._listeners: list[Callable[[Reading], None]] = []
        self._loop: task.LoopingCall | None = None
        self._counting = False

    def subscribe(self, listener: Callable[[Reading], None]) -> None:
        """``listener`` gets each periodic reading (the alert rules)."""
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = self._clock
        d = self._loop.start(self.interval, now=True)
        d.addErrback(lambda f: self.log.failure("the monitor stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # -- readings --------------------------------------------------------------------------------

    def depth_now(self) -> QueueDepth:
        depth = self._queue.depth()
        return QueueDepth(
            ready=depth.get("ready", 0),
            deferred=depth.get("deferred", 0),
            active=depth.get("active", 0),
            held=depth.get("held", 0),
            failed=self._failed,
        )

    def oldest_age_now(self) -> float | None:
        oldest = self._queue.oldest(1)
        return max(0.0, self._clock.seconds() - oldest[0].received_at) if oldest else None

    def free_bytes_now(self) -> int | None:
        return self._free_bytes()

    def reading(self) -> Reading:
        oldest = self._queue.oldest(1)
        default_chain = {id(p) for p in self._router.chain}
        return Reading(
            at=self._clock.seconds(),
            started_at=self.started_at,
            depth=self.depth_now(),
            oldest_received_at=oldest[0].received_at if oldest else None,
            free_bytes=self._free_bytes(),
            providers=tuple(
                self._provider_health(p, id(p) in default_chain) for p in self._router.providers
            ),
            accepting=self._accepting(),
            delivering=self._delivering(),
        )

    def history(self) -> list[QueueSample]:
        """Queue depth over the last hour, oldest first."""
        return list(self._history)

    def oldest(self, count: int) -> list[QueuedMessage]:
        return self._queue.oldest(count)

    def recent_failures(self) -> list[FailedRecipient]:
        return self._activity.recent_failures()

    def sample(self) -> None:
        """One tick: a chart point, the listeners told, failed/ counted for the next tick.
        Never raises: the loop must outlive a bad reading."""
        try:
            self._sample()
        except Exception:
            self.log.failure("a monitor reading failed")

    def accepting_now(self) -> bool:
        return self._accepting()

    def _sample(self) -> None:
        reading = self.reading()
        d = reading.depth
        self._history.append(QueueSample(reading.at, d.ready, d.deferred, d.active, d.held))
        for listener in self._listeners:
            try:
                listener(reading)
            except Exception:
                self.log.failure("a monitor listener failed")
        self._recount_failed()

    def _recount_failed(self) -> None:
        if self._counting:
            return  # a slow disk: the last count is still running
        self._counting = True

        def counted(count: int) -> None:
            self._failed = count

        def done(_: object) -> None:
            self._counting = False

        d = self._count_failed()
        d.addCallback(counted)
        d.addErrback(lambda f: self.log.failure("cannot count failed/", f))
        d.addBoth(done)

    def _provider_health(self, provider: IProvider, in_default_chain: bool) -> ProviderHealth:
        status = provider.status()
        success = self._activity.last_success(provider.name)
        error = self._activity.last_error(provider.name)
        setup = status.last_setup_error
        if setup is not None and (error is None or setup.at >= error.at):
            # A connection that failed to set up (no message was there to meet it).
            error = ProviderEvent(setup.at, setup.reply, setup.failure)
        return ProviderHealth(
            name=provider.name,
            kind=self._kinds.get(provider.name, "smtp"),
            state=status.state,
            open_connections=status.open_connections,
            next_probe_at=status.next_probe_at,
            last_success_at=success.at if success else None,
            last_error_at=error.at if error else None,
            last_error_class=error.failure if error else None,
            last_error=error.reply if error else None,
            in_default_chain=in_default_chain,
        )
