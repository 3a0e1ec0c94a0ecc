"""DeliveryQueue's operator commands (hold, release, retry, retry_failed, flush, delete,
listing, show), commands on a message whose attempt is running, restarts, and the chunked
indexing of the spool at start. A task.Clock, a real Spool (InlineRunner), fake providers."""

from __future__ import annotations

import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

import mailrelay.queue
from mailrelay.outbound.results import Kind, OutboundMessage, RecipientResult
from mailrelay.queue import RetryPolicy
from mailrelay.spool.admin import QueueCommandError, QueueEntry
from mailrelay.spool.format import Outcome, Status
from mailrelay.spool.store import FAILED, HOLD, JOURNAL_SUFFIX, QUEUE
from tests.unit.fakes import (
    FakeProvider,
    LogCapture,
    answer_all,
    answer_by_recipient,
    envelope,
    failure_of,
    has_fired,
    result_of,
)
from tests.unit.test_queue import POLICY, A, B, World, advance_to_next_timer, qid

T = TypeVar("T")
C = "c@example.test"
D = "d@example.test"
BAD_IDS = [
    "",
    "../x",
    "../queue",
    "0000000000000000000001.journal",
    "000000000000000000001",  # 21 digits
    "00000000000000000000001",  # 23 digits
    "abcdefabcdefabcdefabcd",  # our IDs are upper-case
    qid(404),  # well formed, but no such message
]


# -- helpers ------------------------------------------------------------------------------------


def done(coro: Coroutine[Any, Any, T]) -> T:
    """Run a queue command to completion (everything is synchronous here)."""
    return result_of(defer.Deferred.fromCoroutine(coro))


def refused(coro: Coroutine[Any, Any, Any]) -> QueueCommandError:
    """The QueueCommandError a queue command failed with."""
    failure = failure_of(defer.Deferred.fromCoroutine(coro))
    assert isinstance(failure.value, QueueCommandError), failure.getTraceback()
    return failure.value


def one_reactor_turn(clock: Clock) -> None:
    """Run the calls due now, but not the zero-delay calls they schedule (unlike advance(0),
    which runs those too): one turn of a real reactor."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    work = [(c.func, c.args, c.kw) for c in due]
    for call in due:
        call.cancel()
    for func, args, kw in work:
        func(*args, **kw)


def mtime(w: World, queue_id: str, area: str = QUEUE) -> float:
    return os.stat(w.root / area / queue_id).st_mtime


def ids_sent(provider: FakeProvider) -> list[str]:
    return [m.queue_id for m in provider.delivered]


def entries_by_id(entries: list[QueueEntry]) -> dict[str, QueueEntry]:
    return {e.queue_id: e for e in entries}


def zero_depth() -> dict[str, int]:
    return {"ready": 0, "deferred": 0, "active": 0, "held": 0}


def dead_letter(w: World, provider: FakeProvider, n: int = 1) -> str:
    """A message whose A was delivered and B failed for good: in failed/ (no bounces)."""
    provider.answer = answer_by_recipient({A: Kind.DELIVERED, B: Kind.PERMANENT})
    queue_id = w.add(n, (A, B))
    assert w.area(FAILED)[-2:] == [queue_id, queue_id + JOURNAL_SUFFIX]
    return queue_id


# -- hold and release -----------------------------------------------------------------------------


def test_hold_moves_a_deferred_message_with_its_journal_and_its_timer_does_not_fire_it(
    tmp_path: Path,
) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}

    assert done(w.queue.hold(queue_id)) == "held"

    assert w.queued() == []
    assert w.area(QUEUE) == []
    assert w.area(HOLD) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert [o.status for o in w.journal(queue_id, HOLD)] == [Status.DEFERRED]
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": 1}
    w.clock.advance(POLICY.maximum * 10)
    assert len(provider.delivered) == 1


def test_release_puts_a_held_message_back_and_attempts_it_at_once(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()  # deferred until t=100
    done(w.queue.hold(queue_id))
    w.clock.advance(30)
    provider.hold = True  # keep the next attempt running, to look at the file meanwhile
    provider.answer = answer_all(Kind.DELIVERED)

    assert done(w.queue.release(queue_id)) == "released"

    assert ids_sent(provider) == [queue_id, queue_id]
    assert w.area(HOLD) == []
    assert w.queued() == [queue_id]
    assert mtime(w, queue_id) == 30.0  # its next attempt is now, not t=100
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 1, "held": 0}
    provider.release()
    assert w.queued() == []
    assert w.queue.depth() == zero_depth()


def one_running_one_waiting(tmp_path: Path) -> tuple[World, FakeProvider, str, str]:
    """One slot: message 1's attempt runs (the provider holds it), message 2 waits."""
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider, max_in_flight=1)
    w.start()
    return w, provider, w.add(1), w.add(2)


def test_hold_of_a_message_waiting_for_a_free_slot_keeps_it_from_being_attempted(
    tmp_path: Path,
) -> None:
    w, provider, first, waiting = one_running_one_waiting(tmp_path)
    assert w.queue.depth() == {"ready": 1, "deferred": 0, "active": 1, "held": 0}

    assert done(w.queue.hold(waiting)) == "held"

    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 1, "held": 1}
    provider.release()
    assert ids_sent(provider) == [first]
    assert w.area(HOLD) == [waiting]


def test_message_held_and_released_while_waiting_for_a_slot_is_attempted_once(
    tmp_path: Path,
) -> None:
    w, provider, first, waiting = one_running_one_waiting(tmp_path)
    done(w.queue.hold(waiting))
    done(w.queue.release(waiting))
    provider.release()  # first done: the slot goes to the released message
    assert ids_sent(provider) == [first, waiting]
    provider.release()
    w.clock.advance(POLICY.maximum * 10)
    assert ids_sent(provider) == [first, waiting]
    assert w.queued() == []
    assert w.queue.depth() == zero_depth()


def held_and_dead_letter(tmp_path: Path) -> tuple[World, str, str]:
    """A queue with message 1 on hold and message 2 a dead letter."""
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    held = w.add(1)
    done(w.queue.hold(held))
    return w, held, dead_letter(w, provider, 2)


def test_hold_refuses_a_held_message_and_a_dead_letter(tmp_path: Path) -> None:
    w, held, dead = held_and_dead_letter(tmp_path)

    again = refused(w.queue.hold(held))
    assert (again.code, again.message) == ("wrong-state", f"{held} is held, not queued")
    failed = refused(w.queue.hold(dead))
    assert (failed.code, failed.message) == ("wrong-state", f"{dead} is failed, not queued")
    assert w.area(HOLD) == [held, held + JOURNAL_SUFFIX]
    assert w.area(FAILED) == [dead, dead + JOURNAL_SUFFIX]
    assert w.queue.depth()["held"] == 1


def test_release_refuses_a_message_that_is_not_held(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    error = refused(w.queue.release(queue_id))
    assert (error.code, error.message) == ("wrong-state", f"{queue_id} is queued, not held")
    # Still deferred as before: not attempted early.
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}
    assert len(provider.delivered) == 1


@pytest.mark.parametrize("command", ["hold", "release", "retry", "delete", "show"])
@pytest.mark.parametrize("queue_id", BAD_IDS)
def test_a_command_on_a_missing_or_malformed_id_is_unknown_id(
    tmp_path: Path, command: str, queue_id: str
) -> None:
    w = World(tmp_path)
    w.start()
    w.put(1)  # a real message, which none of these names
    error = refused(getattr(w.queue, command)(queue_id))
    assert error.code == "unknown-id"
    assert error.message == f"no message {queue_id} in the spool"


# -- commands on a message whose attempt is running ---------------------------------------------


def test_hold_during_an_attempt_holds_the_message_when_it_is_deferred(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    assert w.queue.depth()["active"] == 1

    assert done(w.queue.hold(queue_id)) == "will be held when its running attempt ends"

    assert w.queued() == [queue_id]  # not moved under the running attempt
    assert w.area(HOLD) == []
    provider.release()  # a temporary failure
    assert w.area(QUEUE) == []
    assert w.area(HOLD) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert [o.status for o in w.journal(queue_id, HOLD)] == [Status.DEFERRED]
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": 1}
    w.clock.advance(POLICY.maximum * 10)  # its retry timer is stale now
    assert len(provider.delivered) == 1


def test_delete_during_an_attempt_deletes_the_message_when_it_is_deferred(
    tmp_path: Path,
) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()

    assert done(w.queue.delete(queue_id)) == "will be deleted when its running attempt ends"

    assert w.queued() == [queue_id]
    provider.release()
    assert w.area(QUEUE) == []
    assert w.area(HOLD) == [] and w.area(FAILED) == []
    assert w.queue.depth() == zero_depth()
    w.clock.advance(POLICY.maximum * 10)
    assert len(provider.delivered) == 1


@pytest.mark.parametrize("command", ["hold", "delete"])
def test_waiting_command_is_a_quiet_no_op_when_the_attempt_delivers_everything(
    tmp_path: Path, command: str
) -> None:
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add(1, (A, B))
    reply = done(getattr(w.queue, command)(queue_id))
    assert reply.endswith("when its running attempt ends")

    with LogCapture() as logs:
        provider.release()

    assert w.area(QUEUE) == [] and w.area(HOLD) == [] and w.area(FAILED) == []
    assert w.queue.depth() == zero_depth()
    assert w.metric("mailrelay_messages_delivered_total") == 1
    texts = list(logs.texts())
    assert not any("operator command failed" in t for t in texts)
    assert any("was not needed" in t for t in texts)


def test_waiting_hold_leaves_a_message_that_became_a_dead_letter_in_failed(
    tmp_path: Path,
) -> None:
    provider = FakeProvider("p1", answer_all(Kind.PERMANENT), hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    done(w.queue.hold(queue_id))
    with LogCapture() as logs:
        provider.release()
    assert w.area(FAILED) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert w.area(HOLD) == []
    assert w.queue.depth() == zero_depth()
    assert not any("operator command failed" in t for t in logs.texts())


def test_retry_during_an_attempt_changes_nothing(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    assert done(w.queue.retry(queue_id)) == "being delivered right now"
    provider.release()
    assert len(provider.delivered) == 1
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}


def test_message_held_during_its_attempt_can_be_released_and_delivered(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    done(w.queue.hold(queue_id))
    provider.release()
    provider.hold = False
    provider.answer = answer_all(Kind.DELIVERED)
    w.clock.advance(5)
    done(w.queue.release(queue_id))
    assert ids_sent(provider) == [queue_id, queue_id]
    assert w.area(QUEUE) == [] and w.area(HOLD) == []
    assert w.queue.depth() == zero_depth()


# -- retry ----------------------------------------------------------------------------------------


def test_retry_attempts_a_deferred_message_now_instead_of_at_its_timer(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()  # deferred until t=100
    w.clock.advance(10)
    provider.hold = True

    assert done(w.queue.retry(queue_id)) == "scheduled"

    assert ids_sent(provider) == [queue_id, queue_id]
    assert mtime(w, queue_id) == 10.0
    provider.answer = answer_all(Kind.DELIVERED)
    provider.release()
    assert w.queued() == []
    w.clock.advance(POLICY.maximum * 10)  # the old timer finds nothing to do
    assert len(provider.delivered) == 2


def test_retry_that_fails_again_is_rescheduled_from_now_and_the_old_due_time_is_ignored(
    tmp_path: Path,
) -> None:
    times: list[float] = []
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)

    def answer(m: OutboundMessage) -> list[RecipientResult]:
        times.append(w.clock.seconds())
        return answer_all(Kind.TEMPORARY)(m)

    provider.answer = answer
    w.start()
    queue_id = w.add()  # t=0: attempt 1, due at 100
    w.clock.advance(10)
    done(w.queue.retry(queue_id))  # t=10: attempt 2, due at 10 + 200
    assert mtime(w, queue_id) == 210.0
    w.clock.advance(100)  # t=110: the first due time passes
    assert times == [0.0, 10.0]
    advance_to_next_timer(w.clock)
    assert times == [0.0, 10.0, 210.0]


def test_retry_refuses_a_held_message(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    done(w.queue.hold(queue_id))
    error = refused(w.queue.retry(queue_id))
    assert error.code == "wrong-state"
    assert error.message == f"{queue_id} is held, not queued or failed"
    assert w.area(HOLD) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert len(provider.delivered) == 1
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": 1}


# -- dead letters ---------------------------------------------------------------------------------


def test_retry_of_a_dead_letter_sends_only_its_failed_recipient_again(tmp_path: Path) -> None:
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    w.start()
    queue_id = dead_letter(w, provider)
    w.clock.advance(50)
    provider.answer = answer_all(Kind.TEMPORARY)

    assert done(w.queue.retry(queue_id)) == "requeued"

    assert [m.recipients for m in provider.delivered] == [(A, B), (B,)]
    assert w.area(FAILED) == []
    assert w.queued() == [queue_id]
    assert [(o.recipient, o.status, o.at) for o in w.journal(queue_id)] == [
        (A, Status.DELIVERED, 0.0),
        (B, Status.FAILED, 0.0),
        (B, Status.REQUEUED, 50.0),
        (B, Status.DEFERRED, 50.0),
    ]
    provider.answer = answer_all(Kind.DELIVERED)
    advance_to_next_timer(w.clock)
    assert [m.recipients for m in provider.delivered] == [(A, B), (B,), (B,)]
    assert w.queued() == [] and w.area(FAILED) == []


def test_requeued_dead_letter_gets_a_fresh_lifetime_and_attempt_count(tmp_path: Path) -> None:
    policy = RetryPolicy(initial=100.0, maximum=400.0, lifetime=1000.0, jitter=0.1)
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider, policy=policy)
    w.start()
    queue_id = w.add()  # t=0: deferred 100 s
    advance_to_next_timer(w.clock)  # t=100: deferred 200 s
    provider.answer = answer_all(Kind.PERMANENT)
    advance_to_next_timer(w.clock)  # t=300: failed for good
    assert w.area(FAILED) == [queue_id, queue_id + JOURNAL_SUFFIX]
    w.clock.advance(4700)  # t=5000: far past the message's lifetime
    provider.answer = answer_all(Kind.TEMPORARY)

    done(w.queue.retry(queue_id))

    assert len(provider.delivered) == 4  # attempted, not expired unsent
    assert w.area(FAILED) == []
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}
    # The backoff starts again from its first step: due at 5000 + 100, not 5000 + 400.
    assert mtime(w, queue_id) == 5100.0
    [timer] = w.clock.getDelayedCalls()
    assert timer.getTime() == 5100.0


def test_requeued_dead_letter_keeps_its_fresh_lifetime_across_a_restart(tmp_path: Path) -> None:
    policy = RetryPolicy(initial=100.0, maximum=400.0, lifetime=1000.0, jitter=0.1)
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    first = World(tmp_path, provider, policy=policy)
    first.start()
    queue_id = first.add()
    advance_to_next_timer(first.clock)  # t=100: two deferrals so far
    provider.answer = answer_all(Kind.PERMANENT)
    advance_to_next_timer(first.clock)  # t=300: dead letter
    first.clock.advance(4700)
    provider.answer = answer_all(Kind.TEMPORARY)
    done(first.queue.retry(queue_id))  # t=5000: requeued, deferred until 5100
    result_of(first.stop())

    # A new process, whose journal-based attempt count and lifetime start at the requeue.
    provider2 = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    second = World(tmp_path, provider2, policy=policy)
    second.clock.advance(5100)
    second.start()
    assert len(provider2.delivered) == 1
    assert second.queued() == [queue_id]  # age 100 < lifetime: not expired
    assert mtime(second, queue_id) == 5100.0 + 200.0  # the second step of the fresh backoff


def test_retry_failed_requeues_every_dead_letter_and_nothing_else(tmp_path: Path) -> None:
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    w.start()
    dead1 = dead_letter(w, provider, 1)
    dead2 = dead_letter(w, provider, 2)
    provider.answer = answer_all(Kind.TEMPORARY)
    deferred = w.add(3, (A,))
    held = w.add(4, (A,))
    done(w.queue.hold(held))
    w.clock.advance(20)
    provider.answer = answer_all(Kind.DELIVERED)
    sent_before = len(provider.delivered)

    assert done(w.queue.retry_failed()) == [dead1, dead2]

    resent = provider.delivered[sent_before:]
    assert [(m.queue_id, m.recipients) for m in resent] == [(dead1, (B,)), (dead2, (B,))]
    assert w.area(FAILED) == []
    assert w.queued() == [deferred]
    assert w.area(HOLD) == [held, held + JOURNAL_SUFFIX]
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 1}


def test_retry_failed_with_no_dead_letters_does_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    assert done(w.queue.retry_failed()) == []


def test_retry_failed_requeues_the_other_dead_letters_when_one_is_corrupt(
    tmp_path: Path,
) -> None:
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    w.start()
    broken = dead_letter(w, provider, 1)
    good = dead_letter(w, provider, 2)
    (w.spool.failed / broken).write_bytes(b"not a spool file")
    provider.answer = answer_all(Kind.DELIVERED)
    assert done(w.queue.retry_failed()) == [good]
    # The damaged one goes where the queue puts every damaged file, with its journal.
    assert w.area(FAILED) == []
    assert w.area("corrupt") == [broken, broken + JOURNAL_SUFFIX]
    assert w.metric("mailrelay_spool_corrupt_total") == 1


# -- flush ----------------------------------------------------------------------------------------


def test_flush_attempts_every_deferred_message_now(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    early = w.add(1)  # due at 100
    w.clock.advance(30)
    late = w.add(2)  # due at 130
    held = w.add(3)
    done(w.queue.hold(held))
    w.clock.advance(20)
    provider.hold = True

    assert done(w.queue.flush()) == [early, late]

    assert ids_sent(provider)[-2:] == [early, late]
    assert mtime(w, early) == mtime(w, late) == 50.0
    assert w.area(HOLD) == [held, held + JOURNAL_SUFFIX]
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 2, "held": 1}
    provider.answer = answer_all(Kind.DELIVERED)
    provider.release()
    assert w.queued() == []
    w.clock.advance(POLICY.maximum * 10)
    assert len(provider.delivered) == 5


def test_flush_with_nothing_deferred_leaves_the_queue_alone(tmp_path: Path) -> None:
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider)
    w.start()
    w.add(1)
    assert done(w.queue.flush()) == []
    assert len(provider.delivered) == 1


# -- delete ---------------------------------------------------------------------------------------


def test_delete_removes_a_deferred_message_from_disk_and_from_the_index(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    assert done(w.queue.delete(queue_id)) == "deleted"
    assert w.area(QUEUE) == []
    assert w.queue.depth() == zero_depth()
    w.clock.advance(POLICY.maximum * 10)
    assert len(provider.delivered) == 1


def test_delete_removes_a_message_waiting_for_a_slot(tmp_path: Path) -> None:
    w, provider, first, waiting = one_running_one_waiting(tmp_path)
    assert done(w.queue.delete(waiting)) == "deleted"
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 1, "held": 0}
    provider.release()
    assert ids_sent(provider) == [first]
    assert w.area(QUEUE) == []


def test_delete_removes_a_held_message(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    done(w.queue.hold(queue_id))
    assert done(w.queue.delete(queue_id)) == "deleted"
    assert w.area(HOLD) == []
    assert w.queue.depth() == zero_depth()


def test_delete_removes_a_dead_letter(tmp_path: Path) -> None:
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    w.start()
    queue_id = dead_letter(w, provider)
    assert done(w.queue.delete(queue_id)) == "deleted"
    assert w.area(FAILED) == []
    assert refused(w.queue.retry(queue_id)).code == "unknown-id"


# -- listing and show -----------------------------------------------------------------------------


def test_listing_reports_the_state_of_every_message(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY, "451 4.3.0 first"))
    w = World(tmp_path, provider, max_in_flight=1)
    w.start()
    deferred = w.add(1, (A, B))
    w.clock.advance(10)
    provider.answer = lambda m: [
        RecipientResult(r, Kind.DELIVERED if r == A else Kind.TEMPORARY, "452 4.2.2 second")
        for r in m.recipients
    ]
    done(w.queue.retry(deferred))  # t=10: A delivered, B deferred again, until 10 + 200
    dead = dead_letter(w, provider, 2)
    provider.answer = answer_all(Kind.TEMPORARY, "421 4.7.0 held one")
    held = w.add(3)
    done(w.queue.hold(held))
    corrupt = w.put(4)
    (w.spool.queue / corrupt).write_bytes(b"garbage")
    w.queue.enqueue(envelope(corrupt))  # tried, found corrupt, moved to corrupt/
    provider.hold = True
    active = w.add(5, (A, B))
    ready = w.add(6)  # waits for the one slot

    entries = done(w.queue.listing())

    assert [e.queue_id for e in entries] == [deferred, dead, held, corrupt, active, ready]
    by_id = entries_by_id(entries)
    assert {i: e.state for i, e in by_id.items()} == {
        deferred: "deferred",
        dead: "failed",
        held: "held",
        corrupt: "corrupt",
        active: "active",
        ready: "ready",
    }
    assert {i: e.next_attempt for i, e in by_id.items()} == {
        deferred: 210.0,
        dead: None,
        held: None,
        corrupt: None,
        active: None,
        ready: None,
    }
    assert by_id[deferred].last_error == "452 4.2.2 second"
    assert by_id[dead].last_error == "550 5.1.1 no such user"
    assert by_id[held].last_error == "421 4.7.0 held one"
    assert by_id[active].last_error is None and by_id[ready].last_error is None
    assert {i: (e.recipients, e.pending) for i, e in by_id.items() if i != corrupt} == {
        deferred: (2, 1),
        dead: (2, 0),
        held: (1, 1),
        active: (2, 2),
        ready: (1, 1),
    }
    entry = by_id[deferred]
    assert (entry.sender, entry.received_at) == ("sender@example.test", 0.0)
    assert entry.size == (w.spool.queue / deferred).stat().st_size
    assert by_id[corrupt].sender is None and by_id[corrupt].last_error


def test_show_gives_the_history_in_order_and_each_recipients_status(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_by_recipient({B: Kind.TEMPORARY}))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add(1, (A, B))  # t=0: A delivered, B deferred until 100
    w.clock.advance(10)
    provider.hold = True
    done(w.queue.retry(queue_id))  # t=10: the attempt for B is running

    report = done(w.queue.show(queue_id))

    assert report["state"] == "active"
    assert report["recipient_status"] == {A: "delivered", B: "deferred"}
    assert [(h["recipient"], h["status"], h["provider"], h["at"]) for h in report["history"]] == [
        (A, "delivered", "p1", 0.0),
        (B, "deferred", "p1", 0.0),
    ]
    assert report["history"][1]["reply"] == "451 4.3.0 try later"
    assert (report["queue_id"], report["sender"], report["recipients"], report["pending"]) == (
        queue_id,
        "sender@example.test",
        2,
        1,
    )
    assert (report["client"], report["helo"], report["body_8bit"]) == (
        "127.0.0.1",
        "client.test",
        False,
    )

    provider.release()  # B deferred again, until 10 + 200
    report = done(w.queue.show(queue_id))
    assert report["state"] == "deferred"
    assert report["next_attempt"] == 210.0
    assert report["recipient_status"] == {A: "delivered", B: "deferred"}
    assert [h["status"] for h in report["history"]] == ["delivered", "deferred", "deferred"]
    assert report["last_error"] == "451 4.3.0 try later"


def test_show_of_a_held_message_and_of_a_dead_letter(tmp_path: Path) -> None:
    w, held, dead = held_and_dead_letter(tmp_path)
    report = done(w.queue.show(held))
    assert (report["state"], report["recipient_status"]) == ("held", {A: "deferred"})
    report = done(w.queue.show(dead))
    assert (report["state"], report["recipient_status"]) == (
        "failed",
        {A: "delivered", B: "failed"},
    )


# -- restarts -------------------------------------------------------------------------------------


def test_attempt_interrupted_by_a_crash_is_retried_at_start_and_counted(tmp_path: Path) -> None:
    before = World(tmp_path)
    queue_id = before.put(1, (A, B, C, D))
    journal = [
        Outcome(A, Status.DELIVERED, "250", "p1", 0.0),
        Outcome(B, Status.DEFERRED, "451", "p1", 0.5),
    ]
    result_of(before.spool.append_journal(queue_id, journal))
    # An attempt for B, C and D started at t=1 (its marker in the attempt log); C's outcome
    # was journalled, then the process died: B and D may have been delivered.
    before.spool.open_attempt_log()
    before.spool.mark_attempt(queue_id, 1.0)
    result_of(
        before.spool.append_journal(queue_id, [Outcome(C, Status.DEFERRED, "451", "p1", 1.0)])
    )
    before.spool.close_attempt_log()  # as the kernel does for a process that died

    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    after = World(tmp_path, provider)
    after.clock.advance(5)
    after.start()

    assert [m.recipients for m in provider.delivered] == [(B, C, D)]
    assert after.metric("mailrelay_possible_duplicates_total") == 2
    # The next attempt is an ordinary retry: not counted again.
    provider.answer = answer_all(Kind.DELIVERED)
    advance_to_next_timer(after.clock)
    assert [m.recipients for m in provider.delivered] == [(B, C, D), (B, C, D)]
    assert after.metric("mailrelay_possible_duplicates_total") == 2
    assert after.queued() == []


def test_a_restart_counts_each_interrupted_attempt_once(tmp_path: Path) -> None:
    # Life 1 is interrupted mid-attempt; life 2 retries it (counted) and defers it, then
    # stops; life 3 finds the old marker again, but older than the deferral: not counted.
    one = World(tmp_path)
    queue_id = one.put(1, (A,))
    one.spool.open_attempt_log()
    one.spool.mark_attempt(queue_id, 1.0)
    one.spool.close_attempt_log()

    two = World(tmp_path, FakeProvider("p1", answer_all(Kind.TEMPORARY)))
    two.clock.advance(5)
    two.start()
    assert two.metric("mailrelay_possible_duplicates_total") == 1
    result_of(two.stop())

    provider = FakeProvider("p1")
    three = World(tmp_path, provider)
    three.clock.advance(10_000)
    three.start()
    assert [m.recipients for m in provider.delivered] == [(A,)]
    assert three.metric("mailrelay_possible_duplicates_total") == 0
    assert three.queued() == []


def test_deferred_message_stays_deferred_across_a_restart_until_it_is_due(
    tmp_path: Path,
) -> None:
    before = World(tmp_path)
    queue_id = before.put(1)
    os.utime(before.spool.queue / queue_id, (400.0, 400.0))  # deferred until t=400
    times: list[float] = []
    provider = FakeProvider("p1")
    after = World(tmp_path, provider)

    def answer(m: OutboundMessage) -> list[RecipientResult]:
        times.append(after.clock.seconds())
        return answer_all(Kind.DELIVERED)(m)

    provider.answer = answer
    after.clock.advance(100)
    after.start()

    assert after.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}
    [entry] = done(after.queue.listing())
    assert (entry.state, entry.next_attempt) == ("deferred", 400.0)
    after.clock.advance(299.5)
    assert times == []
    after.clock.advance(0.5)
    assert times == [400.0]
    assert after.queued() == []


def test_a_next_attempt_beyond_the_backoff_cap_is_brought_forward_at_start(
    tmp_path: Path,
) -> None:
    """An mtime years ahead (a clock that was set back) must not strand the message."""
    before = World(tmp_path)
    queue_id = before.put(1)
    os.utime(before.spool.queue / queue_id, (1e9, 1e9))
    provider = FakeProvider("p1")
    after = World(tmp_path, provider)
    after.start()
    cap = POLICY.maximum * (1 + POLICY.jitter)
    assert [c.getTime() for c in after.clock.getDelayedCalls()] == [pytest.approx(cap)]
    after.clock.advance(cap)
    assert ids_sent(provider) == [queue_id]


def test_held_message_is_not_attempted_after_a_restart(tmp_path: Path) -> None:
    before = World(tmp_path)
    queue_id = before.put(1)
    other = before.put(2)
    before.spool.move_now(queue_id, QUEUE, HOLD)

    provider = FakeProvider("p1")
    after = World(tmp_path, provider)
    after.start()
    after.clock.advance(POLICY.maximum * 10)

    assert ids_sent(provider) == [other]
    assert after.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": 1}
    assert after.area(HOLD) == [queue_id]
    done(after.queue.release(queue_id))
    assert ids_sent(provider) == [other, queue_id]
    assert after.queue.depth() == zero_depth()


def test_journal_left_behind_by_a_crash_during_hold_follows_its_message_at_start(
    tmp_path: Path,
) -> None:
    before = World(tmp_path, FakeProvider("p1", answer_all(Kind.TEMPORARY)))
    before.start()
    queue_id = before.add()
    result_of(before.stop())
    # The crash came between moving the message and moving its journal.
    os.rename(before.spool.queue / queue_id, before.spool.hold / queue_id)

    after = World(tmp_path)
    after.start()
    assert after.area(QUEUE) == []
    assert after.area(HOLD) == [queue_id, queue_id + JOURNAL_SUFFIX]
    assert after.queue.depth()["held"] == 1


# -- indexing the spool in chunks at start --------------------------------------------------------


def spool_ten_messages(w: World, future: set[int]) -> list[str]:
    """Messages 1..10 in queue/ (as before a restart); those in ``future`` due at t=400."""
    ids = []
    for n in range(1, 11):
        queue_id = w.put(n)
        if n in future:
            os.utime(w.spool.queue / queue_id, (400.0, 400.0))
        ids.append(queue_id)
    return ids


def test_start_indexes_the_spool_one_chunk_per_reactor_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailrelay.queue, "INDEX_CHUNK", 3)
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider)
    spool_ten_messages(w, future={3, 6, 9})

    w.start()

    assert not has_fired(w.queue.indexed)
    assert ids_sent(provider) == [qid(1), qid(2)]
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 2, "held": 0}
    one_reactor_turn(w.clock)
    assert ids_sent(provider) == [qid(n) for n in (1, 2, 4, 5)]
    assert w.queue.depth() == {"ready": 0, "deferred": 2, "active": 4, "held": 0}
    assert not has_fired(w.queue.indexed)
    one_reactor_turn(w.clock)
    assert w.queue.depth() == {"ready": 0, "deferred": 3, "active": 6, "held": 0}
    assert not has_fired(w.queue.indexed)
    one_reactor_turn(w.clock)
    assert w.queue.depth() == {"ready": 0, "deferred": 3, "active": 7, "held": 0}
    assert result_of(w.queue.indexed) == 10
    # Only the retry timer is left: no more indexing turns.
    assert [c.getTime() for c in w.clock.getDelayedCalls()] == [400.0]

    provider.release()
    w.clock.advance(400)
    provider.release()
    assert sorted(ids_sent(provider)) == [qid(n) for n in range(1, 11)]
    assert w.queued() == []


def test_indexing_respects_max_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailrelay.queue, "INDEX_CHUNK", 3)
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider, max_in_flight=2)
    spool_ten_messages(w, future=set())
    w.start()
    assert w.queue.depth() == {"ready": 1, "deferred": 0, "active": 2, "held": 0}
    w.clock.advance(0)  # runs every remaining indexing turn
    assert result_of(w.queue.indexed) == 10
    assert w.queue.depth() == {"ready": 8, "deferred": 0, "active": 2, "held": 0}
    for _ in range(5):
        provider.release()
    assert sorted(ids_sent(provider)) == [qid(n) for n in range(1, 11)]
    assert w.queued() == []


def test_empty_spool_is_indexed_at_once(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    assert result_of(w.queue.indexed) == 0
    assert w.clock.getDelayedCalls() == []


@pytest.mark.parametrize("outcome", ["delivered", "deferred", "still running"])
def test_message_enqueued_during_indexing_and_also_scanned_is_attempted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    monkeypatch.setattr(mailrelay.queue, "INDEX_CHUNK", 3)
    provider = FakeProvider(
        "p1",
        answer_all(Kind.TEMPORARY if outcome == "deferred" else Kind.DELIVERED),
        hold=outcome == "still running",
    )
    w = World(tmp_path, provider)
    spool_ten_messages(w, future=set())
    w.start()  # indexes 1, 2, 3
    w.queue.enqueue(envelope(qid(8)))  # e.g. adopted again: the scan listed it too

    w.clock.advance(0)

    assert result_of(w.queue.indexed) == 10
    assert ids_sent(provider).count(qid(8)) == 1
    assert sorted(ids_sent(provider)) == [qid(n) for n in range(1, 11)]
    provider.release()
    assert ids_sent(provider).count(qid(8)) == 1
    if outcome == "deferred":
        assert w.queue.depth() == {"ready": 0, "deferred": 10, "active": 0, "held": 0}
    else:
        assert w.queued() == []
        assert w.queue.depth() == zero_depth()


def test_deferred_message_retried_before_its_chunk_is_indexed_keeps_its_new_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan at start saw it due at t=400; the operator's retry supersedes that."""
    monkeypatch.setattr(mailrelay.queue, "INDEX_CHUNK", 3)
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    w = World(tmp_path, provider)
    spool_ten_messages(w, future=set(range(1, 11)))  # all due at t=400
    w.start()
    assert done(w.queue.retry(qid(8))) == "scheduled"
    assert ids_sent(provider) == [qid(8)]

    w.clock.advance(0)

    assert result_of(w.queue.indexed) == 10
    assert w.queue.depth() == {"ready": 0, "deferred": 9, "active": 1, "held": 0}
    provider.release()  # deferred again, until t=100
    assert w.queue.depth() == {"ready": 0, "deferred": 10, "active": 0, "held": 0}
    w.clock.advance(99)
    assert ids_sent(provider) == [qid(8)]
    w.clock.advance(1)
    assert ids_sent(provider) == [qid(8), qid(8)]


@pytest.mark.parametrize("command", ["hold", "delete"])
def test_message_held_or_deleted_before_its_chunk_is_indexed_is_not_counted_as_deferred(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setattr(mailrelay.queue, "INDEX_CHUNK", 3)
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    spool_ten_messages(w, future={9})
    w.start()
    assert done(getattr(w.queue, command)(qid(9))) in ("held", "deleted")
    w.clock.advance(0)
    assert result_of(w.queue.indexed) == 10
    held = 1 if command == "hold" else 0
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": held}


def test_message_held_before_its_chunk_is_indexed_is_never_attempted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailrelay.queue, "INDEX_CHUNK", 3)
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    spool_ten_messages(w, future={9})
    w.start()
    done(w.queue.hold(qid(8)))  # due
    done(w.queue.hold(qid(9)))  # deferred until t=400
    w.clock.advance(0)
    w.clock.advance(1000)
    assert qid(8) not in ids_sent(provider)
    assert qid(9) not in ids_sent(provider)
    assert w.area(HOLD) == [qid(8), qid(9)]
    assert w.queued() == []


# -- review findings ------------------------------------------------------------------------------


def test_a_hold_after_a_waiting_delete_does_not_turn_it_into_a_hold(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY), hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()
    assert done(w.queue.delete(queue_id)) == "will be deleted when its running attempt ends"
    assert done(w.queue.hold(queue_id)) == "will be deleted when its running attempt ends"
    provider.release()
    assert w.area(QUEUE) == [] and w.area(HOLD) == []


def test_commands_run_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush whose scan was taken before a hold moved the message must not make it ready
    again: the flush waits for the hold."""
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = w.add()  # deferred
    real_run = w.spool.run
    gate: defer.Deferred[None] = defer.Deferred()
    calls: list[str] = []

    def run(f: Any, *args: Any) -> defer.Deferred[Any]:
        calls.append(getattr(f, "__name__", "?"))
        if len(calls) == 1:  # the hold's move: finishes only when the gate opens
            return gate.addCallback(lambda _: real_run(f, *args))
        return real_run(f, *args)

    monkeypatch.setattr(w.spool, "run", run)
    holding = defer.Deferred.fromCoroutine(w.queue.hold(queue_id))
    flushing = defer.Deferred.fromCoroutine(w.queue.flush())
    assert calls == ["hold"]  # the flush has not even scanned yet
    gate.callback(None)
    assert result_of(holding) == "held"
    assert result_of(flushing) == []
    assert w.area(HOLD) == [queue_id, queue_id + JOURNAL_SUFFIX]
    w.clock.advance(POLICY.maximum * 10)
    assert len(provider.delivered) == 1  # only the first attempt: never while held


def test_a_failure_while_finishing_keeps_the_message_queued_and_tries_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = FakeProvider("p1")
    w = World(tmp_path, provider)
    w.start()
    real_unlink = w.spool.unlink
    failures = [OSError(28, "No space left on device")]

    def unlink(queue_id: str, area: str = QUEUE) -> defer.Deferred[None]:
        if failures:
            return defer.fail(failures.pop())
        return real_unlink(queue_id, area)

    monkeypatch.setattr(w.spool, "unlink", unlink)
    with LogCapture():
        queue_id = w.add()
    assert w.queued() == [queue_id]
    assert w.queue.depth()["deferred"] == 1  # not stranded: indexed, with a retry timer
    w.clock.advance(POLICY.initial)
    assert w.queued() == []
