"""The delivery queue: which spooled message is tried when, and what its outcomes lead to.

In memory, an index of queue/: a FIFO of ready queue IDs, a heap of deferred ones keyed by
their next attempt, and the set being delivered; one timer, for the earliest deferred message;
the IDs on hold. No directory is rescanned in the hot path. The spool stays the truth: at start
queue/ is scanned (in the I/O thread, then indexed in chunks while mail is already accepted);
a message's mtime is its next attempt time, so deferred mail stays deferred across a restart
and in-flight mail is ready again at once.

One attempt: load the message and its journal; append a marker (queue ID, time) to the
spool's attempt log (one write() from the reactor thread, no fsync: a process crash keeps it);
send the pending recipients through the router; journal every outcome durably; then remove
the message (all delivered: no journal is written at all; the removal is made durable a moment
later, together with others, see mailrelay.spool.removals), move it to failed/ (all final,
some failed), or defer it with exponential backoff and jitter until its lifetime runs out.
When the attempt ends, a second record in the attempt log says so.

An attempt that never ended (the process died, or the attempt failed unexpectedly) leaves its
marker: at start the queue takes those the last life left (for messages still spooled). The
next attempt of such a message counts its pending recipients whose last journal record is
older than the marker (or who have none) as possible duplicates: the upstream may have taken
the message before its outcome was journalled. Each marker is counted once. Markers lost to a
power cut only mean under-counting (see mailrelay.spool.store).

Operator commands (hold, release, retry, delete, flush) act on the spool through
``SpoolAdmin`` (the same code a queue command runs on a stopped daemon's spool) and keep the
index in step. A command on a message whose attempt is running takes effect when it ends.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mailrelay.bounce import build_dsn
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.outbound.results import Kind, OutboundMessage
from mailrelay.outbound.router import RoutedResult, Router
from mailrelay.spool.admin import ACTIVE, QueueCommandError, QueueEntry, SpoolAdmin
from mailrelay.spool.format import (
    CorruptSpoolFile,
    Envelope,
    Outcome,
    Status,
    StoredMessage,
    TruncatedSpoolFile,
    last_outcomes,
)
from mailrelay.spool.removals import DeliveredRemovals
from mailrelay.spool.store import HOLD, QUEUE, Spool, is_queue_id, queue_id_tag, queue_id_time

T = TypeVar("T")

# Messages indexed per reactor turn at start: 100 000 queued messages never stall the
# reactor for long, so new mail is accepted while the index fills.
INDEX_CHUNK = 2000
# Bodies kept in memory for first attempts, in all (a backlog falls back to reading files),
# and the largest kept (the spool's in-memory threshold: a larger one is on disk already).
WARM_BYTES = 16 * 1024 * 1024
WARM_MAX_BODY = 256 * 1024

_STATUS_OF_KIND = {
    Kind.DELIVERED: Status.DELIVERED,
    Kind.TEMPORARY: Status.DEFERRED,
    Kind.PERMANENT: Status.FAILED,
}


@attrs.frozen
class RetryPolicy:
    initial: float = 300.0
    maximum: float = 3600.0
    lifetime: float = 5 * 24 * 3600.0
    jitter: float = 0.1  # +/- this fraction, so retries of a burst do not move in lockstep

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds before attempt ``attempt + 1``, given ``attempt`` attempts so far (>= 1)."""
        base = min(self.initial * 2.0 ** min(attempt - 1, 32), self.maximum)
        return base * (1 + self.jitter * (2 * rand() - 1))


def _since_requeue(journal: list[Outcome]) -> list[Outcome]:
    """The records since an operator last requeued the message (all of them if never)."""
    for i in range(len(journal) - 1, -1, -1):
        if journal[i].status is Status.REQUEUED:
            return journal[i:]
    return journal


def _attempts_in_journal(journal: list[Outcome], pending: tuple[str, ...]) -> int:
    """How many attempts the journal shows for the recipients still pending (after a restart)."""
    recent = _since_requeue(journal)
    counts = [
        sum(1 for o in recent if o.recipient == r and o.status is Status.DEFERRED) for r in pending
    ]
    return max(counts, default=0)


def _lifetime_start(envelope: Envelope, journal: list[Outcome]) -> float:
    recent = _since_requeue(journal)
    if recent and recent[0].status is Status.REQUEUED:
        return max(envelope.received_at, recent[0].at)
    return envelope.received_at


async def _spool_dsn(spool: Spool, envelope: Envelope, dsn: bytes) -> str:
    writer = spool.open_writer(envelope)  # the portable way: a DSN is no SMTP acceptance
    writer.write(dsn)
    return await writer.commit()


def _scan_oldest_first(spool: Spool) -> list[tuple[str, float]]:
    """(ID, next attempt) of every message in queue/; IDs sort by acceptance time."""
    return sorted(spool.scan(QUEUE))


def _removable(envelope: Envelope, final: dict[str, Outcome]) -> bool:
    """Every recipient delivered: the message can leave the spool with no record kept."""
    return all(r in final and final[r].status is Status.DELIVERED for r in envelope.recipients)


@attrs.frozen
class QueuedMessage:
    queue_id: str
    received_at: float
    state: str  # ready, deferred, active
    next_attempt: float | None  # when deferred


class DeliveryQueue:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        spool: Spool,
        router: Router,
        policy: RetryPolicy,
        metrics: Metrics,
        max_in_flight: int = 64,
        rand: Callable[[], float] = random.random,
        reporting_mta: str | None = None,
    ) -> None:
        """``reporting_mta``: the host name DSNs are sent from; None keeps every permanently
        failed message in failed/ instead (dead letters, no bounce)."""
        # The class's Logger is a descriptor that builds a new Logger on every read of
        # self.log: four a message, and one more per recipient. Read once, kept here.
        self.log = self.log
        self._clock = clock
        self._spool = spool
        self._router = router
        self._policy = policy
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._rand = rand
        self._reporting_mta = reporting_mta
        self._admin = SpoolAdmin(spool, clock.seconds)
        self._removals = DeliveredRemovals(clock, spool)
        # The index of queue/. Every indexed ID is in _queued and in exactly one of: the ready
        # FIFO, _due (deferred, with the heap), _active. The FIFO and the heap may hold stale
        # entries (a message held, deleted or rescheduled since); they are skipped when popped.
        self._queued: set[str] = set()
        # Bodies of messages just accepted, for their first attempt (see enqueue), oldest
        # first, WARM_BYTES in all at most.
        self._warm: OrderedDict[str, tuple[Envelope, bytes]] = OrderedDict()
        self._warm_bytes = 0
        # The same IDs as a heap, oldest first, for the oldest message in O(1) (health and
        # metrics ask often). IDs that left are dropped lazily from the top, and the heap is
        # rebuilt when they are more than half of it.
        self._by_age: list[str] = []
        self._ready: deque[str] = deque()
        self._due: dict[str, float] = {}
        self._deferred: list[tuple[float, str]] = []
        self._active: dict[str, defer.Deferred[None]] = {}
        self._held: set[str] = set()
        # While the start-up scan is being indexed: IDs that left queue/ since it was taken.
        self._left_since_scan: set[str] | None = set()
        # Operator commands waiting for a running attempt to end: queue ID -> command.
        self._after_attempt: dict[str, tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = {}
        self._command_lock = defer.DeferredLock()
        self._attempts: dict[str, int] = {}
        # Attempt-log markers (queue ID -> marker time): of attempts that never ended (left by
        # the last life, or failed unexpectedly in this one), each popped by the message's next
        # attempt; and of the attempts running now.
        self._interrupted: dict[str, float] = {}
        self._markers: dict[str, float] = {}
        self._timer: IDelayedCall | None = None
        self._pump_call: IDelayedCall | None = None
        self._running = False
        self._sending = False  # attempts may start (the attempt log is open)
        self.indexed: defer.Deferred[int] = defer.Deferred()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Index the spool and start delivering; returns once the first chunk is indexed
        (``indexed`` fires when all of it is)."""
        self._running = True
        started = self._clock.seconds()
        orphans = await self._spool.run(self._spool.reconcile_journals)
        if orphans:
            self.log.info("reconciled {count} journal(s) left by a crash", count=orphans)
        self._interrupted = await self._spool.run(self._spool.open_attempt_log)
        # Mail accepted while the spool was being prepared waited in the ready FIFO: no
        # attempt may start before the attempt log is open to record it.
        self._sending = True
        self._pump()
        if self._interrupted:
            self.log.info(
                "{count} message(s) had an attempt interrupted when the relay last stopped;"
                " counted at their next attempt",
                count=len(self._interrupted),
            )
        self._held.update(await self._spool.run(self._spool.ids, HOLD))
        scanned = await self._spool.run(_scan_oldest_first, self._spool)
        self._index_chunk(scanned, 0, started)

    def _index_chunk(self, scanned: list[tuple[str, float]], start: int, began: float) -> None:
        if not self._running:
            return
        now = self._clock.seconds()
        for queue_id, next_attempt in scanned[start : start + INDEX_CHUNK]:
            self._index_scanned(queue_id, next_attempt, now)
        self._pump()
        if start + INDEX_CHUNK < len(scanned):
            self._clock.callLater(0, self._index_chunk, scanned, start + INDEX_CHUNK, began)
            return
        if scanned:
            self.log.info(
                "indexed {count} message(s) from the spool in {elapsed:.2f}s: {ready} ready,"
                " {deferred} deferred, {held} on hold",
                count=len(scanned),
                elapsed=self._clock.seconds() - began,
                ready=len(self._ready),
                deferred=len(self._due),
                held=len(self._held),
            )
        self._left_since_scan = None
        self.indexed.callback(len(scanned))

    def _index_scanned(self, queue_id: str, next_attempt: float, now: float) -> bool:
        """One (ID, mtime) from a scan of queue/ into the index, unless it is there already."""
        if queue_id in self._queued or queue_id in (self._left_since_scan or ()):
            return False  # indexed since the scan (accepted, retried), or gone (held, done)
        if queue_id in self._spool.committing:
            # Renamed into queue/ and not yet durable (before its one fsync, or its directory
            # fsync): its commit enqueues it (or removes it). Indexed now, it could be
            # delivered and forgotten before that enqueue, which would send it a second time.
            return False
        if not is_queue_id(queue_id):
            # Not ours (a file copied in by hand): never delivered, never counted.
            self.log.warn(
                "ignoring {name} in queue/: not a queue ID (move it out of the spool)",
                name=queue_id,
            )
            return False
        self._index(queue_id)
        if next_attempt > now:
            # No deferral is ever longer than the backoff's cap: an mtime further ahead comes
            # from a clock that was set back (or a hand-made file), not from us.
            latest = self._policy.maximum * (1 + self._policy.jitter)
            self._defer_until(queue_id, min(next_attempt, now + latest))
        else:
            self._ready.append(queue_id)
        return True

    async def adopt_unindexed(self, tag: int) -> int:
        """Index what is in queue/ under an ID of ``tag`` but not in the index: mail an
        acceptor process (whose IDs carry its tag) made durable and could not report, since
        it died first (or, with spool.directory_fsync's one fsync, renamed into queue/ and was
        killed before that fsync returned: its client got no 250, so at worst a duplicate).
        Returns how many were found.

        Called once that process has exited and its pipe is drained: every report it sent is
        in, and no other process makes IDs with its tag, so nothing found here is a commit
        still under way or a report still to come."""
        if not self.indexed.called:
            # After the start-up scan, whose bookkeeping this shares (a fresh Deferred: an
            # await would take indexed's result from its other readers).
            scan_done: defer.Deferred[None] = defer.Deferred()

            def passing(result: object) -> object:
                scan_done.callback(None)
                return result

            self.indexed.addBoth(passing)
            await scan_done

        async def step() -> int:
            if not self._running:
                return 0
            self._left_since_scan = set()
            try:
                scanned = await self._spool.run(self._spool.scan, QUEUE)
                now = self._clock.seconds()
                adopted = sum(
                    self._index_scanned(q, when, now)
                    for q, when in scanned
                    if is_queue_id(q) and queue_id_tag(q) == tag
                )
            finally:
                self._left_since_scan = None
            if adopted:
                self.log.warn(
                    "found {count} message(s) in queue/ that no process had reported;"
                    " delivering them",
                    count=adopted,
                )
                self._pump()
            return adopted

        return await self._one_at_a_time(step)

    async def stop(self) -> None:
        """Stop starting attempts; close providers so running attempts end; wait for them."""
        self._running = False
        for call in (self._timer, self._pump_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._pump_call = None
        await self._router.close()
        await defer.DeferredList(list(self._active.values()))
        await self._removals.flush()
        self._spool.close_attempt_log()

    def depth(self) -> dict[str, int]:
        return {
            "ready": len(self._queued) - len(self._due) - len(self._active),
            "deferred": len(self._due),
            "active": len(self._active),
            "held": len(self._held),
        }

    def oldest(self, count: int) -> list[QueuedMessage]:
        """The ``count`` messages longest in the queue (on hold ones aside), oldest first.

        Queue IDs sort by acceptance time, so this needs no file read: one pass over the index.
        """
        return [
            QueuedMessage(
                queue_id=queue_id,
                received_at=queue_id_time(queue_id),
                state=(
                    "active"
                    if queue_id in self._active
                    else "deferred"
                    if queue_id in self._due
                    else "ready"
                ),
                next_attempt=self._due.get(queue_id),
            )
            for queue_id in self._oldest_ids(count)
        ]

    def _oldest_ids(self, count: int) -> list[str]:
        by_age = self._by_age
        while by_age and by_age[0] not in self._queued:
            heapq.heappop(by_age)
        if count == 1:
            return by_age[:1]
        return heapq.nsmallest(count, self._queued)  # the status page's list: rare

    def enqueue(self, envelope: Envelope, body: bytes | None = None) -> None:
        """A message the inbound side (or a DSN) has just made durable. ``body``, when given,
        is what the spool file holds: the first attempt uses it instead of reading the file."""
        if envelope.queue_id in self._queued:
            # Indexed already: not expected (a rescan takes only a dead acceptor's IDs, after
            # its last report), but a second index entry would mean a second attempt.
            return
        # When the memory is used up, a new body is not kept (its file is read instead): the
        # oldest kept ones are the next the FIFO attempts.
        if body is not None and len(body) <= min(WARM_MAX_BODY, WARM_BYTES - self._warm_bytes):
            self._take_warm(envelope.queue_id)  # (never there: an ID is new; but be exact)
            self._warm[envelope.queue_id] = (envelope, body)
            self._warm_bytes += len(body)
        self.log.info(
            "{queue_id} queued: from=<{sender}> recipients={count}",
            queue_id=envelope.queue_id,
            event="queued",
            sender=envelope.sender,
            count=len(envelope.recipients),
        )
        if body is None:
            self._make_ready(envelope.queue_id)
            return
        # Just accepted: its attempt starts on the next reactor turn, so the client's 250
        # (written after this returns) does not wait for it; mail accepted in one turn
        # starts together.
        self._make_ready(envelope.queue_id, pump=False)
        if self._pump_call is None:
            self._pump_call = self._clock.callLater(0, self._pump_soon)

    def enqueue_id(self, queue_id: str) -> None:
        """A message made durable elsewhere (an acceptor process), known by its ID alone: its
        envelope is read from the spool at its attempt."""
        if queue_id in self._queued:
            return
        self.log.info("{queue_id} queued", queue_id=queue_id, event="queued")
        self._make_ready(queue_id)

    def _index(self, queue_id: str) -> None:
        self._queued.add(queue_id)
        heapq.heappush(self._by_age, queue_id)
        if len(self._by_age) > 2 * len(self._queued) + 1024:
            self._by_age = list(self._queued)
            heapq.heapify(self._by_age)

    def _make_ready(self, queue_id: str, pump: bool = True) -> None:
        self._index(queue_id)
        self._due.pop(queue_id, None)
        if queue_id not in self._active:
            self._ready.append(queue_id)
        if pump:
            self._pump()

    def _pump_soon(self) -> None:
        self._pump_call = None
        self._pump()

    def _forget(self, queue_id: str) -> None:
        """The message left queue/ (or is leaving it): out of the index."""
        self._take_warm(queue_id)
        self._queued.discard(queue_id)
        self._due.pop(queue_id, None)
        self._attempts.pop(queue_id, None)
        if self._left_since_scan is not None:
            self._left_since_scan.add(queue_id)  # the start-up scan may still list it

    # -- scheduling -------------------------------------------------------------------------------

    def _pump(self) -> None:
        while (
            self._running
            and self._sending
            and self._ready
            and len(self._active) < self._max_in_flight
        ):
            queue_id = self._ready.popleft()
            if queue_id not in self._queued or queue_id in self._active or queue_id in self._due:
                continue  # a stale entry
            # In _active before the attempt runs: it may get far, even finish, before it first
            # waits (a body in memory, a provider that answers at once).
            done: defer.Deferred[None] = defer.Deferred()
            self._active[queue_id] = done
            d = defer.Deferred.fromCoroutine(self._attempt(queue_id))
            d.addErrback(self._attempt_crashed, queue_id)
            d.addBoth(self._attempt_done, queue_id, done)

    def _attempt_done(self, _: object, queue_id: str, done: defer.Deferred[None]) -> None:
        self._active.pop(queue_id, None)
        if self._markers.pop(queue_id, None) is not None:
            try:
                self._spool.mark_attempt_done(queue_id)
            except Exception:
                # Never into the attempt's Deferred (nobody would handle it). The marker stays:
                # after a restart, only recipients with no journal record since it would be
                # counted (none, if the attempt recorded every outcome).
                self.log.failure(
                    "{queue_id} end of attempt not written to the attempt log",
                    queue_id=queue_id,
                    level=LogLevel.warn,
                )
        waiting = self._after_attempt.pop(queue_id, None)
        if waiting is not None:
            d = defer.Deferred.fromCoroutine(waiting[1]())
            d.addErrback(self._command_failed, queue_id)
        self._pump()
        # Last: stop() waits on these, and must find the attempt log's record written.
        done.callback(None)

    def _attempt_crashed(self, failure: Failure, queue_id: str) -> None:
        # A bug or an I/O error we did not foresee: the message stays in the spool and is
        # tried again later; the loop itself never dies.
        self.log.failure(
            "{queue_id} delivery attempt failed unexpectedly", failure, queue_id=queue_id
        )
        # Interrupted: its outcomes may not all be journalled. The next attempt counts the
        # recipients with no record since the marker (which the attempt log keeps).
        marker = self._markers.pop(queue_id, None)
        if marker is not None:
            self._interrupted[queue_id] = marker
        if queue_id in self._queued:
            self._defer(queue_id, self._policy.initial)

    def _command_failed(self, failure: Failure, queue_id: str) -> None:
        self.log.failure("{queue_id} operator command failed", failure, queue_id=queue_id)

    def _defer(self, queue_id: str, delay: float) -> None:
        self._defer_until(queue_id, self._clock.seconds() + delay)

    def _defer_until(self, queue_id: str, due: float) -> None:
        self._due[queue_id] = due
        heapq.heappush(self._deferred, (due, queue_id))
        self._arm_timer()

    def _arm_timer(self) -> None:
        if not self._running or not self._deferred:
            return
        due = self._deferred[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= due:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(
            max(0.0, due - self._clock.seconds()), self._release_due
        )

    def _release_due(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._deferred and self._deferred[0][0] <= now:
            due, queue_id = heapq.heappop(self._deferred)
            if self._due.get(queue_id) == due:  # else stale: rescheduled, held or gone
                del self._due[queue_id]
                self._ready.append(queue_id)
        self._pump()
        self._arm_timer()

    # -- one attempt ------------------------------------------------------------------------------

    def _take_warm(self, queue_id: str) -> StoredMessage | None:
        warm = self._warm.pop(queue_id, None)
        if warm is None:
            return None
        envelope, body = warm
        self._warm_bytes -= len(body)
        return StoredMessage(envelope=envelope, body=body)

    async def _load(self, queue_id: str) -> tuple[StoredMessage, list[Outcome]]:
        """The message and its journal: a message just accepted has no journal yet, and its
        body may still be in memory (no read, no thread hop)."""
        warm = self._take_warm(queue_id)
        if warm is not None and queue_id not in self._attempts:
            return warm, []
        return await self._spool.load(queue_id)

    async def _attempt(self, queue_id: str) -> None:
        try:
            stored, journal = await self._load(queue_id)
        except FileNotFoundError:
            self._forget(queue_id)
            return  # removed meanwhile: nothing to do
        except CorruptSpoolFile as e:
            # Where one fsync makes an acceptance durable (mailrelay.spool.filesystems), a
            # power cut between its rename and that fsync leaves a file cut short: its client
            # was not told 250 and sends it again. Kept for a person to look at all the same.
            spool = self._spool
            cut_short = (
                isinstance(e, TruncatedSpoolFile)
                and not spool.acceptance_directory_fsync
                # A journal means it was attempted, so it had its 250.
                and not await spool.run(spool.has_journal, queue_id)
            )
            if cut_short:
                text = (
                    "{queue_id} is cut short, moved to corrupt/: {reason} (most likely an"
                    " acceptance that a power cut interrupted, whose client got no 250)"
                )
            else:
                text = "{queue_id} is corrupt, moved to corrupt/: {reason}"
            self.log.emit(
                LogLevel.warn if cut_short else LogLevel.error,
                text,
                queue_id=queue_id,
                event="corrupt",
                reason=str(e),
            )
            self._metrics.corrupt_files.inc()
            self._forget(queue_id)
            await self._spool.move_to_corrupt(queue_id)
            return
        envelope = stored.envelope
        last = last_outcomes(journal)
        final = {r: o for r, o in last.items() if o.status.is_final}
        pending = tuple(dict.fromkeys(r for r in envelope.recipients if r not in final))
        if queue_id not in self._attempts:
            self._attempts[queue_id] = _attempts_in_journal(journal, pending)
        self._count_interrupted(queue_id, pending, last)

        if pending:
            # Before the upstream hears of it: after a process crash from here on, the next
            # start finds this marker newer than the recipients' last journal records and
            # counts them as possible duplicates.
            self._mark_attempt(queue_id)
            message = OutboundMessage(
                queue_id=queue_id,
                sender=envelope.sender,
                recipients=pending,
                body=stored.body,
                # Derived, not trusted: a client may send 8-bit bytes without BODY=8BITMIME.
                body_8bit=envelope.body_8bit or not stored.body.isascii(),
            )
            self.log.info(
                "{queue_id} attempt {attempt} for {count} recipient(s)",
                queue_id=queue_id,
                event="attempt",
                attempt=self._attempts[queue_id] + 1,
                count=len(pending),
            )
            started = self._clock.seconds()
            recorded: set[str] = set()

            async def record_step(settled: list[RoutedResult]) -> None:
                # Outcomes settled by one provider, journalled before the next is tried.
                await self._spool.append_journal(queue_id, [self._outcome(r) for r in settled])
                recorded.update(r.result.recipient for r in settled)

            routed = await self._router.deliver(message, record_step)
            outcomes = [self._outcome(r) for r in routed]
            final.update({o.recipient: o for o in outcomes if o.status.is_final})
            unrecorded = [o for o in outcomes if o.recipient not in recorded]
            if unrecorded and not _removable(envelope, final):
                # Journal before acting: after a crash from here on, a delivered recipient is
                # never sent again. When the message is about to be removed (every recipient
                # delivered), the removal (in _finish) is itself that record, so the journal
                # write is skipped: the same window for a crash; for a power cut, longer by the
                # moment the removal waits for its fsync (see DeliveredRemovals).
                await self._spool.append_journal(queue_id, unrecorded)
            self._report(queue_id, routed, self._clock.seconds() - started)

        still_pending = [r for r in pending if r not in final]
        if not still_pending:
            await self._finish(envelope, final, stored.body)
            return
        self._attempts[queue_id] += 1
        age = self._clock.seconds() - _lifetime_start(envelope, journal)
        if age >= self._policy.lifetime:
            expired = [
                Outcome(
                    r,
                    Status.FAILED,
                    "message expired: undeliverable for too long",
                    None,
                    self._clock.seconds(),
                )
                for r in still_pending
            ]
            await self._spool.append_journal(queue_id, expired)
            self.log.warn(
                "{queue_id} expired after {age:.0f}s with {count} recipient(s) undelivered",
                queue_id=queue_id,
                event="expired",
                age=age,
                count=len(expired),
            )
            self._metrics.messages_expired.inc()
            final.update({o.recipient: o for o in expired})
            await self._finish(envelope, final, stored.body)
            return
        delay = self._policy.delay(self._attempts[queue_id], self._rand)
        self._metrics.messages_deferred.inc()
        self.log.info(
            "{queue_id} deferred: {count} recipient(s), next attempt in {delay:.0f}s",
            queue_id=queue_id,
            event="retry",
            count=len(still_pending),
            delay=delay,
        )
        due = self._clock.seconds() + delay
        await self._spool.set_next_attempt(queue_id, due)
        self._defer_until(queue_id, due)

    def _mark_attempt(self, queue_id: str) -> None:
        now = self._clock.seconds()
        self._spool.mark_attempt(queue_id, now)  # an OSError fails the attempt: retried later
        self._markers[queue_id] = now
        if self._spool.attempt_log_full():
            try:
                # What a fresh log must keep: the markers of the attempts running now, and
                # those of interrupted attempts that no attempt has acted on yet.
                self._spool.rotate_attempt_log({**self._interrupted, **self._markers})
            except OSError as e:
                self.log.error(
                    "the attempt log could not be rotated (still appending to the old one):"
                    " {error}",
                    error=str(e),
                )

    def _count_interrupted(
        self, queue_id: str, pending: tuple[str, ...], last: dict[str, Outcome]
    ) -> None:
        marked = self._interrupted.pop(queue_id, None)
        if marked is None:
            return
        # Pending after an attempt that started at ``marked``, with nothing journalled about
        # them since: the relay died during that attempt.
        interrupted = [r for r in pending if r not in last or last[r].at < marked]
        if not interrupted:
            return
        self._metrics.possible_duplicates.inc(len(interrupted))
        self.log.warn(
            "{queue_id}: an attempt for {count} recipient(s) was interrupted (the relay stopped"
            " or crashed mid-attempt); retrying, possible duplicate",
            queue_id=queue_id,
            event="possible_duplicate",
            count=len(interrupted),
        )

    def _outcome(self, routed: RoutedResult) -> Outcome:
        result = routed.result
        return Outcome(
            recipient=result.recipient,
            status=_STATUS_OF_KIND[result.kind],
            reply=result.reply,
            provider=routed.provider,
            at=self._clock.seconds(),
            uncertain=result.uncertain,
        )

    def _report(self, queue_id: str, routed: list[RoutedResult], elapsed: float) -> None:
        # Counted once per provider, not per recipient: a labels() lookup is not cheap.
        delivered = [r.provider for r in routed if r.result.kind is Kind.DELIVERED]
        for provider in set(delivered):
            self._metrics.recipients_delivered.labels(provider).inc(delivered.count(provider))
        for r in routed:
            result = r.result
            if result.kind is Kind.DELIVERED:
                # The upstream's own ID is a field of its own, for log searches that start
                # from the provider's side ("where is their message 0100018c...?").
                self.log.info(
                    "{queue_id} delivered to <{recipient}> via {provider}"
                    " in {elapsed:.3f}s: {reply}",
                    queue_id=queue_id,
                    event="delivered",
                    recipient=result.recipient,
                    provider=r.provider,
                    elapsed=elapsed,
                    reply=result.reply,
                    queued_as=result.queued_as,
                )
                continue
            # Failed for good (warn), or deferred to a later attempt (info): one line each.
            permanent = result.kind is Kind.PERMANENT
            counter = (
                self._metrics.recipients_failed if permanent else self._metrics.recipients_deferred
            )
            counter.inc()
            emit = self.log.warn if permanent else self.log.info
            emit(
                "{queue_id} {event} for <{recipient}> via {provider}: {reply}",
                queue_id=queue_id,
                event="failed" if permanent else "deferred",
                recipient=result.recipient,
                provider=r.provider,
                reply=result.reply,
                failure_class=result.failure.value if result.failure else None,
                elapsed=elapsed,
            )
            if result.uncertain:
                self._metrics.possible_duplicates.inc()
                self.log.warn(
                    "{queue_id} <{recipient}>: connection lost after the final dot;"
                    " retrying, possible duplicate",
                    queue_id=queue_id,
                    event="possible_duplicate",
                    recipient=result.recipient,
                )

    async def _finish(self, envelope: Envelope, final: dict[str, Outcome], body: bytes) -> None:
        queue_id = envelope.queue_id
        failed = [o for o in final.values() if o.status is Status.FAILED]
        if failed and self._reporting_mta is not None and envelope.sender:
            # The DSN is durable in the spool before the original goes: it carries the reasons.
            # (Never to the null sender: a failing bounce is never bounced again.)
            dsn_id = await self._bounce(envelope, failed, body, self._reporting_mta)
            await self._spool.remove(queue_id)
            # Out of the index only now: if a step above fails, the message is still queued
            # and the attempt's crash handler tries it again later.
            self._forget(queue_id)
            self._metrics.messages_bounced.inc()
            self._metrics.recipients_bounced.inc(len(failed))
            self.log.warn(
                "{queue_id} bounced: {count} recipient(s) failed permanently; DSN {dsn_id} to"
                " <{sender}>",
                queue_id=queue_id,
                event="bounced",
                count=len(failed),
                dsn_id=dsn_id,
                sender=envelope.sender,
            )
            return
        if failed:
            await self._spool.move_to_failed(queue_id)
            self._forget(queue_id)
            self._metrics.messages_failed.inc()
            self.log.warn(
                "{queue_id} moved to failed/: {count} recipient(s) failed permanently",
                queue_id=queue_id,
                event="dead_letter",
                count=len(failed),
            )
        else:
            # Durable within a moment, together with others (see DeliveredRemovals).
            await self._removals.remove(queue_id)
            self._forget(queue_id)
            self._metrics.messages_delivered.inc()
            self._metrics.delivery_seconds.observe(
                max(0.0, self._clock.seconds() - envelope.received_at)
            )
            self.log.info(
                "{queue_id} done: every recipient delivered", queue_id=queue_id, event="done"
            )

    async def _bounce(
        self, envelope: Envelope, failed: list[Outcome], body: bytes, reporting_mta: str
    ) -> str:
        now = self._clock.seconds()
        dsn_envelope = Envelope(
            queue_id=self._spool.new_queue_id(),
            sender="",
            recipients=(envelope.sender,),
            received_at=now,
            client="mailrelay",
            helo=reporting_mta,
        )
        dsn = build_dsn(envelope, failed, body, reporting_mta, now)
        queue_id = await _spool_dsn(self._spool, dsn_envelope, dsn)
        self.enqueue(dsn_envelope, dsn)
        return queue_id

    # -- operator commands (mailrelay queue ..., through the control channel) --------------------

    # Commands run one at a time (they are rare), so two cannot interleave their file moves
    # and index updates on one message (a flush re-readying a message a hold is moving).

    async def _one_at_a_time(self, step: Callable[[], Coroutine[Any, Any, T]]) -> T:
        await self._command_lock.acquire()
        try:
            return await step()
        finally:
            self._command_lock.release()

    async def listing(self) -> list[QueueEntry]:
        entries = await self._spool.run(self._admin.listing)
        return [attrs.evolve(e, state=ACTIVE) if e.queue_id in self._active else e for e in entries]

    async def show(self, queue_id: str) -> dict[str, Any]:
        report = await self._spool.run(self._admin.show, queue_id)
        if queue_id in self._active:
            report["state"] = ACTIVE
        return report

    def _after_running_attempt(self, queue_id: str, name: str) -> str:
        """Queue a hold or delete for when the message's running attempt ends. A delete
        already waiting wins over a later hold: the operator was told it would be deleted."""
        waiting = self._after_attempt.get(queue_id)
        if waiting is not None and waiting[0] == "delete":
            name = "delete"
        now = self._hold_now if name == "hold" else self._delete_now
        self._after_attempt[queue_id] = (
            name,
            lambda: self._quietly(self._one_at_a_time(lambda: now(queue_id))),
        )
        return f"will be {'held' if name == 'hold' else 'deleted'} when its running attempt ends"

    async def hold(self, queue_id: str) -> str:
        async def step() -> str:
            if queue_id in self._active:
                return self._after_running_attempt(queue_id, "hold")
            await self._hold_now(queue_id)
            return "held"

        return await self._one_at_a_time(step)

    async def _hold_now(self, queue_id: str) -> None:
        due = self._due.get(queue_id)
        was_queued = queue_id in self._queued
        self._forget(queue_id)  # first, so no attempt starts while the file moves
        try:
            await self._spool.run(self._admin.hold, queue_id)
        except BaseException:
            if was_queued:
                self._restore(queue_id, due)
            raise
        self._held.add(queue_id)
        self.log.info("{queue_id} put on hold by the operator", queue_id=queue_id)

    def _restore(self, queue_id: str, due: float | None) -> None:
        self._index(queue_id)
        if due is None:
            self._make_ready(queue_id)
        else:
            self._defer_until(queue_id, due)

    async def release(self, queue_id: str) -> str:
        async def step() -> str:
            await self._spool.run(self._admin.release, queue_id)
            self._held.discard(queue_id)
            self.log.info("{queue_id} released by the operator", queue_id=queue_id)
            self._make_ready(queue_id)
            return "released"

        return await self._one_at_a_time(step)

    async def retry(self, queue_id: str) -> str:
        async def step() -> str:
            if queue_id in self._active:
                return "being delivered right now"
            done = await self._spool.run(self._admin.retry, queue_id)
            self.log.info("{queue_id} {done} by the operator", queue_id=queue_id, done=done)
            self._make_ready(queue_id)
            return done

        return await self._one_at_a_time(step)

    async def retry_failed(self) -> list[str]:
        async def step() -> list[str]:
            report = await self._spool.run(self._admin.requeue_failed)
            requeued = report.requeued
            for queue_id in requeued:
                self._make_ready(queue_id)
            for queue_id, reason in report.corrupt:
                self._metrics.corrupt_files.inc()
                self.log.error(
                    "{queue_id} dead letter is corrupt, moved to corrupt/: {reason}",
                    queue_id=queue_id,
                    reason=reason,
                )
            for queue_id, reason in report.left:
                self.log.error(
                    "{queue_id} dead letter left in failed/: {reason}",
                    queue_id=queue_id,
                    reason=reason,
                )
            if requeued:
                self.log.info(
                    "{count} dead letter(s) requeued by the operator", count=len(requeued)
                )
            return requeued

        return await self._one_at_a_time(step)

    async def flush(self) -> list[str]:
        async def step() -> list[str]:
            on_disk = await self._spool.run(self._admin.flush)
            flushed = sorted(set(on_disk) | set(self._due))
            for queue_id in flushed:
                # Only what the index still holds: a message that left queue/ since the scan
                # must not come back. (Not yet indexed at start: indexed as due now.)
                if queue_id in self._queued:
                    self._make_ready(queue_id)
            self.log.info("flush: {count} deferred message(s) due now", count=len(flushed))
            return flushed

        return await self._one_at_a_time(step)

    async def delete(self, queue_id: str) -> str:
        async def step() -> str:
            if queue_id in self._active:
                return self._after_running_attempt(queue_id, "delete")
            await self._delete_now(queue_id)
            return "deleted"

        return await self._one_at_a_time(step)

    async def _delete_now(self, queue_id: str) -> None:
        self._forget(queue_id)
        area = await self._spool.run(self._admin.delete, queue_id)
        self._held.discard(queue_id)
        self.log.warn(
            "{queue_id} deleted from {area}/ by the operator", queue_id=queue_id, area=area
        )

    async def _quietly(self, command: Awaitable[None]) -> None:
        """A command that waited for an attempt: the message may be gone by then (delivered)."""
        try:
            await command
        except QueueCommandError as e:
            self.log.info("a waiting operator command was not needed: {why}", why=e.message)
