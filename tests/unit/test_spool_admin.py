"""SpoolAdmin (what the queue commands do on disk) and the spool store under it: the lock,
reconciling journals left behind by a crash, scan and area_of. No queue, no reactor."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from mailrelay.spool.admin import QueueCommandError, SpoolAdmin
from mailrelay.spool.format import TAG_OUTCOME, Outcome, Status, decode_journal, record
from mailrelay.spool.store import (
    CORRUPT,
    FAILED,
    HOLD,
    JOURNAL_SUFFIX,
    MESSAGE_AREAS,
    QUEUE,
    Spool,
    SpoolBusy,
)
from tests.unit.fakes import envelope, make_spool, store

NOW = 1000.0
LATER = 5000.0  # a next attempt time in the future
A, B, C = "a@example.test", "b@example.test", "c@example.test"
BAD_IDS = [
    "",
    ".",
    "..",
    "../queue",
    "../x",
    "queue",
    "lock",
    "0000000000000000000001.journal",
    "000000000000000000001",  # 21 digits
    "00000000000000000000001",  # 23 digits
    "abcdefabcdefabcdefabcd",  # our IDs are upper-case
    "000000000000000000000G",
]


def qid(n: int) -> str:
    return f"{n:022X}"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path / "spool", now=lambda: NOW)


@pytest.fixture
def admin(spool: Spool) -> SpoolAdmin:
    return SpoolAdmin(spool, lambda: NOW)


def put(
    spool: Spool,
    n: int,
    recipients: Sequence[str] = (A,),
    *,
    area: str = QUEUE,
    next_attempt: float = NOW,
    journal: Sequence[tuple[str, Status, str]] = (),
) -> str:
    """A message with the given journal records, in ``area``, due at ``next_attempt``."""
    queue_id = store(spool, envelope(qid(n), recipients, received_at=100.0))
    if journal:
        outcomes = [Outcome(r, status, reply, "p1", 200.0) for r, status, reply in journal]
        spool.append_journal_now(queue_id, outcomes)
    os.utime(spool.queue / queue_id, (next_attempt, next_attempt))
    if area != QUEUE:
        spool.move_now(queue_id, QUEUE, area)
    return queue_id


def dead_letter(spool: Spool, n: int, recipients: Sequence[str] = (A, B, C)) -> str:
    """A dead letter whose first recipient was delivered and the others failed for good."""
    first, *rest = recipients
    journal = [(first, Status.DELIVERED, "250 ok")]
    journal += [(r, Status.FAILED, "550 no such user") for r in dict.fromkeys(rest)]
    return put(spool, n, recipients, area=FAILED, journal=journal)


def files(spool: Spool, area: str) -> list[str]:
    return sorted(p.name for p in spool.area(area).iterdir())


def journal_of(spool: Spool, queue_id: str, area: str = QUEUE) -> list[tuple[str, Status]]:
    data = (spool.area(area) / (queue_id + JOURNAL_SUFFIX)).read_bytes()
    return [(o.recipient, o.status) for o in decode_journal(data)]


def mtime(spool: Spool, queue_id: str, area: str = QUEUE) -> float:
    return os.stat(spool.area(area) / queue_id).st_mtime


def refused(call: object, *args: str) -> QueueCommandError:
    assert callable(call)
    with pytest.raises(QueueCommandError) as info:
        call(*args)
    return info.value


# -- the spool lock -------------------------------------------------------------------------------


def test_second_lock_on_a_spool_is_refused_naming_the_first_holder(spool: Spool) -> None:
    first = spool.lock("mailrelay daemon")
    try:
        with pytest.raises(SpoolBusy) as info:
            spool.lock("queue command")
        message = str(info.value)
        assert f"pid {os.getpid()}, mailrelay daemon" in message
        assert str(spool.root) in message
        # The refused attempt did not overwrite the holder's line.
        assert (spool.root / "lock").read_text() == f"pid {os.getpid()}, mailrelay daemon\n"
    finally:
        first.release()


def test_lock_can_be_taken_again_after_release(spool: Spool) -> None:
    first = spool.lock("mailrelay daemon")
    first.release()
    first.release()  # harmless
    second = spool.lock("queue command")
    try:
        assert (spool.root / "lock").read_text() == f"pid {os.getpid()}, queue command\n"
    finally:
        second.release()


def test_two_locks_in_one_process_conflict(spool: Spool) -> None:
    """flock belongs to the open file description, not the process: each SpoolLock opens the
    file anew, so even the same process cannot take the lock twice."""
    first = spool.lock("one")
    try:
        with pytest.raises(SpoolBusy):
            spool.lock("two")
    finally:
        first.release()


def test_lock_held_by_another_process_is_refused_and_freed_when_it_exits(spool: Spool) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from mailrelay.spool.store import SpoolLock;"
            " lock = SpoolLock(Path(sys.argv[1]), 'other daemon'); print('locked', flush=True);"
            " sys.stdin.read()",
            str(spool.root),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(SpoolBusy) as info:
            spool.lock("queue command")
        assert f"pid {child.pid}, other daemon" in str(info.value)
        child.stdin.close()  # the child exits without releasing: the kernel drops the flock
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lock = spool.lock("queue command")
    lock.release()


# -- reconciling journals at start ----------------------------------------------------------------


@pytest.mark.parametrize("home", [HOLD, FAILED, CORRUPT])
def test_journal_left_in_queue_follows_its_message(spool: Spool, home: str) -> None:
    queue_id = put(spool, 1, journal=[(A, Status.DEFERRED, "451 later")])
    os.rename(spool.queue / queue_id, spool.area(home) / queue_id)  # a crash mid-move

    assert spool.reconcile_journals() == 1

    assert files(spool, QUEUE) == []
    assert files(spool, home) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert journal_of(spool, queue_id, home) == [(A, Status.DEFERRED)]


def test_journal_left_in_hold_follows_its_message_back_to_queue(spool: Spool) -> None:
    queue_id = put(spool, 1, area=HOLD, journal=[(A, Status.DEFERRED, "451 later")])
    os.rename(spool.hold / queue_id, spool.queue / queue_id)  # a crash mid-release

    assert spool.reconcile_journals() == 1

    assert files(spool, HOLD) == []
    assert files(spool, QUEUE) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert journal_of(spool, queue_id) == [(A, Status.DEFERRED)]


@pytest.mark.parametrize("area", MESSAGE_AREAS)
def test_journal_whose_message_is_gone_is_deleted(spool: Spool, area: str) -> None:
    queue_id = put(spool, 1, area=area, journal=[(A, Status.DELIVERED, "250 ok")])
    (spool.area(area) / queue_id).unlink()  # a crash inside a removal

    assert spool.reconcile_journals() == 1

    assert all(files(spool, a) == [] for a in MESSAGE_AREAS)


def test_reconcile_leaves_journals_beside_their_messages_alone(spool: Spool) -> None:
    for n, area in enumerate(MESSAGE_AREAS, start=1):
        put(spool, n, area=area, journal=[(A, Status.DEFERRED, "451 later")])
    before = {area: files(spool, area) for area in MESSAGE_AREAS}
    assert spool.reconcile_journals() == 0
    assert {area: files(spool, area) for area in MESSAGE_AREAS} == before


def test_reconcile_returns_how_many_journals_it_handled(spool: Spool) -> None:
    moved = put(spool, 1, journal=[(A, Status.DEFERRED, "451")])
    os.rename(spool.queue / moved, spool.failed / moved)
    back = put(spool, 2, area=HOLD, journal=[(A, Status.DEFERRED, "451")])
    os.rename(spool.hold / back, spool.queue / back)
    gone = put(spool, 3, journal=[(A, Status.DEFERRED, "451")])
    (spool.queue / gone).unlink()
    put(spool, 4, journal=[(A, Status.DEFERRED, "451")])  # in order

    assert spool.reconcile_journals() == 3

    assert files(spool, QUEUE) == [back, back + JOURNAL_SUFFIX, qid(4), qid(4) + JOURNAL_SUFFIX]
    assert files(spool, FAILED) == [moved, moved + JOURNAL_SUFFIX]
    assert files(spool, HOLD) == []
    assert spool.reconcile_journals() == 0


# -- scan, ids and area_of ------------------------------------------------------------------------


def test_scan_lists_messages_with_their_mtimes_and_skips_journals_and_dot_files(
    spool: Spool,
) -> None:
    due = put(spool, 1, next_attempt=NOW)
    later = put(spool, 2, next_attempt=LATER, journal=[(A, Status.DEFERRED, "451")])
    (spool.queue / ".nfs0000001").write_bytes(b"an NFS leftover")
    (spool.queue / ".hidden").write_bytes(b"")
    (spool.queue / (qid(9) + JOURNAL_SUFFIX)).write_bytes(b"an orphan journal")

    assert sorted(spool.scan(QUEUE)) == [(due, NOW), (later, LATER)]
    assert spool.ids(QUEUE) == [due, later]
    assert spool.scan(HOLD) == []


@pytest.mark.parametrize("area", MESSAGE_AREAS)
def test_area_of_names_the_area_that_holds_the_message(spool: Spool, area: str) -> None:
    queue_id = put(spool, 1, area=area)
    assert spool.area_of(queue_id) == area


def test_area_of_a_missing_message_is_none_even_if_its_journal_is_there(spool: Spool) -> None:
    assert spool.area_of(qid(1)) is None
    (spool.queue / (qid(1) + JOURNAL_SUFFIX)).write_bytes(b"")
    assert spool.area_of(qid(1)) is None


@pytest.mark.parametrize("name", BAD_IDS)
def test_area_of_a_name_that_is_no_queue_id_is_none(spool: Spool, name: str) -> None:
    put(spool, 1)
    assert spool.area_of(name) is None


def test_area_of_ignores_a_file_whose_name_is_no_queue_id(spool: Spool) -> None:
    (spool.queue / "abcdefabcdefabcdefabcd").write_bytes(b"")
    assert spool.area_of("abcdefabcdefabcdefabcd") is None


# -- listing and show -----------------------------------------------------------------------------


def test_listing_gives_every_area_oldest_first_with_its_state(
    spool: Spool, admin: SpoolAdmin
) -> None:
    ready = put(spool, 1, next_attempt=NOW)
    history = [
        (A, Status.DELIVERED, "250 ok"),
        (B, Status.DEFERRED, "451 4.3.0 first"),
        (B, Status.DEFERRED, "452 4.2.2 second"),
    ]
    deferred = put(spool, 2, (A, B), next_attempt=LATER, journal=history)
    held = put(spool, 3, area=HOLD, next_attempt=LATER, journal=[(A, Status.DEFERRED, "451")])
    dead = dead_letter(spool, 4)
    corrupt = put(spool, 5, area=CORRUPT)

    entries = admin.listing()

    assert [(e.queue_id, e.state) for e in entries] == [
        (ready, "ready"),
        (deferred, "deferred"),
        (held, "held"),
        (dead, "failed"),
        (corrupt, "corrupt"),
    ]
    by_id = {e.queue_id: e for e in entries}
    assert [by_id[i].next_attempt for i in (ready, deferred, held, dead, corrupt)] == [
        None,
        LATER,
        None,
        None,
        None,
    ]
    assert [(by_id[i].recipients, by_id[i].pending) for i in (ready, deferred, dead)] == [
        (1, 1),
        (2, 1),
        (3, 0),
    ]
    assert by_id[deferred].last_error == "452 4.2.2 second"
    assert by_id[dead].last_error == "550 no such user"
    assert by_id[ready].last_error is None
    assert (by_id[ready].sender, by_id[ready].received_at) == ("sender@example.test", 100.0)
    assert by_id[ready].size == (spool.queue / ready).stat().st_size
    assert admin.listing(areas=(HOLD,)) == [by_id[held]]


def test_last_error_and_history_skip_sending_markers_of_an_older_version(
    spool: Spool, admin: SpoolAdmin
) -> None:
    queue_id = put(spool, 1, (A, B), journal=[(A, Status.DEFERRED, "451 4.3.0 try later")])
    # Earlier versions appended "sending" records before each attempt: an upgraded spool
    # still has them, and the records after them must count.
    legacy = b'{"recipient":"%s","status":"sending","reply":"attempt started","provider":null,'
    legacy += b'"at":1.0,"uncertain":false}'
    with (spool.queue / (queue_id + JOURNAL_SUFFIX)).open("ab") as f:
        f.write(record(TAG_OUTCOME, legacy % A.encode()))
        f.write(record(TAG_OUTCOME, legacy % B.encode()))
    spool.append_journal_now(queue_id, [Outcome(B, Status.DELIVERED, "250 ok", "p1", 2.0)])

    [entry] = admin.listing()
    assert (entry.last_error, entry.pending) == ("451 4.3.0 try later", 1)
    report = admin.show(queue_id)
    assert report["recipient_status"] == {A: "deferred", B: "delivered"}
    assert [h["status"] for h in report["history"]] == ["deferred", "delivered"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"garbage bytes \x00\xff", "bad magic line"),
        (b"", "empty file"),
        (b"MAILRELAY-SPOOL 1\nE\x00\x00\x01", "truncated record header"),
        (b"\xde\xad" * 40_000, "bad magic line"),  # longer than the envelope peek
    ],
    ids=["garbage", "empty", "truncated", "long-garbage"],
)
def test_listing_reports_a_corrupt_file_without_raising(
    spool: Spool, admin: SpoolAdmin, content: bytes, reason: str
) -> None:
    good = put(spool, 1)
    bad = put(spool, 2)
    (spool.queue / bad).write_bytes(content)

    entries = admin.listing()

    assert [e.queue_id for e in entries] == [good, bad]
    entry = entries[1]
    assert entry.state == "corrupt"
    assert entry.last_error is not None and reason in entry.last_error
    assert (entry.sender, entry.received_at, entry.recipients, entry.pending) == (None, None, 0, 0)
    assert entries[0].state == "ready"
    report = admin.show(bad)
    assert (report["state"], report["history"]) == ("corrupt", [])


def test_a_huge_envelope_is_still_read(spool: Spool, admin: SpoolAdmin) -> None:
    recipients = [f"recipient-{n:05d}@example.test" for n in range(4000)]
    queue_id = put(spool, 1, recipients)
    assert len(envelope(qid(1), recipients).to_json()) > 64 * 1024

    [entry] = admin.listing()
    assert (entry.state, entry.recipients, entry.pending) == ("ready", 4000, 4000)
    report = admin.show(queue_id)
    assert len(report["recipient_status"]) == 4000
    assert set(report["recipient_status"].values()) == {"pending"}


def test_show_gives_the_envelope_and_the_whole_history(spool: Spool, admin: SpoolAdmin) -> None:
    history = [
        (A, Status.DELIVERED, "250 ok"),
        (B, Status.DEFERRED, "451 later"),
    ]
    queue_id = put(spool, 1, (A, B, C), next_attempt=LATER, journal=history)

    report = admin.show(queue_id)

    assert report["state"] == "deferred"
    assert report["next_attempt"] == LATER
    assert (report["client"], report["helo"], report["body_8bit"]) == (
        "127.0.0.1",
        "client.test",
        False,
    )
    assert report["recipient_status"] == {A: "delivered", B: "deferred", C: "pending"}
    assert [(h["recipient"], h["status"], h["reply"]) for h in report["history"]] == [
        (A, "delivered", "250 ok"),
        (B, "deferred", "451 later"),
    ]
    assert report["history"][0]["provider"] == "p1"
    assert report["history"][0]["uncertain"] is False


def test_show_of_an_unknown_id(admin: SpoolAdmin) -> None:
    error = refused(admin.show, qid(7))
    assert (error.code, error.message) == ("unknown-id", f"no message {qid(7)} in the spool")


# -- hold and release -----------------------------------------------------------------------------


def test_hold_moves_the_message_and_its_journal(spool: Spool, admin: SpoolAdmin) -> None:
    queue_id = put(spool, 1, next_attempt=LATER, journal=[(A, Status.DEFERRED, "451")])
    admin.hold(queue_id)
    assert files(spool, QUEUE) == []
    assert files(spool, HOLD) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert journal_of(spool, queue_id, HOLD) == [(A, Status.DEFERRED)]


@pytest.mark.parametrize(
    ("area", "state"), [(HOLD, "held"), (FAILED, "failed"), (CORRUPT, "corrupt")]
)
def test_hold_refuses_a_message_outside_the_queue(
    spool: Spool, admin: SpoolAdmin, area: str, state: str
) -> None:
    queue_id = put(spool, 1, area=area)
    error = refused(admin.hold, queue_id)
    assert (error.code, error.message) == ("wrong-state", f"{queue_id} is {state}, not queued")
    assert files(spool, area) == [queue_id]


def test_release_puts_the_message_back_due_now(spool: Spool, admin: SpoolAdmin) -> None:
    queue_id = put(spool, 1, area=HOLD, next_attempt=LATER, journal=[(A, Status.DEFERRED, "4")])
    admin.release(queue_id)
    assert files(spool, HOLD) == []
    assert files(spool, QUEUE) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert mtime(spool, queue_id) == NOW
    assert [e.state for e in admin.listing()] == ["ready"]


@pytest.mark.parametrize(
    ("area", "state"), [(QUEUE, "queued"), (FAILED, "failed"), (CORRUPT, "corrupt")]
)
def test_release_refuses_a_message_that_is_not_held(
    spool: Spool, admin: SpoolAdmin, area: str, state: str
) -> None:
    queue_id = put(spool, 1, area=area)
    error = refused(admin.release, queue_id)
    assert (error.code, error.message) == ("wrong-state", f"{queue_id} is {state}, not held")


# -- retry and requeue ----------------------------------------------------------------------------


def test_retry_of_a_deferred_message_makes_it_due_now(spool: Spool, admin: SpoolAdmin) -> None:
    queue_id = put(spool, 1, next_attempt=LATER)
    assert admin.retry(queue_id) == "scheduled"
    assert mtime(spool, queue_id) == NOW
    assert files(spool, QUEUE) == [queue_id]


def test_retry_of_a_dead_letter_requeues_it(spool: Spool, admin: SpoolAdmin) -> None:
    queue_id = dead_letter(spool, 1)
    assert admin.retry(queue_id) == "requeued"
    assert files(spool, FAILED) == []
    assert files(spool, QUEUE) == [queue_id, queue_id + JOURNAL_SUFFIX]


@pytest.mark.parametrize(("area", "state"), [(HOLD, "held"), (CORRUPT, "corrupt")])
def test_retry_refuses_a_held_or_corrupt_message(
    spool: Spool, admin: SpoolAdmin, area: str, state: str
) -> None:
    queue_id = put(spool, 1, area=area, next_attempt=LATER)
    error = refused(admin.retry, queue_id)
    assert error.code == "wrong-state"
    assert error.message == f"{queue_id} is {state}, not queued or failed"
    assert files(spool, area) == [queue_id]


def test_requeue_makes_only_the_failed_recipients_pending_again(
    spool: Spool, admin: SpoolAdmin
) -> None:
    queue_id = dead_letter(spool, 1, (A, B, C))

    admin.requeue(queue_id)

    assert files(spool, FAILED) == []
    assert files(spool, QUEUE) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert mtime(spool, queue_id) == NOW
    assert journal_of(spool, queue_id) == [
        (A, Status.DELIVERED),
        (B, Status.FAILED),
        (C, Status.FAILED),
        (B, Status.REQUEUED),
        (C, Status.REQUEUED),
    ]
    [entry] = admin.listing()
    assert (entry.state, entry.pending) == ("ready", 2)
    assert admin.show(queue_id)["recipient_status"] == {
        A: "delivered",
        B: "requeued",
        C: "requeued",
    }


def test_requeue_writes_one_record_per_distinct_recipient(spool: Spool, admin: SpoolAdmin) -> None:
    queue_id = dead_letter(spool, 1, (A, B, B))
    admin.requeue(queue_id)
    assert [r for r, s in journal_of(spool, queue_id) if s is Status.REQUEUED] == [B]


def test_requeue_of_a_dead_letter_without_a_journal_requeues_everyone(
    spool: Spool, admin: SpoolAdmin
) -> None:
    queue_id = put(spool, 1, (A, B), area=FAILED)
    admin.requeue(queue_id)
    assert journal_of(spool, queue_id) == [(A, Status.REQUEUED), (B, Status.REQUEUED)]


def test_requeue_of_a_dead_letter_with_a_huge_envelope(spool: Spool, admin: SpoolAdmin) -> None:
    recipients = [f"recipient-{n:05d}@example.test" for n in range(4000)]
    queue_id = dead_letter(spool, 1, recipients)
    admin.requeue(queue_id)
    requeued = [r for r, s in journal_of(spool, queue_id) if s is Status.REQUEUED]
    assert requeued == recipients[1:]


@pytest.mark.parametrize(("area", "state"), [(QUEUE, "queued"), (HOLD, "held")])
def test_requeue_refuses_a_message_that_is_no_dead_letter(
    spool: Spool, admin: SpoolAdmin, area: str, state: str
) -> None:
    queue_id = put(spool, 1, area=area)
    error = refused(admin.requeue, queue_id)
    assert (error.code, error.message) == ("wrong-state", f"{queue_id} is {state}, not failed")
    assert not (spool.area(area) / (queue_id + JOURNAL_SUFFIX)).exists()


def test_requeue_after_a_crash_inside_the_move_to_failed_keeps_delivered_recipients_delivered(
    spool: Spool, admin: SpoolAdmin
) -> None:
    history = [(A, Status.DELIVERED, "250 ok"), (B, Status.FAILED, "550 no such user")]
    queue_id = put(spool, 1, (A, B), journal=history)
    os.rename(spool.queue / queue_id, spool.failed / queue_id)  # the crash, between the renames

    admin.requeue(queue_id)

    assert admin.show(queue_id)["recipient_status"] == {A: "delivered", B: "requeued"}


# -- delete and flush -----------------------------------------------------------------------------


@pytest.mark.parametrize("area", MESSAGE_AREAS)
def test_delete_removes_the_message_and_its_journal_from_any_area(
    spool: Spool, admin: SpoolAdmin, area: str
) -> None:
    queue_id = put(spool, 1, area=area, journal=[(A, Status.DEFERRED, "451")])
    other = put(spool, 2, area=area)
    assert admin.delete(queue_id) == area
    assert files(spool, area) == [other]
    assert spool.area_of(queue_id) is None


@pytest.mark.parametrize("name", BAD_IDS)
def test_delete_of_a_name_that_is_no_queue_id_deletes_nothing(
    spool: Spool, admin: SpoolAdmin, name: str
) -> None:
    queue_id = put(spool, 1)
    error = refused(admin.delete, name)
    assert (error.code, error.message) == ("unknown-id", f"no message {name} in the spool")
    assert files(spool, QUEUE) == [queue_id]
    assert files(spool, ".") == ["corrupt", "failed", "hold", "maildrop", "queue", "tmp"]


@pytest.mark.parametrize("command", ["hold", "release", "retry", "requeue", "delete", "show"])
def test_every_command_on_a_missing_message_is_unknown_id(admin: SpoolAdmin, command: str) -> None:
    error = refused(getattr(admin, command), qid(404))
    assert (error.code, error.message) == ("unknown-id", f"no message {qid(404)} in the spool")


def test_flush_makes_every_deferred_message_due_now(spool: Spool, admin: SpoolAdmin) -> None:
    ready = put(spool, 1, next_attempt=NOW - 50)
    later = put(spool, 2, next_attempt=LATER)
    much_later = put(spool, 3, next_attempt=LATER * 2)
    held = put(spool, 4, area=HOLD, next_attempt=LATER)

    assert sorted(admin.flush()) == [later, much_later]

    assert mtime(spool, later) == mtime(spool, much_later) == NOW
    assert mtime(spool, ready) == NOW - 50  # already due: untouched
    assert mtime(spool, held, HOLD) == LATER
    assert [e.state for e in admin.listing()] == ["ready", "ready", "ready", "held"]
    assert admin.flush() == []
