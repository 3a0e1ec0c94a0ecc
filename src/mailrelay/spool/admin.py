"""Operator actions on the spool's files: what the queue commands do on disk.

Blocking, and only ever run by the lock holder: the daemon (in its I/O threads, updating its
in-memory index around each call) or a queue command on a stopped daemon's spool. One piece
of code serves both, so ``mailrelay queue hold`` means the same thing either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from mailrelay.spool.format import (
    CorruptSpoolFile,
    Envelope,
    Outcome,
    Status,
    decode_envelope,
    last_outcomes,
)
from mailrelay.spool.fs import NotRegularFile, open_regular_file
from mailrelay.spool.store import (
    CORRUPT,
    FAILED,
    HOLD,
    MESSAGE_AREAS,
    QUEUE,
    Spool,
)

# States a listed message can be in; "active" only the daemon knows (an attempt is running).
READY, DEFERRED, ACTIVE, HELD = "ready", "deferred", "active", "held"
_STATE_OF_AREA = {HOLD: HELD, FAILED: FAILED, CORRUPT: CORRUPT}
_ENVELOPE_PEEK = 64 * 1024


class QueueCommandError(Exception):
    """An operator request that cannot be done; ``code`` is stable, for scripts."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unknown_id(queue_id: str) -> QueueCommandError:
    return QueueCommandError("unknown-id", f"no message {queue_id} in the spool")


@attrs.frozen
class QueueEntry:
    """One line of ``mailrelay queue list``."""

    queue_id: str
    state: str
    received_at: float | None
    size: int
    sender: str | None
    recipients: int
    pending: int  # recipients without a final outcome
    next_attempt: float | None
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RequeueReport:
    requeued: list[str] = attrs.Factory(list)
    corrupt: list[tuple[str, str]] = attrs.Factory(list)  # (ID, why): moved to corrupt/
    left: list[tuple[str, str]] = attrs.Factory(list)  # (ID, why): left in failed/


def _state_in_queue(mtime: float, now: float) -> str:
    return DEFERRED if mtime > now else READY


def _last_error(journal: list[Outcome]) -> str | None:
    for outcome in reversed(journal):
        if outcome.status in (Status.DEFERRED, Status.FAILED):
            return outcome.reply
    return None


class SpoolAdmin:
    def __init__(self, spool: Spool, now: Callable[[], float]) -> None:
        self._spool = spool
        self._now = now

    @property
    def spool(self) -> Spool:
        return self._spool

    # -- reading ----------------------------------------------------------------------------------

    def _read_envelope(self, path: Path) -> Envelope:
        # corrupt/ keeps files others wrote: they can neither redirect nor block the read.
        try:
            fd, _ = open_regular_file(path)
        except NotRegularFile as e:
            raise CorruptSpoolFile(str(e)) from None
        with os.fdopen(fd, "rb") as f:
            head = f.read(_ENVELOPE_PEEK)
            try:
                return decode_envelope(head)
            except CorruptSpoolFile:
                if len(head) < _ENVELOPE_PEEK:
                    raise
                return decode_envelope(head + f.read())  # a very long recipient list

    def entry(self, queue_id: str, area: str, mtime: float, size: int) -> QueueEntry:
        path = self._spool.area(area) / queue_id
        state = _STATE_OF_AREA.get(area) or _state_in_queue(mtime, self._now())
        try:
            envelope = self._read_envelope(path)
        except CorruptSpoolFile as e:
            return QueueEntry(queue_id, CORRUPT, None, size, None, 0, 0, None, str(e))
        journal = self._spool.journal_now(queue_id, area)
        last = last_outcomes(journal)
        pending = sum(
            1
            for r in dict.fromkeys(envelope.recipients)
            if r not in last or not last[r].status.is_final
        )
        return QueueEntry(
            queue_id=queue_id,
            state=state,
            received_at=envelope.received_at,
            size=size,
            sender=envelope.sender,
            recipients=len(envelope.recipients),
            pending=pending,
            next_attempt=mtime if state == DEFERRED else None,
            last_error=_last_error(journal),
        )

    def listing(self, areas: tuple[str, ...] = MESSAGE_AREAS) -> list[QueueEntry]:
        """Every message in the given areas, oldest first."""
        entries = []
        for area in areas:
            directory = self._spool.area(area)
            for queue_id in self._spool.ids(area):
                try:
                    st = os.lstat(directory / queue_id)
                    entries.append(self.entry(queue_id, area, st.st_mtime, st.st_size))
                except FileNotFoundError:
                    continue  # delivered or moved while we looked
        entries.sort(key=lambda e: e.queue_id)
        return entries

    def find(self, queue_id: str, reconcile: bool = True) -> str:
        area = self._spool.area_of(queue_id)
        if area is None:
            raise unknown_id(queue_id)
        if reconcile:
            # A crash inside a move can leave the journal behind in another area; act only
            # with it beside its message, or a requeue could forget what was delivered.
            self._spool.reconcile_journal(queue_id)
        return area

    def show(self, queue_id: str) -> dict[str, Any]:
        """The envelope and every journal record of one message (reads only)."""
        area = self.find(queue_id, reconcile=False)
        path = self._spool.area(area) / queue_id
        st = os.lstat(path)
        summary = self.entry(queue_id, area, st.st_mtime, st.st_size)
        report: dict[str, Any] = summary.to_json()
        if summary.state == CORRUPT:
            report["history"] = []
            return report
        envelope = self._read_envelope(path)
        journal = self._spool.journal_now(queue_id, area)
        report.update(client=envelope.client, helo=envelope.helo, body_8bit=envelope.body_8bit)
        last = last_outcomes(journal)
        report["recipient_status"] = {
            r: last[r].status.value if r in last else "pending"
            for r in dict.fromkeys(envelope.recipients)
        }
        report["history"] = [
            {
                "recipient": o.recipient,
                "status": o.status.value,
                "reply": o.reply,
                "provider": o.provider,
                "at": o.at,
                "uncertain": o.uncertain,
            }
            for o in journal
        ]
        return report

    # -- acting -----------------------------------------------------------------------------------

    def _require(self, queue_id: str, *areas: str) -> str:
        area = self.find(queue_id)
        if area not in areas:
            state = _STATE_OF_AREA.get(area, "queued")
            wanted = " or ".join(_STATE_OF_AREA.get(a, "queued") for a in areas)
            raise QueueCommandError("wrong-state", f"{queue_id} is {state}, not {wanted}")
        return area

    def hold(self, queue_id: str) -> None:
        self._require(queue_id, QUEUE)
        self._spool.move_now(queue_id, QUEUE, HOLD)

    def release(self, queue_id: str) -> None:
        self._require(queue_id, HOLD)
        self._spool.move_now(queue_id, HOLD, QUEUE)
        self._spool.set_next_attempt_now(queue_id, self._now())

    def retry(self, queue_id: str) -> str:
        """Try a queued message now, or requeue a dead letter; returns what was done."""
        area = self._require(queue_id, QUEUE, FAILED)
        if area == FAILED:
            self.requeue(queue_id)
            return "requeued"
        self._spool.set_next_attempt_now(queue_id, self._now())
        return "scheduled"

    def requeue(self, queue_id: str) -> None:
        """A dead letter back to the queue: its failed recipients are pending again (with a
        fresh attempt count and lifetime); the delivered ones are never sent again."""
        self._require(queue_id, FAILED)
        envelope = self._read_envelope(self._spool.failed / queue_id)
        last = last_outcomes(self._spool.journal_now(queue_id, FAILED))
        now = self._now()
        again = [
            Outcome(r, Status.REQUEUED, "requeued by the operator", None, now)
            for r in dict.fromkeys(envelope.recipients)
            if r not in last or last[r].status is not Status.DELIVERED
        ]
        # Journal first, in failed/: a crash before the move leaves a dead letter whose
        # requeue can simply be repeated.
        self._spool.append_journal_now(queue_id, again, area=FAILED)
        self._spool.move_now(queue_id, FAILED, QUEUE)
        self._spool.set_next_attempt_now(queue_id, now)

    def requeue_failed(self) -> RequeueReport:
        """Requeue every dead letter; one that cannot be (damaged: moved to corrupt/; gone or
        unmovable: left) never stops the rest."""
        report = RequeueReport()
        for queue_id in self._spool.ids(FAILED):
            try:
                self.requeue(queue_id)
            except CorruptSpoolFile as e:
                self._spool.move_now(queue_id, FAILED, CORRUPT)
                report.corrupt.append((queue_id, str(e)))
                continue
            except (QueueCommandError, OSError) as e:
                report.left.append((queue_id, str(e)))
                continue
            report.requeued.append(queue_id)
        return report

    def delete(self, queue_id: str) -> str:
        area = self.find(queue_id)
        self._spool.remove_now(queue_id, area)
        return area

    def flush(self) -> list[str]:
        """Every deferred message in queue/ becomes due now; returns their IDs."""
        now = self._now()
        due = [queue_id for queue_id, mtime in self._spool.scan(QUEUE) if mtime > now]
        for queue_id in due:
            self._spool.set_next_attempt_now(queue_id, now)
        return due
