"""Removing delivered messages: at once from queue/, durably a moment later, many together.

A message every recipient of which was delivered leaves queue/ at once (two unlinks in the
I/O thread), and the queue forgets it. The fsync of queue/ that makes the removal survive a
power cut is shared: one runs ``delay`` seconds after the first removal it will cover (or as
soon as the one running ends, if that is later), and covers every removal finished before it
started. One runs at a time. While they fail, one is tried every ``retry`` seconds.

Why: each fsync of queue/ is a commit of the file system's journal, and the 250 of every
message being accepted waits on one such commit (tmp file, rename, fsync of queue/). An fsync
per removal, in the process that also accepts mail, doubled the commits the acceptances queue
behind: measured, 1500 x 4 KB messages at concurrency 1 into smtp-sink, four alternating
pairs, medians 132 -> 163 messages a second (bench/README.md, the fourth push).

What it costs: after a power cut (not a process crash: the kernel already has the unlink), a
message removed shortly before the cut (``delay``, or the rest of a slow running fsync, plus
one fsync) is back in queue/ and is sent again, most likely uncounted (the attempt log is not
fsynced either). That is the window the design cannot close anyway (the upstream said 250,
the relay had not yet recorded it durably), made longer. Postfix does not fsync its removals
at all. ``flush``, at stop after the last removal, leaves nothing waiting. An fsync that
succeeds after one failed proves little ("fsyncgate"): the error log is the operator's signal.

Every other move out of queue/ (a bounce, failed/, hold/, an operator's delete) is still
durable before it returns: those are rare, and a second DSN or a deleted message coming back
would be worse than a second copy of a delivered one.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from mailrelay.logger import Logger
from mailrelay.spool.store import QUEUE, Spool

# How long a removal may wait for the fsync that makes it durable.
REMOVAL_SYNC_DELAY = 0.1
# After a failed fsync of queue/, the next try.
REMOVAL_SYNC_RETRY = 5.0


class DeliveredRemovals:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        spool: Spool,
        delay: float = REMOVAL_SYNC_DELAY,
        retry: float = REMOVAL_SYNC_RETRY,
    ) -> None:
        self._clock = clock
        self._spool = spool
        self._delay = delay
        self._retry = retry
        # Removals finished, and how many of them the last completed fsync covered: the
        # removals are durable up to ``_synced``.
        self._removed = 0
        self._synced = 0
        # When the oldest removal that no fsync (done or running) covers finished.
        self._oldest_uncovered: float | None = None
        self._timer: IDelayedCall | None = None
        self._in_flight: defer.Deferred[None] | None = None
        self._stopping = False
        self._failing = False  # the last fsync failed

    @property
    def pending(self) -> int:
        """Removals done but not yet durable."""
        return self._removed - self._synced

    async def remove(self, queue_id: str) -> None:
        """Unlink a delivered message and its journal from queue/; raises what the unlink
        raised (OSError). Durable normally within ``delay`` (or at ``flush``)."""
        await self._spool.unlink(queue_id)
        self._removed += 1
        if self._oldest_uncovered is None:
            self._oldest_uncovered = self._clock.seconds()
        self._schedule(self._delay)

    async def flush(self) -> None:
        """At stop, after the last removal: make every removal so far durable now, with one
        fsync, unless the last one failed (not retried at stop: its error was logged). A
        failure is logged, not raised."""
        self._stopping = True  # a failure from here on says it is not tried again
        try:
            while self._in_flight is not None:
                await self._in_flight
            self._cancel_timer()
            if self.pending and not self._failing:
                await self._sync()
            self._cancel_timer()  # armed by a failure just logged: nothing runs after the stop
        finally:
            self._stopping = False

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        if self._timer is None and self._in_flight is None and self.pending:
            self._timer = self._clock.callLater(delay, self._sync)

    def _sync(self) -> defer.Deferred[None]:
        self._timer = None
        # Only removals finished before the fsync starts are sure to be covered by it.
        covered = self._removed
        self._oldest_uncovered = None
        done: defer.Deferred[None] = self._spool.sync_area(QUEUE)
        self._in_flight = done
        done.addCallbacks(self._synced_up_to, self._sync_failed, callbackArgs=(covered,))
        return done

    def _synced_up_to(self, _: object, covered: int) -> None:
        self._in_flight = None
        self._failing = False
        self._synced = max(self._synced, covered)
        if self._oldest_uncovered is not None:  # removals during that fsync: their own delay
            due = self._oldest_uncovered + self._delay
            self._schedule(max(0.0, due - self._clock.seconds()))

    def _sync_failed(self, failure: Failure) -> None:
        self._in_flight = None
        self._failing = True
        then = "not tried again: stopping" if self._stopping else f"trying again in {self._retry}s"
        what = (
            "the removal of {count} delivered message(s) is not durable: the fsync of queue/"
            " failed{error}; {then} (a power cut would bring them back, to be sent again)"
        )
        if failure.check(OSError):
            error = f" ({failure.getErrorMessage()})"
            self.log.error(what, count=self.pending, error=error, then=then)
        else:  # not the disk: a bug, with its traceback
            self.log.failure(what, failure, count=self.pending, error="", then=then)
        self._schedule(self._retry)
