"""The delivery queue: which spooled message is tried when, and what its outcomes lead to.

In memory: a FIFO of ready queue IDs, a heap of deferred ones keyed by their next attempt, and
the set being delivered; one timer, for the earliest deferred message. The spool stays the
truth: at start every message in it is ready again, in-flight ones included.

One attempt: load the message and its journal; send the recipients without a final outcome
through the router; journal every outcome durably; then remove the message (all delivered),
move it to failed/ (all final, some failed), or defer it with exponential backoff and jitter
until its lifetime runs out.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.bounce import build_dsn
from mailrelay.metrics import Metrics
from mailrelay.outbound.results import Kind, OutboundMessage
from mailrelay.outbound.router import RoutedResult, Router
from mailrelay.spool.format import CorruptSpoolFile, Envelope, Outcome, Status
from mailrelay.spool.store import Spool

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


def _attempts_in_journal(journal: list[Outcome], pending: tuple[str, ...]) -> int:
    """How many attempts the journal shows for the recipients still pending (after a restart)."""
    counts = [
        sum(1 for o in journal if o.recipient == r and o.status is Status.DEFERRED) for r in pending
    ]
    return max(counts, default=0)


async def _spool_dsn(spool: Spool, envelope: Envelope, dsn: bytes) -> str:
    writer = spool.open_writer(envelope)
    writer.write(dsn)
    return await writer.commit()


def _removable(envelope: Envelope, final: dict[str, Outcome]) -> bool:
    """Every recipient delivered: the message can leave the spool with no record kept."""
    return all(r in final and final[r].status is Status.DELIVERED for r in envelope.recipients)


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
        self._clock = clock
        self._spool = spool
        self._router = router
        self._policy = policy
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._rand = rand
        self._reporting_mta = reporting_mta
        self._ready: deque[str] = deque()
        self._deferred: list[tuple[float, str]] = []
        self._active: dict[str, defer.Deferred[None]] = {}
        self._attempts: dict[str, int] = {}
        self._timer: IDelayedCall | None = None
        self._running = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Queue every message already in the spool, then start delivering."""
        self._running = True
        orphans = self._spool.remove_orphan_journals()
        if orphans:
            self.log.info("removed {count} journal(s) of already removed messages", count=orphans)
        recovered = self._spool.queued_ids()
        self._ready.extend(recovered)
        if recovered:
            self.log.info("recovered {count} message(s) from the spool", count=len(recovered))
        self._pump()

    async def stop(self) -> None:
        """Stop starting attempts; close providers so running attempts end; wait for them."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        await self._router.close()
        await defer.DeferredList(list(self._active.values()))

    def depth(self) -> dict[str, int]:
        return {
            "ready": len(self._ready),
            "deferred": len(self._deferred),
            "active": len(self._active),
        }

    def enqueue(self, envelope: Envelope) -> None:
        """A message the inbound side has just made durable."""
        self._ready.append(envelope.queue_id)
        self._pump()

    # -- scheduling -------------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._running and self._ready and len(self._active) < self._max_in_flight:
            queue_id = self._ready.popleft()
            if queue_id in self._active:
                continue
            d = defer.Deferred.fromCoroutine(self._attempt(queue_id))
            self._active[queue_id] = d
            d.addErrback(self._attempt_crashed, queue_id)
            d.addBoth(self._attempt_done, queue_id)

    def _attempt_done(self, _: object, queue_id: str) -> None:
        self._active.pop(queue_id, None)
        self._pump()

    def _attempt_crashed(self, failure: Failure, queue_id: str) -> None:
        # A bug or an I/O error we did not foresee: the message stays in the spool and is
        # tried again later; the loop itself never dies.
        self.log.failure(
            "{queue_id} delivery attempt failed unexpectedly", failure, queue_id=queue_id
        )
        self._defer(queue_id, self._policy.initial)

    def _defer(self, queue_id: str, delay: float) -> None:
        heapq.heappush(self._deferred, (self._clock.seconds() + delay, queue_id))
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
            _, queue_id = heapq.heappop(self._deferred)
            self._ready.append(queue_id)
        self._pump()
        self._arm_timer()

    # -- one attempt ------------------------------------------------------------------------------

    async def _attempt(self, queue_id: str) -> None:
        try:
            stored, journal = await self._spool.load(queue_id)
        except FileNotFoundError:
            return  # removed meanwhile (by an operator): nothing to do
        except CorruptSpoolFile as e:
            self.log.error(
                "{queue_id} is corrupt, moved to corrupt/: {reason}",
                queue_id=queue_id,
                reason=str(e),
            )
            self._metrics.corrupt_files.inc()
            await self._spool.move_to_corrupt(queue_id)
            return
        envelope = stored.envelope
        final = {o.recipient: o for o in journal if o.status.is_final}
        pending = tuple(dict.fromkeys(r for r in envelope.recipients if r not in final))
        if queue_id not in self._attempts:
            self._attempts[queue_id] = _attempts_in_journal(journal, pending)

        if pending:
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
                # delivered), the removal (unlink + directory fsync, in _finish) is itself that
                # durable record, with the same crash window, so the journal write is skipped.
                await self._spool.append_journal(queue_id, unrecorded)
            self._report(queue_id, routed, self._clock.seconds() - started)

        still_pending = [r for r in pending if r not in final]
        if not still_pending:
            await self._finish(envelope, final, stored.body)
            return
        self._attempts[queue_id] += 1
        age = self._clock.seconds() - envelope.received_at
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
                age=age,
                count=len(expired),
            )
            final.update({o.recipient: o for o in expired})
            await self._finish(envelope, final, stored.body)
            return
        delay = self._policy.delay(self._attempts[queue_id], self._rand)
        self.log.info(
            "{queue_id} deferred: {count} recipient(s), next attempt in {delay:.0f}s",
            queue_id=queue_id,
            count=len(still_pending),
            delay=delay,
        )
        self._defer(queue_id, delay)

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
        for r in routed:
            result = r.result
            if result.kind is Kind.DELIVERED:
                self._metrics.recipients_delivered.labels(r.provider).inc()
                self.log.info(
                    "{queue_id} delivered to <{recipient}> via {provider}"
                    " in {elapsed:.3f}s: {reply}",
                    queue_id=queue_id,
                    recipient=result.recipient,
                    provider=r.provider,
                    elapsed=elapsed,
                    reply=result.reply,
                )
            elif result.kind is Kind.PERMANENT:
                self._metrics.recipients_failed.inc()
                self.log.warn(
                    "{queue_id} failed for <{recipient}> via {provider}: {reply}",
                    queue_id=queue_id,
                    recipient=result.recipient,
                    provider=r.provider,
                    reply=result.reply,
                )
            else:
                self._metrics.recipients_deferred.inc()
                if result.uncertain:
                    self._metrics.possible_duplicates.inc()
                    self.log.warn(
                        "{queue_id} <{recipient}>: connection lost after the final dot;"
                        " retrying, possible duplicate",
                        queue_id=queue_id,
                        recipient=result.recipient,
                    )

    async def _finish(self, envelope: Envelope, final: dict[str, Outcome], body: bytes) -> None:
        queue_id = envelope.queue_id
        self._attempts.pop(queue_id, None)
        failed = [o for o in final.values() if o.status is Status.FAILED]
        if failed and self._reporting_mta is not None and envelope.sender:
            # The DSN is durable in the spool before the original goes: it carries the reasons.
            # (Never to the null sender: a failing bounce is never bounced again.)
            dsn_id = await self._bounce(envelope, failed, body, self._reporting_mta)
            await self._spool.remove(queue_id)
            self._metrics.messages_bounced.inc()
            self.log.warn(
                "{queue_id} bounced: {count} recipient(s) failed permanently; DSN {dsn_id} to"
                " <{sender}>",
                queue_id=queue_id,
                count=len(failed),
                dsn_id=dsn_id,
                sender=envelope.sender,
            )
            return
        if failed:
            await self._spool.move_to_failed(queue_id)
            self._metrics.messages_failed.inc()
            self.log.warn(
                "{queue_id} moved to failed/: {count} recipient(s) failed permanently",
                queue_id=queue_id,
                count=len(failed),
            )
        else:
            await self._spool.remove(queue_id)
            self._metrics.messages_delivered.inc()
            self._metrics.delivery_seconds.observe(
                max(0.0, self._clock.seconds() - envelope.received_at)
            )
            self.log.info("{queue_id} done: every recipient delivered", queue_id=queue_id)

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
        self.enqueue(dsn_envelope)
        return queue_id
