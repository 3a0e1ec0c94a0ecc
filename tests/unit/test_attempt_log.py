"""The spool's attempt log: one shared, append-only file of (queue ID, time) markers, written
before each delivery attempt without fsync, read at the next start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet import defer

from mailrelay.blocking import InlineRunner
from mailrelay.outbound.results import Kind
from mailrelay.spool.format import (
    ATTEMPTS_MAGIC,
    Outcome,
    Status,
    attempt_done_record,
    attempt_record,
    decode_journal,
    read_attempt_log,
)
from mailrelay.spool.fs import FileSystem
from mailrelay.spool.store import HOLD, JOURNAL_SUFFIX, QUEUE, Spool
from tests.support.powerloss import PowerLossFS
from tests.unit.fakes import (
    FakeProvider,
    answer_all,
    envelope,
    make_spool,
    result_of,
    store,
)
from tests.unit.test_queue import (
    POLICY,
    A,
    World,
    add_with_first_journal_write_failing,
    qid,
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path)


def put(spool: Spool, n: int, area: str = QUEUE) -> str:
    queue_id = store(spool, envelope(qid(n)))
    if area != QUEUE:
        spool.move_now(queue_id, QUEUE, area)
    return queue_id


# -- the format -----------------------------------------------------------------------------------


def test_records_round_trip_and_the_latest_marker_wins() -> None:
    data = ATTEMPTS_MAGIC + b"".join(
        attempt_record(q, t) for q, t in [(qid(1), 1.5), (qid(2), 2.0), (qid(1), 3.25)]
    )
    assert read_attempt_log(data) == {qid(1): 3.25, qid(2): 2.0}


def test_an_attempt_that_ended_leaves_no_marker() -> None:
    data = ATTEMPTS_MAGIC + b"".join(
        [
            attempt_record(qid(1), 1.0),
            attempt_record(qid(2), 2.0),
            attempt_done_record(qid(1)),
            attempt_done_record(qid(2)),
            attempt_record(qid(2), 3.0),  # tried again: this one was interrupted
        ]
    )
    assert read_attempt_log(data) == {qid(2): 3.0}


@pytest.mark.parametrize("cut", range(1, 39))
def test_a_torn_tail_keeps_the_valid_prefix(cut: int) -> None:
    whole = ATTEMPTS_MAGIC + attempt_record(qid(1), 1.0)
    last = attempt_record(qid(2), 2.0)
    assert len(last) == 39
    assert read_attempt_log(whole + last[:cut]) == {qid(1): 1.0}


@pytest.mark.parametrize(
    "data",
    [b"", ATTEMPTS_MAGIC[:7], ATTEMPTS_MAGIC, b"garbage\x00\xff" * 10],
    ids=["empty", "torn-magic", "magic-only", "garbage"],
)
def test_an_empty_or_foreign_log_has_no_markers(data: bytes) -> None:
    assert read_attempt_log(data) == {}


def test_damage_ends_the_log_where_it_starts() -> None:
    first, second = attempt_record(qid(1), 1.0), attempt_record(qid(2), 2.0)
    flipped = bytearray(second)
    flipped[10] ^= 0x01
    data = ATTEMPTS_MAGIC + first + bytes(flipped) + attempt_record(qid(3), 3.0)
    assert read_attempt_log(data) == {qid(1): 1.0}


# -- the spool ------------------------------------------------------------------------------------


def test_marks_round_trip_through_a_restart(spool: Spool, tmp_path: Path) -> None:
    one, two = put(spool, 1), put(spool, 2)
    assert spool.open_attempt_log() == {}
    spool.mark_attempt(one, 10.0)
    spool.mark_attempt(two, 11.0)
    spool.mark_attempt(one, 12.5)
    assert read_attempt_log(spool.attempts.read_bytes()) == {one: 12.5, two: 11.0}
    assert spool.attempts.stat().st_mode & 0o777 == 0o600
    spool.mark_attempt_done(two)
    spool.close_attempt_log()  # (a crash leaves the same bytes: no fsync is involved)

    again = make_spool(tmp_path)
    assert again.open_attempt_log() == {one: 12.5}
    # The fresh log holds the markers it returned, and takes new ones after them.
    assert again.attempts.stat().st_size == len(ATTEMPTS_MAGIC) + 39
    again.mark_attempt(two, 20.0)
    assert read_attempt_log(again.attempts.read_bytes()) == {one: 12.5, two: 20.0}
    assert not any(p.name.startswith(".attempts") for p in tmp_path.iterdir())
    again.close_attempt_log()


def test_a_torn_tail_is_dropped_at_start_and_later_marks_are_read(spool: Spool) -> None:
    one, two = put(spool, 1), put(spool, 2)
    spool.attempts.write_bytes(
        ATTEMPTS_MAGIC + attempt_record(one, 1.0) + attempt_record(two, 2.0)[:20]
    )
    assert spool.open_attempt_log() == {one: 1.0}
    spool.mark_attempt(two, 3.0)
    spool.close_attempt_log()
    assert read_attempt_log(spool.attempts.read_bytes()) == {one: 1.0, two: 3.0}


def test_start_keeps_only_markers_of_messages_still_spooled(spool: Spool) -> None:
    queued, held, failed = put(spool, 1), put(spool, 2, HOLD), put(spool, 3, "failed")
    gone = qid(4)  # delivered and removed
    records = [(queued, 1.0), (held, 2.0), (failed, 3.0), (gone, 4.0), ("../queue", 5.0)]
    spool.attempts.write_bytes(ATTEMPTS_MAGIC + b"".join(attempt_record(q, t) for q, t in records))
    kept = {queued: 1.0, held: 2.0}  # a held message may have been interrupted too
    assert spool.open_attempt_log() == kept
    assert read_attempt_log(spool.attempts.read_bytes()) == kept
    spool.close_attempt_log()


def test_rotation_keeps_only_the_markers_passed_in(spool: Spool) -> None:
    spool.attempt_log_limit = 200
    spool.open_attempt_log()
    n = 0
    while not spool.attempt_log_full():
        n += 1
        spool.mark_attempt(qid(n), float(n))
    assert n == 5  # 21 bytes of magic, then 39 a record
    spool.rotate_attempt_log({qid(2): 2.0, qid(5): 5.0})
    assert not spool.attempt_log_full()
    spool.mark_attempt(qid(6), 6.0)
    assert read_attempt_log(spool.attempts.read_bytes()) == {qid(2): 2.0, qid(5): 5.0, qid(6): 6.0}
    assert spool.attempts.stat().st_size == len(ATTEMPTS_MAGIC) + 3 * 39
    spool.close_attempt_log()


class ShortWrites(FileSystem):
    """Writes only part of what it is given, once (a disk that just filled up)."""

    short = False

    def write(self, fd: int, data: bytes) -> int:
        if self.short:
            self.short = False
            return os.write(fd, data[:10])
        return os.write(fd, data)


def test_a_short_write_is_cut_off_so_later_marks_are_still_read(tmp_path: Path) -> None:
    fs = ShortWrites()
    spool = Spool(tmp_path, InlineRunner(), fs=fs)
    spool.prepare()
    spool.open_attempt_log()
    spool.mark_attempt(qid(1), 1.0)
    fs.short = True
    with pytest.raises(OSError, match="short write"):
        spool.mark_attempt(qid(2), 2.0)
    spool.mark_attempt(qid(3), 3.0)
    spool.close_attempt_log()
    assert read_attempt_log(spool.attempts.read_bytes()) == {qid(1): 1.0, qid(3): 3.0}


def test_a_power_cut_loses_unsynced_markers_but_nothing_else(tmp_path: Path) -> None:
    base = tmp_path / "disk"
    (base / "spool").mkdir(parents=True)
    fs = PowerLossFS(base)
    spool = Spool(base / "spool", InlineRunner(), fs=fs)
    spool.prepare()
    queue_id = store(spool, envelope(qid(1), (A, "b@example.test")))
    outcome = Outcome(A, Status.DELIVERED, "250 ok", "p1", 5.0)
    spool.open_attempt_log()
    spool.mark_attempt(queue_id, 4.0)
    spool.append_journal_now(queue_id, [outcome])
    spool.mark_attempt(queue_id, 6.0)
    assert read_attempt_log(spool.attempts.read_bytes()) == {queue_id: 6.0}  # a process crash
    fs.crash()

    after = Spool(base / "spool", InlineRunner(), fs=PowerLossFS(base))
    after.prepare()
    assert after.open_attempt_log() == {}  # under-counting, the documented cost
    message, journal = after.load_now(queue_id)
    assert message.envelope.recipients == (A, "b@example.test")
    assert journal == [outcome]
    assert decode_journal((after.queue / (queue_id + JOURNAL_SUFFIX)).read_bytes()) == [outcome]
    after.mark_attempt(queue_id, 7.0)
    assert read_attempt_log(after.attempts.read_bytes()) == {queue_id: 7.0}
    after.close_attempt_log()


# -- the queue ------------------------------------------------------------------------------------


def test_the_queue_rotates_keeping_running_attempts_and_unused_markers(tmp_path: Path) -> None:
    slow = FakeProvider("p1", hold=True)
    w = World(tmp_path, slow)
    held = w.put(90)
    w.spool.move_now(held, QUEUE, HOLD)
    w.spool.attempts.write_bytes(ATTEMPTS_MAGIC + attempt_record(held, 0.5))  # the last life's
    w.spool.attempt_log_limit = 300
    w.start()
    w.clock.advance(1)
    running = w.add(1)  # its delivery is held: the attempt runs until released
    slow.hold = False
    for n in range(2, 12):
        w.clock.advance(1)
        w.add(n)
    assert len(slow.delivered) == 11 and w.queued() == [running]

    assert read_attempt_log(w.spool.attempts.read_bytes()) == {
        running: 1.0,  # still running: kept through every rotation
        held: 0.5,  # interrupted in the last life, not acted on yet (on hold): kept too
    }
    assert w.spool.attempts.stat().st_size <= 300
    assert qid(2).encode() not in w.spool.attempts.read_bytes()  # finished long ago

    # Released, the held message's first attempt in this life counts it as interrupted.
    result_of(defer.Deferred.fromCoroutine(w.queue.release(held)))
    assert w.metric("mailrelay_possible_duplicates_total") == 1
    slow.release()
    assert w.queued() == []
    result_of(w.stop())


def test_a_clean_stop_leaves_no_interrupted_attempt(tmp_path: Path) -> None:
    slow = FakeProvider("p1", hold=True)
    w = World(tmp_path, slow)
    w.start()
    queue_id = w.add(1, (A, "b@example.test"))
    assert read_attempt_log(w.spool.attempts.read_bytes()) == {queue_id: 0.0}
    stopping = w.stop()
    slow.release()  # (closing the router ends the running attempt)
    result_of(stopping)
    assert read_attempt_log(w.spool.attempts.read_bytes()) == {}

    after = World(tmp_path)
    after.clock.advance(10)
    after.start()
    assert after.queued() == []
    assert after.metric("mailrelay_possible_duplicates_total") == 0
    result_of(after.stop())


def test_an_attempt_that_failed_unexpectedly_is_counted_at_its_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmp_path)
    w.start()
    queue_id = add_with_first_journal_write_failing(w, monkeypatch)
    # The attempt never ended: its marker stays (a restart would count it too).
    assert read_attempt_log(w.spool.attempts.read_bytes()) == {queue_id: 0.0}
    assert w.metric("mailrelay_possible_duplicates_total") == 0
    w.providers[0].answer = answer_all(Kind.DELIVERED)
    w.clock.advance(POLICY.initial)
    assert w.queued() == []
    # Nothing was recorded for A nor B: both may have been delivered twice.
    assert w.metric("mailrelay_possible_duplicates_total") == 2
    assert read_attempt_log(w.spool.attempts.read_bytes()) == {}


def test_mail_accepted_before_the_attempt_log_opens_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found with 100 000 queued messages: the start-up scan takes a while, the listeners
    already accept, and attempts that started before the log was open all failed (and waited
    for the retry delay)."""
    w = World(tmp_path)
    real_run = w.spool.run
    opening: defer.Deferred[None] = defer.Deferred()

    def run(f, *args):  # type: ignore[no-untyped-def]
        if f == w.spool.open_attempt_log:
            return opening.addCallback(lambda _: real_run(f, *args))
        return real_run(f, *args)

    monkeypatch.setattr(w.spool, "run", run)
    starting = defer.Deferred.fromCoroutine(w.queue.start())
    queue_id = w.add(1)  # accepted now, while start() waits for the log
    assert w.providers[0].delivered == []
    opening.callback(None)
    result_of(starting)
    assert [m.queue_id for m in w.providers[0].delivered] == [queue_id]
    assert w.queued() == []
