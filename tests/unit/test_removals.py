"""DeliveredRemovals: delivered messages leave queue/ at once, durably a moment later, together."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from mailrelay.blocking import InlineRunner
from mailrelay.spool.removals import REMOVAL_SYNC_DELAY, REMOVAL_SYNC_RETRY, DeliveredRemovals
from mailrelay.spool.store import JOURNAL_SUFFIX, QUEUE, Spool
from tests.support.powerloss import PowerLossFS
from tests.unit.fakes import LogCapture, envelope, result_of, store


def qid(n: int) -> str:
    return f"{n:022d}"


class SyncRecorder:
    """Stands in for ``Spool.sync_area``: each call is recorded with how many messages were
    already gone from queue/ when it started, and fires only when the test says."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.calls: list[tuple[str, int]] = []
        self.pending: list[defer.Deferred[None]] = []

    def __call__(self, area: str) -> defer.Deferred[None]:
        self.calls.append((area, len(self.spool.queued_ids())))
        d: defer.Deferred[None] = defer.Deferred()
        self.pending.append(d)
        return d

    def finish(self, error: Exception | None = None) -> None:
        d = self.pending.pop(0)
        if error is None:
            d.callback(None)
        else:
            d.errback(error)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", InlineRunner())
    spool.prepare()
    return spool


def spooled(spool: Spool, *numbers: int) -> list[str]:
    return [store(spool, envelope(qid(n))) for n in numbers]


class Rig:
    """DeliveredRemovals on a real spool, with a Clock and the fsyncs of queue/ recorded."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.clock = Clock()
        self.syncs = SyncRecorder(spool)
        spool.sync_area = self.syncs  # type: ignore[method-assign]
        self.removals = DeliveredRemovals(self.clock, spool)

    def remove(self, queue_id: str) -> None:
        result_of(defer.Deferred.fromCoroutine(self.removals.remove(queue_id)))

    def flush(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.removals.flush())


@pytest.fixture
def rig(spool: Spool) -> Rig:
    return Rig(spool)


def test_a_removal_is_immediate_and_one_fsync_later_covers_every_removal_before_it(
    rig: Rig,
) -> None:
    clock, syncs, removals, spool = rig.clock, rig.syncs, rig.removals, rig.spool
    ids = spooled(spool, 1, 2, 3)
    (spool.queue / (ids[0] + JOURNAL_SUFFIX)).write_bytes(b"")  # a journal goes with it

    rig.remove(ids[0])
    assert spool.queued_ids() == ids[1:]  # gone at once (the queue goes on)
    assert not (spool.queue / (ids[0] + JOURNAL_SUFFIX)).exists()
    clock.advance(REMOVAL_SYNC_DELAY / 2)
    rig.remove(ids[1])
    assert syncs.calls == []  # nothing durable yet
    assert removals.pending == 2
    clock.advance(REMOVAL_SYNC_DELAY / 2)
    assert syncs.calls == [(QUEUE, 1)]  # one fsync, after both unlinks
    syncs.finish()
    assert removals.pending == 0
    assert clock.getDelayedCalls() == []  # nothing left to make durable: no timer


def test_a_removal_during_an_fsync_waits_for_the_next_one_due_a_delay_after_it(
    rig: Rig,
) -> None:
    clock, syncs, removals, spool = rig.clock, rig.syncs, rig.removals, rig.spool
    first, second = spooled(spool, 1, 2)
    rig.remove(first)
    clock.advance(REMOVAL_SYNC_DELAY)
    assert len(syncs.calls) == 1
    rig.remove(second)  # while that fsync runs: it may not cover this unlink
    syncs.finish()
    assert removals.pending == 1  # the second removal is not covered
    assert len(syncs.calls) == 1
    clock.advance(REMOVAL_SYNC_DELAY * 0.99)
    assert len(syncs.calls) == 1
    clock.advance(REMOVAL_SYNC_DELAY * 0.01)  # a delay after the second removal
    assert syncs.calls == [(QUEUE, 1), (QUEUE, 0)]
    syncs.finish()
    assert removals.pending == 0


def test_after_a_slow_fsync_the_next_one_starts_at_once(rig: Rig) -> None:
    clock, syncs, removals, spool = rig.clock, rig.syncs, rig.removals, rig.spool
    first, second = spooled(spool, 1, 2)
    rig.remove(first)
    clock.advance(REMOVAL_SYNC_DELAY)
    rig.remove(second)
    clock.advance(REMOVAL_SYNC_DELAY * 10)
    assert len(syncs.calls) == 1  # one fsync at a time
    syncs.finish()  # the second removal's delay ran out long ago
    clock.advance(0)
    assert syncs.calls == [(QUEUE, 1), (QUEUE, 0)]
    syncs.finish()
    assert removals.pending == 0


def test_a_failed_fsync_is_logged_and_tried_again(rig: Rig) -> None:
    clock, syncs, removals, spool = rig.clock, rig.syncs, rig.removals, rig.spool
    [queue_id] = spooled(spool, 1)
    rig.remove(queue_id)
    clock.advance(REMOVAL_SYNC_DELAY)
    with LogCapture() as logged:
        syncs.finish(OSError(5, "Input/output error"))
    [event] = logged.events
    assert event["log_level"] is LogLevel.error
    assert event["count"] == 1
    assert "Input/output error" in event["error"]
    assert "log_failure" not in event  # a disk error: no traceback
    assert removals.pending == 1
    [second] = spooled(spool, 2)
    rig.remove(second)  # during the wait: no earlier fsync for it
    clock.advance(REMOVAL_SYNC_RETRY - 0.01)
    assert len(syncs.calls) == 1
    clock.advance(0.01)
    assert syncs.calls == [(QUEUE, 0), (QUEUE, 0)]
    syncs.finish()
    assert removals.pending == 0
    assert clock.getDelayedCalls() == []


def test_a_failed_unlink_is_raised_and_nothing_is_pending(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, removals, spool = rig.clock, rig.removals, rig.spool
    [queue_id] = spooled(spool, 1)
    monkeypatch.setattr(spool, "unlink", lambda q: defer.fail(OSError(30, "Read-only")))
    d = defer.Deferred.fromCoroutine(removals.remove(queue_id))
    assert d.called
    failures: list[object] = []
    d.addErrback(failures.append)
    assert len(failures) == 1
    assert removals.pending == 0
    assert clock.getDelayedCalls() == []


def test_flush_makes_every_removal_durable_now_and_leaves_no_timer(rig: Rig) -> None:
    clock, syncs, removals, spool = rig.clock, rig.syncs, rig.removals, rig.spool
    first, second = spooled(spool, 1, 2)
    rig.remove(first)
    clock.advance(REMOVAL_SYNC_DELAY)
    rig.remove(second)  # the first fsync is running
    flushed = rig.flush()
    assert not flushed.called
    syncs.finish()  # the running one: the second removal still needs one of its own
    assert len(syncs.calls) == 2 and not flushed.called
    syncs.finish()
    assert flushed.called and removals.pending == 0
    assert len(syncs.calls) == 2
    assert clock.getDelayedCalls() == []


def test_flush_does_not_retry_an_fsync_that_failed_while_it_waited(rig: Rig) -> None:
    clock, syncs, removals, spool = rig.clock, rig.syncs, rig.removals, rig.spool
    [queue_id] = spooled(spool, 1)
    rig.remove(queue_id)
    clock.advance(REMOVAL_SYNC_DELAY)
    flushed = rig.flush()
    with LogCapture() as logged:
        syncs.finish(OSError(5, "Input/output error"))
    result_of(flushed)
    assert len(syncs.calls) == 1  # not fsynced again after a failure ("fsyncgate")
    assert removals.pending == 1
    [text] = [formatEvent(e) for e in logged.events]
    assert "not tried again: stopping" in text
    assert clock.getDelayedCalls() == []


def test_flush_with_nothing_pending_does_not_fsync(rig: Rig) -> None:
    result_of(rig.flush())
    assert rig.syncs.calls == []


def test_flush_logs_a_failed_fsync_and_stops_retrying(rig: Rig) -> None:
    clock, syncs, spool = rig.clock, rig.syncs, rig.spool
    [queue_id] = spooled(spool, 1)
    rig.remove(queue_id)
    flushed = rig.flush()
    with LogCapture() as logged:
        syncs.finish(OSError(28, "No space left on device"))
    result_of(flushed)  # the stop goes on
    assert [e["log_level"] for e in logged.events] == [LogLevel.error]
    text = formatEvent(logged.events[0])
    assert "removal of 1 delivered message(s) is not durable" in text
    assert "No space left on device" in text and "not tried again: stopping" in text
    assert clock.getDelayedCalls() == []  # no retry after the stop


def test_power_cut_brings_back_only_what_no_fsync_covered(tmp_path: Path) -> None:
    """On the power-loss model: a removal not yet made durable comes back after a cut; one
    the shared fsync covered does not."""
    base = tmp_path / "base"
    (base / "spool").mkdir(parents=True)
    fs = PowerLossFS(base)
    clock = Clock()
    spool = Spool(base / "spool", InlineRunner(), fs=fs)
    spool.prepare()
    removals = DeliveredRemovals(clock, spool)
    first, second = spooled(spool, 1, 2)
    result_of(defer.Deferred.fromCoroutine(removals.remove(first)))
    clock.advance(REMOVAL_SYNC_DELAY)  # covered
    result_of(defer.Deferred.fromCoroutine(removals.remove(second)))  # not yet
    fs.crash()
    assert sorted(p.name for p in (base / "spool" / QUEUE).iterdir()) == [second]
