"""DeliveryQueue.adopt_unindexed: mail an acceptor process made durable in queue/ but never
reported (it died first) is found and delivered, once; a report that comes after all is
ignored."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet import defer

from mailrelay.outbound.results import Kind
from mailrelay.spool.format import encode_message
from tests.unit.fakes import FakeProvider, answer_all, envelope, has_fired, result_of
from tests.unit.test_queue import BODY, World, qid

OTHER_BODY = b"Subject: behind its back\r\n\r\nwritten by an acceptor\r\n"


def write_behind_the_queues_back(w: World, n: int) -> str:
    """A message file in queue/, written as an acceptor does, that the queue is not told of."""
    env = envelope(qid(n), received_at=w.clock.seconds())
    w.spool.write_durably(env, encode_message(env, OTHER_BODY))
    return env.queue_id


def adopt(w: World) -> defer.Deferred[int]:
    return defer.Deferred.fromCoroutine(w.queue.adopt_unindexed())


def test_a_message_nobody_reported_is_adopted_and_delivered_once(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    assert has_fired(w.queue.indexed)
    known = w.add(1)
    queue_id = write_behind_the_queues_back(w, 2)
    assert w.queued() == [queue_id]  # the first was delivered, this one waits unknown
    assert w.queue.depth()["ready"] == 0
    assert result_of(adopt(w)) == 1
    sent = w.providers[0].delivered
    assert [m.queue_id for m in sent] == [known, queue_id]
    assert sent[1].body == OTHER_BODY
    assert w.queued() == []
    assert w.metric("mailrelay_messages_delivered_total") == 2
    assert result_of(adopt(w)) == 0  # nothing left to find
    assert len(sent) == 2


def test_what_the_queue_knows_already_is_not_adopted_again(tmp_path: Path) -> None:
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider)
    w.start()
    w.add(1)  # reported and being attempted (held by the provider)
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 1, "held": 0}
    assert result_of(adopt(w)) == 0
    assert len(provider.delivered) == 1
    provider.release()
    assert w.queued() == []


def test_a_report_of_a_message_adopted_already_is_ignored(tmp_path: Path) -> None:
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider, max_in_flight=1)
    w.start()
    w.add(1)  # takes the one attempt slot
    queue_id = write_behind_the_queues_back(w, 2)
    assert result_of(adopt(w)) == 1
    assert w.queue.depth() == {"ready": 1, "deferred": 0, "active": 1, "held": 0}
    # The acceptor's report arrives after all, with the body.
    env = envelope(queue_id, received_at=w.clock.seconds())
    w.queue.enqueue(env, OTHER_BODY)
    w.queue.enqueue(env)
    w.clock.advance(0)
    assert w.queue.depth() == {"ready": 1, "deferred": 0, "active": 1, "held": 0}
    provider.release()  # the first is done, the adopted one starts
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 1, "held": 0}
    provider.release()
    w.clock.advance(0)
    assert [m.queue_id for m in provider.delivered] == [qid(1), queue_id]
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": 0}
    assert w.queued() == []


def test_a_report_while_the_adopted_message_is_being_attempted_starts_no_second_attempt(
    tmp_path: Path,
) -> None:
    provider = FakeProvider("p1", hold=True)
    w = World(tmp_path, provider)
    w.start()
    queue_id = write_behind_the_queues_back(w, 1)
    assert result_of(adopt(w)) == 1
    assert w.queue.depth()["active"] == 1
    w.queue.enqueue(envelope(queue_id, received_at=w.clock.seconds()), OTHER_BODY)
    w.clock.advance(0)
    assert len(provider.delivered) == 1
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 1, "held": 0}
    provider.release()
    w.clock.advance(0)
    assert len(provider.delivered) == 1
    assert w.queued() == []
    assert w.queue.depth() == {"ready": 0, "deferred": 0, "active": 0, "held": 0}


def test_a_deferred_adopted_message_is_not_hurried_by_a_late_report(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY))
    w = World(tmp_path, provider)
    w.start()
    queue_id = write_behind_the_queues_back(w, 1)
    assert result_of(adopt(w)) == 1
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}
    w.queue.enqueue(envelope(queue_id, received_at=w.clock.seconds()), OTHER_BODY)
    w.clock.advance(0)
    assert len(provider.delivered) == 1  # it waits for its retry time
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}


def test_adopt_before_the_start_up_scan_waits_for_it(tmp_path: Path) -> None:
    w = World(tmp_path)
    queue_id = w.put(1)  # in the spool before the start: the scan's to find
    adopted = adopt(w)
    assert not has_fired(adopted)
    w.start()
    assert result_of(adopted) == 0  # the start-up scan indexed it, not the adoption
    assert [m.queue_id for m in w.providers[0].delivered] == [queue_id]
    assert result_of(w.queue.indexed) == 1  # its other readers still get its result


def test_adopt_after_stop_adopts_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    result_of(w.stop())
    write_behind_the_queues_back(w, 1)
    assert result_of(adopt(w)) == 0
    assert w.providers[0].delivered == []
    assert len(w.queued()) == 1  # left for the next start


def test_a_message_written_with_a_later_next_attempt_is_adopted_as_deferred(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.start()
    env = envelope(qid(1), received_at=50.0)  # its mtime, the next attempt time, is ahead
    w.spool.write_durably(env, encode_message(env, BODY))
    assert result_of(adopt(w)) == 1
    assert w.queue.depth() == {"ready": 0, "deferred": 1, "active": 0, "held": 0}
    w.clock.advance(49.9)
    assert w.providers[0].delivered == []
    w.clock.advance(0.1)
    assert [m.queue_id for m in w.providers[0].delivered] == [qid(1)]


def test_a_report_after_the_adopted_message_was_delivered_does_not_send_it_again(
    tmp_path: Path,
) -> None:
    """A live process's report can come after a rescan found, delivered and removed its
    message: the queue remembers IDs that left it (review: delivered twice)."""
    w = World(tmp_path)
    w.start()
    queue_id = write_behind_the_queues_back(w, 2)
    assert result_of(adopt(w)) == 1
    assert w.queued() == []  # delivered and gone
    env = envelope(queue_id, received_at=w.clock.seconds())
    w.queue.enqueue(env, OTHER_BODY)  # the late report, with its body
    w.queue.enqueue_id(queue_id)  # and by ID
    w.clock.advance(0)
    assert [m.queue_id for m in w.providers[0].delivered] == [queue_id]


def test_enqueue_id_queues_a_message_known_by_its_id_alone(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.start()
    queue_id = write_behind_the_queues_back(w, 3)
    w.queue.enqueue_id(queue_id)
    w.queue.enqueue_id(queue_id)  # twice: once
    w.clock.advance(0)
    sent = w.providers[0].delivered
    assert [m.queue_id for m in sent] == [queue_id]
    assert sent[0].body == OTHER_BODY


def test_the_rescan_leaves_a_file_younger_than_min_age_to_its_report(tmp_path: Path) -> None:
    """A file another process is committing right now (its report, or its 451, is on the
    way) is not taken: only files that reached queue/ min_age seconds ago or more."""
    w = World(tmp_path)
    w.start()
    w.clock.advance(time.time() - w.clock.seconds())  # the spool's ctimes are wall time
    queue_id = write_behind_the_queues_back(w, 4)
    young = defer.Deferred.fromCoroutine(w.queue.adopt_unindexed(min_age=60))
    assert result_of(young) == 0
    assert w.queued() == [queue_id]
    w.clock.advance(61)
    old = defer.Deferred.fromCoroutine(w.queue.adopt_unindexed(min_age=60))
    assert result_of(old) == 1
