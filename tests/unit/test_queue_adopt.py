"""DeliveryQueue.adopt_unindexed: mail an acceptor process made durable in queue/ but never
reported (it died first) is found and delivered, once; a report that comes after all is
ignored."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer

from mailrelay.outbound.results import Kind
from mailrelay.spool.format import encode_message
from mailrelay.spool.store import is_queue_id, new_queue_id, queue_id_tag
from tests.unit.fakes import FakeProvider, answer_all, envelope, has_fired, result_of
from tests.unit.test_queue import BODY, World, qid

OTHER_BODY = b"Subject: behind its back\r\n\r\nwritten by an acceptor\r\n"


def write_behind_the_queues_back(w: World, n: int) -> str:
    """A message file in queue/, written as an acceptor does, that the queue is not told of."""
    env = envelope(qid(n), received_at=w.clock.seconds())
    w.spool.write_durably(env, encode_message(env, OTHER_BODY))
    return env.queue_id


TAG = queue_id_tag(qid(0))  # the tag of the test IDs: those of the "dead acceptor"


def adopt(w: World, tag: int = TAG) -> defer.Deferred[int]:
    return defer.Deferred.fromCoroutine(w.queue.adopt_unindexed(tag))


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


def test_the_rescan_takes_the_dead_processs_files_only(tmp_path: Path) -> None:
    """Another process's file not yet reported may be a commit under way (its report, or its
    451 and removal, is coming): the rescan after an acceptor's exit takes only IDs with that
    acceptor's tag (review: a 451'd message delivered, or one delivered twice)."""
    w = World(tmp_path)
    w.start()
    theirs = new_queue_id(w.clock.seconds(), tag=7)
    env = envelope(theirs, received_at=w.clock.seconds())
    w.spool.write_durably(env, encode_message(env, OTHER_BODY))
    assert queue_id_tag(theirs) == 7
    assert result_of(adopt(w, tag=8)) == 0
    assert w.queued() == [theirs]
    assert result_of(adopt(w, tag=7)) == 1
    assert w.queued() == []


def test_ids_with_a_tag_keep_their_order_and_form() -> None:
    first = new_queue_id(1000.0, tag=3)
    later = new_queue_id(1000.5, tag=0)
    assert is_queue_id(first) and is_queue_id(later)
    assert first < later  # time-sortable whatever the tag
    assert queue_id_tag(first) == 3 and queue_id_tag(later) == 0
    assert queue_id_tag(new_queue_id(1000.0, tag=255)) == 255
