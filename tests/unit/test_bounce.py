"""DSNs (RFC 3464) for permanent failures: built right, sent through the relay, never looping."""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from pathlib import Path

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock

from mailrelay.bounce import build_dsn, original_headers, status_of
from mailrelay.metrics import Metrics
from mailrelay.outbound.results import Kind
from mailrelay.outbound.router import Router
from mailrelay.queue import DeliveryQueue, RetryPolicy
from mailrelay.spool.format import Outcome, Status
from tests.unit.fakes import (
    FakeProvider,
    answer_all,
    answer_by_recipient,
    envelope,
    make_spool,
    result_of,
    store,
)

A, B = "a@example.test", "b@example.test"
BODY = b"From: app@example.test\r\nSubject: quarterly report\r\n\r\nsecret body text\r\n"
POLICY = RetryPolicy(initial=60, maximum=600, lifetime=3600)


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def delivery_status(dsn: Message) -> list[Message]:
    """The per-message block, then one block per recipient, of the message/delivery-status part."""
    (part,) = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def make_queue(tmp_path: Path, provider: FakeProvider, reporting_mta: str | None = "relay.test"):  # type: ignore[no-untyped-def]
    clock = Clock()
    spool = make_spool(tmp_path, now=clock.seconds)
    queue = DeliveryQueue(
        clock,
        spool,
        Router([provider]),
        POLICY,
        Metrics(),
        rand=lambda: 0.5,
        reporting_mta=reporting_mta,
    )
    result_of(defer.Deferred.fromCoroutine(queue.start()))
    return clock, spool, queue


def send(spool, queue, recipients, sender="sender@example.test"):  # type: ignore[no-untyped-def]
    env = attrs.evolve(envelope(recipients=recipients), sender=sender)
    queue_id = store(spool, env, BODY)
    queue.enqueue(env)
    return queue_id


def test_status_comes_from_the_reply_where_it_says_one() -> None:
    assert status_of("550 5.1.1 no such user", expired=False) == "5.1.1"
    assert status_of("554 rejected", expired=False) == "5.0.0"
    assert status_of("message expired: undeliverable for too long", expired=True) == "4.4.7"
    assert status_of("451 4.7.1 greylisted", expired=True) == "4.7.1"


def test_dsn_is_a_valid_delivery_status_report() -> None:
    failed = [Outcome(B, Status.FAILED, "550 5.1.1 <b@example.test>: no such user", "p1", 50.0)]
    env = attrs.evolve(envelope(recipients=(A, B)), sender="app@example.test")
    raw = build_dsn(env, failed, BODY, "relay.test", now=100.0)
    assert raw.isascii() and b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    dsn = parse(raw)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"] == "<app@example.test>"
    assert dsn["Auto-Submitted"] == "auto-replied"
    per_message, per_recipient = delivery_status(dsn)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_recipient["Final-Recipient"] == "rfc822; b@example.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <b@example.test>: no such user"
    # The original's headers come back; its body does not.
    (headers,) = [p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers"]
    returned = headers.get_payload()
    assert "Subject: quarterly report" in returned
    assert "secret body text" not in raw.decode()


def test_original_headers_stop_at_the_blank_line() -> None:
    assert original_headers(BODY) == b"From: app@example.test\r\nSubject: quarterly report\r\n"


def test_permanent_failure_sends_a_dsn_through_the_relay_and_removes_the_original(
    tmp_path: Path,
) -> None:
    provider = FakeProvider("p1", answer_by_recipient({B: Kind.PERMANENT}))
    _, spool, queue = make_queue(tmp_path, provider)
    send(spool, queue, (A, B))
    original, dsn = provider.delivered
    assert original.recipients == (A, B)
    # The DSN goes from the null sender to the original sender, through the same chain.
    assert (dsn.sender, dsn.recipients) == ("", ("sender@example.test",))
    (block,) = delivery_status(parse(dsn.body))[1:]
    assert block["Final-Recipient"] == "rfc822; b@example.test"
    assert block["Status"] == "5.1.1"
    assert list(spool.queue.iterdir()) == [] and list(spool.failed.iterdir()) == []
    assert queue._metrics.registry.get_sample_value("mailrelay_messages_bounced_total") == 1


def test_expired_message_sends_a_dsn_with_the_last_temporary_reply(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.TEMPORARY, "451 4.3.0 mailbox busy"))
    clock, spool, queue = make_queue(tmp_path, provider)
    send(spool, queue, (A,))
    for _ in range(20):
        clock.advance(POLICY.maximum * 1.2)
    dsn = provider.delivered[-1]
    assert dsn.sender == ""
    (block,) = delivery_status(parse(dsn.body))[1:]
    assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert "expired" in block["Diagnostic-Code"]


def test_no_dsn_to_the_null_sender(tmp_path: Path) -> None:
    """A bounce that fails is never bounced again: it becomes a dead letter."""
    provider = FakeProvider("p1", answer_all(Kind.PERMANENT))
    _, spool, queue = make_queue(tmp_path, provider)
    queue_id = send(spool, queue, (A,), sender="")
    assert len(provider.delivered) == 1
    assert sorted(p.name for p in spool.failed.iterdir()) == [queue_id, queue_id + ".journal"]


def test_deadletter_mode_keeps_the_message_in_failed_and_sends_nothing(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.PERMANENT))
    _, spool, queue = make_queue(tmp_path, provider, reporting_mta=None)
    queue_id = send(spool, queue, (A,))
    assert [m.recipients for m in provider.delivered] == [(A,)]
    assert sorted(p.name for p in spool.failed.iterdir()) == [queue_id, queue_id + ".journal"]


def test_the_dsn_itself_failing_ends_in_failed_without_a_loop(tmp_path: Path) -> None:
    provider = FakeProvider("p1", answer_all(Kind.PERMANENT))
    _, spool, queue = make_queue(tmp_path, provider)
    send(spool, queue, (A,))
    assert [m.sender for m in provider.delivered] == ["sender@example.test", ""]
    # The failed DSN (null sender) is a dead letter; nothing more is sent.
    assert len([p for p in spool.failed.iterdir() if not p.name.endswith(".journal")]) == 1
    assert list(spool.queue.iterdir()) == []
