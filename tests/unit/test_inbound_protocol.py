"""The inbound ESMTP server, driven through StringTransport, task.Clock and a real spool.

Each test names the behaviour it checks; the cases follow shared/reliability.md (inbound 1-17)
and shared/twisted-pitfalls.md (items 1-14).
"""

from __future__ import annotations

import email.utils
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import smtp

from mailrelay.config import SMTPConfig
from mailrelay.diskspace import CACHE_SECONDS, FreeSpace
from mailrelay.inbound.delivery import RelayDelivery, Transaction
from mailrelay.inbound.protocol import (
    CLOSE_GRACE,
    HELD_INPUT_MAX,
    REPLY_BATCH_MAX,
    RelayESMTP,
)
from mailrelay.spool.store import MessageWriter, Spool, SpoolWriteError

from .helpers_inbound import (
    HOSTNAME,
    LOCAL_V4,
    ManualRunner,
    Session,
    SmallBufferTransport,
    StatvfsStub,
    make_factory,
    open_session,
    smtp_config,
)

SessionMaker = Callable[..., Session]


@pytest.fixture
def session(tmp_path: Path) -> SessionMaker:
    """``session(config=..., peer=..., runner=..., transport=..., free_space=...)`` opens a
    session on tmp_path."""

    def make(
        config: SMTPConfig | None = None,
        peer: IAddress = LOCAL_V4,
        runner: Any = None,
        transport: StringTransport | None = None,
        free_space: FreeSpace | None = None,
    ) -> Session:
        s = open_session(
            tmp_path,
            config=config,
            peer=peer,
            runner=runner,
            transport=transport,
            free_space=free_space,
        )
        assert s.replies() == [f"220 {HOSTNAME} ESMTP mailrelay"]
        return s

    return make


def _connections(s_metrics: Any, result: str) -> float:
    value = s_metrics.registry.get_sample_value(
        "mailrelay_smtp_connections_total", {"result": result}
    )
    return value or 0.0


def _rejected(s: Session, reason: str) -> float:
    value = s.metrics.registry.get_sample_value(
        "mailrelay_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


# -- the loopback gate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "10.0.0.1", 1234),
        IPv4Address("TCP", "192.168.1.1", 1234),
        IPv6Address("TCP", "2001:db8::1", 1234),
        IPv6Address("TCP", "::ffff:10.0.0.1", 1234),
    ],
    ids=str,
)
def test_factory_refuses_non_loopback_peer_and_counts_it(tmp_path: Path, peer: IAddress) -> None:
    factory = make_factory(tmp_path)
    assert factory.buildProtocol(peer) is None
    assert factory.buildProtocol(peer) is None
    assert _connections(factory.metrics, "refused_nonlocal") == 2
    assert _connections(factory.metrics, "accepted") == 0
    assert factory.active == set()


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "127.0.0.1", 1234),
        IPv4Address("TCP", "127.1.2.3", 1234),
        IPv6Address("TCP", "::1", 1234),
        IPv6Address("TCP", "::ffff:127.0.0.1", 1234),
        UNIXAddress(b"/run/mailrelay.sock"),
        UNIXAddress(None),
    ],
    ids=str,
)
def test_factory_accepts_loopback_and_unix_peers_with_a_banner(
    tmp_path: Path, peer: IAddress
) -> None:
    factory = make_factory(tmp_path)
    proto = factory.buildProtocol(peer)
    assert isinstance(proto, RelayESMTP)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    assert transport.value() == f"220 {HOSTNAME} ESMTP mailrelay\r\n".encode()
    assert _connections(factory.metrics, "accepted") == 1
    assert _connections(factory.metrics, "refused_nonlocal") == 0


def test_unix_socket_client_can_send_a_message(session: SessionMaker) -> None:
    s = session(peer=UNIXAddress(b"/run/mailrelay.sock"))
    s.start_data()
    s.send(b"Subject: over a UNIX socket\r\n\r\nhi\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert len(s.queue_files()) == 1


@pytest.mark.parametrize(
    "peer", [IPv4Address("TCP", "10.0.0.1", 1), IPv6Address("TCP", "::ffff:10.0.0.1", 1)], ids=str
)
def test_delivery_refuses_non_local_peer_at_every_step(tmp_path: Path, peer: IAddress) -> None:
    """Second gate: even if the factory let a remote peer through, RelayDelivery answers 554."""
    factory = make_factory(tmp_path)
    delivery = RelayDelivery(
        peer=peer,
        hostname=HOSTNAME,
        spool=factory.spool,
        clock=factory.clock,
        on_accepted=lambda envelope, body: factory.accepted.append(envelope),
        metrics=factory.metrics,
    )
    user = smtp.User(b"a@b.c", (b"x", b"10.0.0.1"), None, smtp.Address(b"s@b.c"))
    transaction = Transaction(helo="x", sender="s@b.c", recipients=("a@b.c",), body_8bit=False)
    steps: list[Callable[[], object]] = [
        lambda: delivery.validateFrom((b"x", b"10.0.0.1"), smtp.Address(b"s@b.c")),
        lambda: delivery.validateTo(user),
        lambda: delivery.openMessage(transaction),
    ]
    for step in steps:
        with pytest.raises(smtp.SMTPServerError) as caught:
            step()
        assert caught.value.code == 554
        assert str(caught.value.resp).startswith("5.7.1 ")
    assert list(factory.spool.tmp.iterdir()) == []


def test_protocol_answers_554_to_mail_from_a_non_local_peer(tmp_path: Path) -> None:
    peer = IPv4Address("TCP", "10.0.0.1", 1234)
    factory = make_factory(tmp_path)
    delivery = RelayDelivery(
        peer=peer,
        hostname=HOSTNAME,
        spool=factory.spool,
        clock=factory.clock,
        on_accepted=lambda envelope, body: factory.accepted.append(envelope),
        metrics=factory.metrics,
    )
    proto = RelayESMTP(smtp_config(), factory.clock, delivery, factory.metrics)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    lines = transport.value().split(b"\r\n")
    assert lines[-3] == b"554 5.7.1 Relay access denied: local clients only"
    assert lines[-2].startswith(b"503 5.5.1")  # RCPT: the MAIL was not accepted
    assert list(factory.spool.queue.iterdir()) == []


def test_connection_limit_answers_421_and_frees_a_slot_on_disconnect(tmp_path: Path) -> None:
    factory = make_factory(tmp_path, smtp_config(max_connections=2))
    protos = []
    for _ in range(2):
        proto = factory.buildProtocol(LOCAL_V4)
        assert isinstance(proto, RelayESMTP)
        proto.makeConnection(StringTransport(peerAddress=LOCAL_V4))
        protos.append(proto)

    refused = factory.buildProtocol(LOCAL_V4)
    assert refused is not None and not isinstance(refused, RelayESMTP)
    transport = StringTransport(peerAddress=LOCAL_V4)
    refused.makeConnection(transport)
    assert transport.value() == (
        f"421 4.7.0 {HOSTNAME} Too many connections, try again later\r\n".encode()
    )
    assert transport.disconnecting
    assert _connections(factory.metrics, "refused_limit") == 1

    protos[0].connectionLost(None)
    assert isinstance(factory.buildProtocol(LOCAL_V4), RelayESMTP)


# -- a whole transaction ---------------------------------------------------------------------------


def test_ehlo_advertises_size_pipelining_8bitmime_enhancedstatuscodes(
    session: SessionMaker,
) -> None:
    s = session(smtp_config(max_message_size=1_000_000))
    s.send(b"EHLO client.test\r\n")
    assert s.replies() == [
        f"250-{HOSTNAME} Hello client.test [127.0.0.1]",
        "250-SIZE 1000000",
        "250-PIPELINING",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ]


def test_helo_is_answered_with_a_single_250(session: SessionMaker) -> None:
    s = session()
    s.send(b"HELO client.test\r\n")
    assert s.replies() == [f"250 {HOSTNAME} Hello client.test [127.0.0.1]"]


def test_transaction_with_three_recipients_makes_exactly_one_spool_file(
    session: SessionMaker,
) -> None:
    s = session()
    s.send(b"EHLO client.test\r\n")
    s.replies()
    s.send(b"MAIL FROM:<sender@example.com>\r\n")
    assert s.replies() == ["250 2.1.0 Sender OK"]
    for n in range(3):
        s.send(b"RCPT TO:<r%d@example.org>\r\n" % n)
        assert s.replies() == ["250 2.1.5 Recipient OK"]
    s.send(b"DATA\r\n")
    assert s.replies() == ["354 End data with <CR><LF>.<CR><LF>"]
    s.send(b"Subject: t\r\n\r\n..starts with a dot\r\n..\r\n...\r\nend\r\n.\r\n")

    [reply] = s.replies()
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    assert [p.name for p in s.queue_files()] == [queue_id]
    assert s.tmp_files() == []

    [stored] = s.stored()
    assert stored.envelope.queue_id == queue_id
    assert stored.envelope.sender == "sender@example.com"
    assert stored.envelope.recipients == ("r0@example.org", "r1@example.org", "r2@example.org")
    assert stored.envelope.client == "127.0.0.1"
    assert stored.envelope.helo == "client.test"
    assert stored.envelope.body_8bit is False

    # Byte for byte, plus the Date: and Message-ID: the header lacked (headers.py).
    added = (
        f"Date: {email.utils.formatdate(s.clock.seconds(), localtime=True)}\r\n"
        f"Message-ID: <{queue_id}@{HOSTNAME}>\r\n"
    ).encode()
    message = b"Subject: t\r\n" + added + b"\r\n.starts with a dot\r\n.\r\n..\r\nend\r\n"
    assert stored.body.endswith(message)
    received = stored.body[: -len(message)]
    assert received.startswith(
        b"Received: from client.test ([127.0.0.1])\r\n"
        b"\tby relay.test (mailrelay) with ESMTP id " + queue_id.encode() + b";\r\n\t"
    )
    assert received.endswith(b"\r\n") and received.count(b"\r\n") == 3

    assert [e.queue_id for e in s.accepted] == [queue_id]
    registry = s.metrics.registry
    assert registry.get_sample_value("mailrelay_messages_received_total") == 1
    assert registry.get_sample_value("mailrelay_recipients_received_total") == 3


def test_single_recipient_message_gets_a_for_clause_and_8bitmime_is_recorded(
    session: SessionMaker,
) -> None:
    s = session()
    s.send(
        b"EHLO c\r\nMAIL FROM:<> BODY=8BITMIME\r\nRCPT TO:<only@example.org>\r\nDATA\r\n"
        b"\xc3\xa9t\xc3\xa9\r\n.\r\n"
    )
    assert s.codes()[-4:] == ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"]
    [stored] = s.stored()
    assert stored.envelope.sender == ""
    assert stored.envelope.body_8bit is True
    assert b"\r\n\tfor <only@example.org>;\r\n" in stored.body
    assert stored.body.endswith(b"\r\n\xc3\xa9t\xc3\xa9\r\n")


def test_two_transactions_in_one_session_make_two_files(session: SessionMaker) -> None:
    s = session()
    for _ in range(2):
        s.start_data()
        s.send(b"hello\r\n.\r\n")
        assert s.codes() == ["250 2.0.0"]
    assert len(s.queue_files()) == 2


def test_empty_message_is_spooled_with_received_date_and_message_id(
    session: SessionMaker,
) -> None:
    s = session()
    s.start_data()
    s.send(b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    [stored] = s.stored()
    assert stored.body.startswith(b"Received: ") and stored.body.count(b"\r\n") == 6
    assert stored.body.endswith(
        f"\r\nMessage-ID: <{stored.envelope.queue_id}@{HOSTNAME}>\r\n".encode()
    )


@pytest.mark.parametrize(
    "sender, recipient, stored_sender, stored_recipient",
    [
        (b"<a@[127.0.0.1]>", b"<b@[IPv6:::1]>", "a@[127.0.0.1]", "b@[IPv6:::1]"),
        (
            b'<"a\\"b"@example.com>',
            b'<"john smith"@example.org>',
            '"a\\"b"@example.com',
            '"john smith"@example.org',
        ),
        (b"<@relay.example:a@example.com>", b"<Postmaster>", "a@example.com", "Postmaster"),
    ],
)
def test_addresses_twisted_cannot_parse_are_accepted_and_stored_as_given(
    session: SessionMaker,
    sender: bytes,
    recipient: bytes,
    stored_sender: str,
    stored_recipient: str,
) -> None:
    """Address literals and quoted pairs used to raise out of dataReceived (Twisted's parser);
    a bare Postmaster must not become Postmaster@<our host name>."""
    s = session()
    s.send(b"EHLO c\r\nMAIL FROM:" + sender + b"\r\nRCPT TO:" + recipient + b"\r\nDATA\r\n")
    assert s.codes()[-3:] == ["250 2.1.0", "250 2.1.5", "354 End"]
    s.send(b"x\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    [stored] = s.stored()
    assert stored.envelope.sender == stored_sender
    assert stored.envelope.recipients == (stored_recipient,)


def test_quit_says_221_and_closes(session: SessionMaker) -> None:
    s = session()
    s.send(b"QUIT\r\nNOOP\r\n")
    assert s.replies() == ["221 2.0.0 Bye"]
    assert s.closed


# -- reply order under pipelining (pitfall 4) ----------------------------------------------------


def test_pipelined_mail_rcpt_rcpt_data_are_answered_in_order(session: SessionMaker) -> None:
    s = session()
    s.send(b"EHLO c\r\n")
    s.replies()
    s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<g@h.i>\r\nDATA\r\n")
    assert s.codes() == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End"]


def test_mail_after_the_dot_waits_for_the_fsync_and_is_answered_after_it(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert s.replies() == []  # neither the message nor the MAIL is answered yet
    # (held unprocessed; reading pauses only past HELD_INPUT_MAX)
    assert s.proto._buffer == b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"
    assert s.queue_files() == []
    assert len(runner.pending) == 1

    runner.complete()
    replies = s.replies()
    assert replies[0].startswith("250 2.0.0 Ok: queued as ")
    assert replies[1:] == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]
    assert s.transport.producerState == "producing"
    assert len(s.queue_files()) == 1


def test_quit_after_the_dot_closes_only_after_the_message_is_acknowledged(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\nQUIT\r\n")
    assert s.replies() == []
    assert not s.closed

    runner.complete()
    replies = s.replies()
    assert len(replies) == 2
    assert replies[0].startswith("250 2.0.0 Ok: queued as ")
    assert replies[1] == "221 2.0.0 Bye"
    assert s.closed


def test_input_arriving_while_paused_is_processed_in_order_after_the_fsync(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.send(b"NOOP\r\n")
    s.send(b"RSET\r\n")
    assert s.replies() == []
    runner.complete()
    assert s.codes() == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert s.transport.producerState == "producing"


def test_a_flood_while_the_commit_is_pending_pauses_reading_at_the_limit(
    session: SessionMaker,
) -> None:
    """Input is held, not read without end, while the 250 is owed: past HELD_INPUT_MAX the
    transport stops reading; after the reply everything held is answered in order."""
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    noops = b"NOOP\r\n" * (HELD_INPUT_MAX // 6 - 10)
    s.send(noops)
    assert s.transport.producerState == "producing"  # under the limit: still reading
    s.send(b"NOOP\r\n" * 20)
    assert s.transport.producerState == "paused"
    assert s.replies() == []

    runner.complete()
    codes = s.codes()
    assert codes[0] == "250 2.0.0"  # the message first
    assert len(codes) == 1 + noops.count(b"NOOP") + 20
    assert s.transport.producerState == "producing"


def test_failed_fsync_is_answered_451_before_the_pipelined_mail(session: SessionMaker) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\nMAIL FROM:<a@b.c>\r\n")
    assert s.replies() == []
    runner.fail(SpoolWriteError("No space left on device"))
    assert s.replies() == [
        "451 4.3.0 Local error: message not accepted, try again later",
        "250 2.1.0 Sender OK",
    ]
    assert s.accepted == []
    assert _rejected(s, "spool_error") == 1


def test_idle_timeout_does_not_fire_while_the_server_waits_on_its_own_fsync(
    session: SessionMaker,
) -> None:
    """The client is waiting for us, not idle; a 421 then a 250 would break the protocol."""
    runner = ManualRunner()
    s = session(smtp_config(idle_timeout=10), runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.clock.advance(60)
    assert s.replies() == []
    assert not s.closed
    runner.complete()
    assert s.codes() == ["250 2.0.0"]
    s.clock.advance(9)
    assert not s.closed
    s.clock.advance(2)  # the idle timer runs again once the reply is out
    assert s.codes() == ["421 4.4.2"]


def test_session_deadline_during_the_fsync_closes_right_after_the_250(
    session: SessionMaker,
) -> None:
    """A 421 before the 250 made the client retry a message that was queued: a duplicate."""
    runner = ManualRunner()
    s = session(smtp_config(session_timeout=30), runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\nNOOP\r\n")
    s.clock.advance(31)
    assert s.replies() == []
    assert not s.closed

    runner.complete()
    replies = s.replies()
    assert len(replies) == 2, replies  # the pipelined NOOP is never run
    assert replies[0].startswith("250 2.0.0 Ok: queued as ")
    assert replies[1] == f"421 4.4.2 {HOSTNAME} Session too long, closing connection"
    assert s.closed
    assert len(s.queue_files()) == 1 and len(s.accepted) == 1
    assert s.transport.producer is None


def test_session_deadline_during_a_failing_fsync_closes_right_after_the_451(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(smtp_config(session_timeout=30), runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.clock.advance(31)
    assert s.replies() == []
    runner.fail(SpoolWriteError("No space left on device"))
    assert s.replies() == [
        "451 4.3.0 Local error: message not accepted, try again later",
        f"421 4.4.2 {HOSTNAME} Session too long, closing connection",
    ]
    assert s.closed
    assert s.queue_files() == [] and s.accepted == []


def test_nothing_is_written_after_a_disconnect_while_the_fsync_is_pending(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.disconnect()
    runner.complete()
    assert s.replies() == []
    assert s.clock.getDelayedCalls() == []


def test_input_held_for_a_pending_mail_is_kept_exactly_and_run_in_order(
    session: SessionMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parser cuts the buffer once per batch: what follows the waiting command must stay."""
    pending: defer.Deferred[Any] = defer.Deferred()
    monkeypatch.setattr(RelayDelivery, "validateFrom", lambda self, helo, origin: pending)
    s = session()
    s.send(b"EHLO c\r\n")
    s.replies()
    s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nNOOP\r\nNOO")
    assert s.replies() == []
    assert s.proto._buffer == b"RCPT TO:<d@e.f>\r\nNOOP\r\nNOO"
    pending.callback(None)
    assert s.codes() == ["250 2.1.0", "250 2.1.5", "250 2.0.0"]
    assert s.proto._buffer == b"NOO"
    s.send(b"P\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_twenty_thousand_pipelined_noops_in_one_write_are_answered_in_order(
    session: SessionMaker,
) -> None:
    """Cutting the buffer after every line made this O(n^2); now it is one pass (no timing
    assertion here: 20 000 lines took 0.20 s before, 80 000 took 1.5 s)."""
    s = session()
    s.send(b"NOOP\r\n" * 20_000 + b"HELP\r\nNO")
    replies = s.replies()
    assert len(replies) == 20_001
    assert replies[:-1] == ["250 2.0.0 OK"] * 20_000
    assert replies[-1].startswith("214 2.0.0 ")
    assert s.proto._buffer == b"NO"


# -- backpressure: the protocol produces its replies for the transport -----------------------------


def test_protocol_registers_as_the_streaming_producer_of_its_replies(
    session: SessionMaker,
) -> None:
    s = session()
    assert s.transport.producer is s.proto
    assert s.transport.streaming is True


def test_paused_output_holds_pipelined_commands_until_resumed(session: SessionMaker) -> None:
    s = session()
    s.proto.pauseProducing()
    assert s.transport.producerState == "paused"
    s.send(b"NOOP\r\nHELP\r\nVRFY x\r\n")
    assert s.replies() == []
    assert s.transport.producerState == "paused"

    s.proto.resumeProducing()
    assert s.codes() == ["250 2.0.0", "214 2.0.0", "252 2.5.0"]
    assert s.transport.producerState == "producing"


def test_client_that_never_reads_cannot_grow_the_send_buffer(
    session: SessionMaker, tmp_path: Path
) -> None:
    """HELP in a loop without reading grew the server by 69.5 MB in 8 s (review)."""
    transport = SmallBufferTransport(limit=200, peerAddress=LOCAL_V4)
    s = session(transport=transport)
    s.send(b"HELP\r\n" * 1000)
    answered = len(s.replies())
    # The replies to one read go out together, REPLY_BATCH_MAX octets at most at a time.
    help_reply = len(b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT\r\n")
    assert 0 < answered < REPLY_BATCH_MAX // help_reply + 2
    assert transport.producerState == "paused"  # and reading is paused too
    assert s.proto._buffer == b"HELP\r\n" * (1000 - answered)  # the rest kept, unparsed

    for _ in range(1000):  # the client reads a little at a time
        if not s.proto._buffer:
            break
        transport.drain()
        answered += len(s.replies())
    assert answered == 1000
    # never more than one batch of replies past the limit
    assert transport.most_unsent < 200 + REPLY_BATCH_MAX + 100
    transport.drain()
    assert transport.producerState == "producing"


def test_input_stays_held_while_a_commit_is_pending_even_if_output_resumes(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\nNOOP\r\n")
    s.proto.pauseProducing()
    s.proto.resumeProducing()  # output may flow again, but the 250 is still owed
    assert s.replies() == []

    runner.complete()
    assert s.codes() == ["250 2.0.0", "250 2.0.0"]
    assert s.transport.producerState == "producing"


def test_commit_finishing_while_output_is_paused_is_answered_but_the_rest_waits(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\nNOOP\r\n")
    s.proto.pauseProducing()
    runner.complete()
    assert s.codes() == ["250 2.0.0"]  # the reply to the dot, owed already
    assert s.transport.producerState == "paused"
    s.proto.resumeProducing()
    assert s.codes() == ["250 2.0.0"]
    assert s.transport.producerState == "producing"


@pytest.mark.parametrize(
    "ending",
    [b"QUIT\r\n", b"GET / HTTP/1.0\r\n", b"NOOP " + b"x" * 600 + b"\r\n"],
    ids=["quit", "http", "too-long"],
)
def test_closing_unregisters_the_producer_so_tcp_can_close(
    session: SessionMaker, ending: bytes
) -> None:
    """A TCP transport does not close while a producer is registered."""
    s = session()
    assert s.transport.producer is s.proto
    s.send(ending)
    assert s.closed
    assert s.transport.producer is None


def test_idle_timeout_while_output_is_paused_closes_and_unregisters(
    session: SessionMaker,
) -> None:
    s = session(smtp_config(idle_timeout=10))
    s.proto.pauseProducing()
    s.send(b"NOOP\r\n")
    s.clock.advance(11)
    assert s.codes() == ["421 4.4.2"]
    assert s.closed
    assert s.transport.producer is None
    s.proto.resumeProducing()  # a late resume does nothing
    assert s.replies() == []


def test_disconnect_while_output_is_paused_is_clean(session: SessionMaker) -> None:
    s = session()
    s.start_data()
    s.proto.pauseProducing()
    s.send(b"Subject: x\r\n\r\n" + (b"y" * 998 + b"\r\n") * 600)
    s.disconnect()
    assert s.tmp_files() == [] and s.queue_files() == []
    assert s.factory.active == set()
    assert s.clock.getDelayedCalls() == []


# -- line length and floods (pitfalls 6, 7) --------------------------------------------------------


def test_command_line_of_exactly_512_octets_is_accepted(session: SessionMaker) -> None:
    s = session()
    line = b"NOOP " + b"x" * (510 - 5) + b"\r\n"
    assert len(line) == 512
    s.send(line)
    assert s.replies() == ["250 2.0.0 OK"]


def test_command_line_of_512_octets_sent_one_byte_at_a_time_is_accepted(
    session: SessionMaker,
) -> None:
    s = session()
    line = b"NOOP " + b"x" * (510 - 5) + b"\r\n"
    for i in range(len(line)):
        s.send(line[i : i + 1])
    assert s.replies() == ["250 2.0.0 OK"]
    assert not s.closed


def test_command_line_of_513_octets_is_refused_and_closes(session: SessionMaker) -> None:
    s = session()
    s.send(b"NOOP " + b"x" * (511 - 5) + b"\r\nNOOP\r\n")
    assert s.replies() == ["500 5.5.2 Line too long, closing connection"]
    assert s.closed


def test_data_line_of_exactly_1000_octets_is_accepted_and_stored(session: SessionMaker) -> None:
    s = session()
    s.start_data()
    line = b"y" * 998 + b"\r\n"
    for i in range(0, len(line), 7):  # arrives in pieces, split inside the CRLF at the end
        s.send(line[i : i + 7])
    s.send(b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    [stored] = s.stored()
    assert stored.body.endswith(b"\r\n" + line)


def test_a_dot_stuffed_line_may_be_one_octet_longer(session: SessionMaker) -> None:
    """RFC 5321 4.5.3.1.6: the 1000 octets do not count the dot added by stuffing; the next
    octet is one too many."""
    s = session()
    s.start_data()
    s.send(b"." + b"." + b"y" * 997 + b"\r\n")  # 998 octets of content, stuffed
    s.send(b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    [stored] = s.stored()
    assert stored.body.endswith(b"\r\n." + b"y" * 997 + b"\r\n")
    s = session()
    s.start_data()
    s.send(b".." + b"y" * 998 + b"\r\n")
    assert s.replies() == ["500 5.5.2 Line too long, closing connection"]


def test_overlong_data_line_closes_and_the_rest_is_never_run_as_commands(
    session: SessionMaker,
) -> None:
    s = session()
    s.start_data()
    s.send(b"ok line\r\n" + b"z" * 999 + b"\r\nRSET\r\nMAIL FROM:<evil@x.y>\r\nRCPT TO:<v@w.x>\r\n")
    s.send(b"DATA\r\nsmuggled\r\n.\r\n")
    assert s.replies() == ["500 5.5.2 Line too long, closing connection"]
    assert s.closed
    assert s.queue_files() == []
    assert s.tmp_files() == []


@pytest.mark.parametrize("in_data", [False, True], ids=["command", "data"])
def test_two_megabytes_without_crlf_close_the_session_and_keep_the_buffer_small(
    session: SessionMaker, in_data: bool
) -> None:
    s = session()
    if in_data:
        s.start_data()
    chunk = b"A" * 65536
    for _ in range(32):  # 2 MiB, as the reactor would hand it over
        s.send(chunk)
        assert len(s.proto._buffer) <= 1000
    assert s.replies() == ["500 5.5.2 Line too long, closing connection"]
    assert s.closed
    assert s.queue_files() == [] and s.tmp_files() == []


def test_complete_line_followed_by_megabytes_without_crlf_in_data_closes(
    session: SessionMaker,
) -> None:
    s = session()
    s.start_data()
    s.send(b"a normal line\r\n" + b"C" * 2_000_000)
    assert s.codes() == ["500 5.5.2"]
    assert s.closed
    assert len(s.proto._buffer) == 0
    assert s.queue_files() == [] and s.tmp_files() == []


def test_no_crlf_flood_fed_in_small_pieces_closes_before_the_buffer_passes_a_line(
    session: SessionMaker,
) -> None:
    s = session()
    for _ in range(2000):
        s.send(b"B" * 100)
        assert len(s.proto._buffer) <= 512
    assert s.codes() == ["500 5.5.2"]
    assert s.closed


# -- bare CR/LF/NUL and bad addresses (pitfalls 8, 14) --------------------------------------------


@pytest.mark.parametrize("separator", [b"\n", b"\r", b"\x00"], ids=["LF", "CR", "NUL"])
def test_bare_line_break_inside_a_command_is_one_bad_line_not_two_commands(
    session: SessionMaker, separator: bytes
) -> None:
    s = session()
    s.send(b"EHLO a\r\n")
    s.replies()
    s.send(b"EHLO x" + separator + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert s.replies() == [
        "501 5.5.2 Bare CR, LF or NUL in command line",
        "503 5.5.1 Need MAIL before RCPT",  # proves the MAIL never ran
    ]


@pytest.mark.parametrize(
    "command, expected",
    [
        (b"MAIL FROM:<a\rb@c.d>", "501 5.5.2"),
        (b"MAIL FROM:<a\nb@c.d>", "501 5.5.2"),
        (b"MAIL FROM:<a\x00b@c.d>", "501 5.5.2"),
        (b"MAIL FROM:<a\tb@c.d>", "501 5.1.3"),
        (b"MAIL FROM:<a\x7fb@c.d>", "501 5.1.3"),
        (b'MAIL FROM:<"a\x01b"@c.d>', "501 5.1.3"),
        (b"MAIL FROM:<j\xc3\xb6rg@c.d>", "553 5.6.7"),
        (b"MAIL FROM:<jorg@c\xc3\xb6.d>", "553 5.6.7"),
        (b"MAIL FROM:<>", "250 2.1.0"),
    ],
)
def test_control_and_non_ascii_octets_in_the_sender_are_refused(
    session: SessionMaker, command: bytes, expected: str
) -> None:
    s = session()
    s.send(b"EHLO c\r\n")
    s.replies()
    s.send(command + b"\r\n")
    assert s.codes() == [expected]


@pytest.mark.parametrize(
    "recipient, expected",
    [
        (b"<a\rb@c.d>", "501 5.5.2"),
        (b"<a\x00b@c.d>", "501 5.5.2"),
        (b"<a\x1bb@c.d>", "501 5.1.3"),
        (b"<\xe2\x98\x83@c.d>", "553 5.6.7"),
        (b"<>", "501 5.1.3"),
        (b"<nodomain>", "501 5.1.3"),
    ],
)
def test_bad_recipients_are_refused_and_not_added(
    session: SessionMaker, recipient: bytes, expected: str
) -> None:
    s = session()
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")
    s.replies()
    s.send(b"RCPT TO:" + recipient + b"\r\nDATA\r\n")
    assert s.codes() == [expected, "554 5.5.1"]


@pytest.mark.parametrize(
    "helo", [b"EHLO", b"EHLO a\tb", b"EHLO a\x7fb", b"EHLO \xc3\xa9", b"HELO " + b"h" * 256]
)
def test_bad_helo_argument_is_refused_and_mail_still_needs_a_greeting(
    session: SessionMaker, helo: bytes
) -> None:
    s = session()
    s.send(helo + b"\r\nMAIL FROM:<a@b.c>\r\n")
    assert s.codes() == ["501 5.5.4", "503 5.5.1"]


# -- SMTP smuggling (reliability case 7) -----------------------------------------------------------

FAKE_ENDS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\r\n.\r\r\n",
]
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["one-write", "bytewise"])
@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
def test_fake_end_of_data_rejects_the_message_and_runs_nothing_smuggled(
    session: SessionMaker, fake_end: bytes, one_byte_at_a_time: bool
) -> None:
    s = session()
    s.start_data()
    payload = b"Subject: hi\r\n\r\nbody" + fake_end + SMUGGLED + b"\r\n.\r\n"
    if one_byte_at_a_time:
        for i in range(len(payload)):
            s.send(payload[i : i + 1])
    else:
        s.send(payload)
    assert s.replies() == ["550 5.5.2 Bare CR or LF, or NUL, in message text (RFC 5321 2.3.8)"]
    assert s.queue_files() == [] and s.tmp_files() == []
    assert s.accepted == []
    assert _rejected(s, "bare_line_ending") == 1
    # The session is back in command mode with no transaction.
    s.send(b"NOOP\r\nRCPT TO:<d@e.f>\r\n")
    assert s.codes() == ["250 2.0.0", "503 5.5.1"]


# -- limits, parameters and sequence ------------------------------------------------------------


def test_declared_size_over_the_limit_is_refused_at_mail(session: SessionMaker) -> None:
    s = session(smtp_config(max_message_size=100))
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c> SIZE=101\r\nMAIL FROM:<a@b.c> SIZE=100\r\n")
    assert s.codes()[-2:] == ["552 5.3.4", "250 2.1.0"]


@pytest.mark.parametrize("size, accepted", [(100, True), (101, False)])
def test_content_over_the_limit_is_refused_at_the_dot_and_not_spooled(
    session: SessionMaker, size: int, accepted: bool
) -> None:
    s = session(smtp_config(max_message_size=100))
    s.start_data()
    s.send(b"x" * (size - 2) + b"\r\n")
    assert s.replies() == []  # nothing is said before the dot
    s.send(b".\r\n")
    if accepted:
        assert s.codes() == ["250 2.0.0"]
        assert len(s.queue_files()) == 1
    else:
        assert s.replies() == ["552 5.3.4 Message size exceeds fixed maximum message size"]
        assert s.queue_files() == [] and s.tmp_files() == []
        assert _rejected(s, "too_big") == 1


# -- free space on the spool's filesystem -------------------------------------------------------

FLOOR = 100 * 1024 * 1024


@pytest.fixture
def statvfs(monkeypatch: pytest.MonkeyPatch) -> StatvfsStub:
    stub = StatvfsStub(free=FLOOR * 2)
    monkeypatch.setattr(os, "statvfs", stub)
    return stub


def test_mail_gets_452_when_free_space_is_below_the_floor_and_the_session_goes_on(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path
) -> None:
    statvfs.free = FLOOR - 4096
    s = session(free_space=FreeSpace(tmp_path, FLOOR, Clock()))
    s.send(b"EHLO c\r\n")
    s.replies()
    s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\n")
    replies = s.replies()
    assert replies[0] == "452 4.3.1 Insufficient system storage"
    # No transaction was started: what the client pipelined after it is refused in turn (the
    # text as unknown commands), and the session goes on.
    assert [" ".join(r.split(" ")[:2]) for r in replies[1:]] == [
        "503 5.5.1",  # RCPT
        "503 5.5.1",  # DATA
        "500 5.5.2",  # hello
        "500 5.5.2",  # .
        "250 2.0.0",  # NOOP
    ]
    assert not s.closed
    assert s.queue_files() == [] and s.tmp_files() == [] and s.accepted == []
    assert _rejected(s, "low_disk") == 1


def test_mail_is_accepted_when_free_space_is_above_the_floor(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path
) -> None:
    statvfs.free = FLOOR
    s = session(free_space=FreeSpace(tmp_path, FLOOR, Clock()))
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert len(s.queue_files()) == 1
    assert statvfs.calls == [str(tmp_path)]
    assert _rejected(s, "low_disk") == 0


@pytest.mark.parametrize(("size", "accepted"), [(4096, True), (4097, False)])
def test_declared_size_that_would_leave_less_than_the_floor_gets_452(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path, size: int, accepted: bool
) -> None:
    statvfs.free = FLOOR + 4096
    s = session(free_space=FreeSpace(tmp_path, FLOOR, Clock()))
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c> SIZE=%d\r\n" % size)
    expected = "250 2.1.0" if accepted else "452 4.3.1"
    assert s.codes()[-1] == expected
    assert _rejected(s, "low_disk") == (0 if accepted else 1)
    assert s.tmp_files() == []


def test_low_disk_counts_toward_the_error_budget(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path
) -> None:
    statvfs.free = 0
    s = session(smtp_config(max_errors=2), free_space=FreeSpace(tmp_path, FLOOR, Clock()))
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\n")
    assert s.codes()[-2:] == ["452 4.3.1", "421 4.7.0"]
    assert _rejected(s, "low_disk") == 2


def test_free_space_is_checked_after_syntax_and_size_and_before_the_sender(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path
) -> None:
    statvfs.free = 0
    s = session(smtp_config(max_message_size=2000), free_space=FreeSpace(tmp_path, FLOOR, Clock()))
    s.send(b"MAIL FROM:<a@b.c>\r\nEHLO c\r\n")
    s.replies()
    s.send(b"MAIL FROM:<a@b.c\r\nMAIL FROM:<a@b.c> SIZE=2001\r\n")
    assert s.codes() == ["501 5.5.4", "552 5.3.4"]
    assert statvfs.calls == []  # refused before the disk was asked
    s.send(b"MAIL FROM:<a@b.c>\r\n")
    assert s.codes() == ["452 4.3.1"]


def test_mail_is_accepted_again_once_space_is_freed_and_the_cache_expires(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path
) -> None:
    clock = Clock()
    statvfs.free = 0
    s = session(free_space=FreeSpace(tmp_path, FLOOR, clock))
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")
    assert s.codes()[-1] == "452 4.3.1"
    statvfs.free = FLOOR * 2
    s.send(b"MAIL FROM:<a@b.c>\r\n")
    assert s.codes() == ["452 4.3.1"]  # within the second: the cached answer
    clock.advance(CACHE_SECONDS)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert len(statvfs.calls) == 2


def test_statvfs_failure_does_not_stop_mail(
    session: SessionMaker, statvfs: StatvfsStub, tmp_path: Path
) -> None:
    statvfs.error = OSError(errno.EACCES, "Permission denied")
    s = session(free_space=FreeSpace(tmp_path, FLOOR, Clock()))
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_without_free_space_there_is_no_check(session: SessionMaker, statvfs: StatvfsStub) -> None:
    statvfs.free = 0
    s = session()  # min_free_space = 0: the factory gets no FreeSpace
    s.start_mail()
    assert statvfs.calls == []


def test_third_recipient_over_max_recipients_gets_452_and_the_first_two_are_kept(
    session: SessionMaker,
) -> None:
    s = session(smtp_config(max_recipients=2))
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")
    s.replies()
    s.send(b"RCPT TO:<r1@x.y>\r\nRCPT TO:<r2@x.y>\r\nRCPT TO:<r3@x.y>\r\nDATA\r\nhi\r\n.\r\n")
    codes = s.codes()
    assert codes[:4] == ["250 2.1.5", "250 2.1.5", "452 4.5.3", "354 End"]
    assert codes[4] == "250 2.0.0"
    [stored] = s.stored()
    assert stored.envelope.recipients == ("r1@x.y", "r2@x.y")


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"MAIL FROM:<a@b.c> FOO=bar", "555 5.5.4"),
        (b"MAIL FROM:<a@b.c> BODY=BINARYMIME", "501 5.5.4"),
        (b"MAIL FROM:<a@b.c> SIZE=1 SIZE=2", "501 5.5.4"),
        (b"MAIL FROM:<a@b.c> SIZE=lots", "501 5.5.4"),
        (b"MAIL TO:<a@b.c>", "501 5.5.4"),
        (b"MAIL FROM:<a@b.c", "501 5.5.4"),
        (b"MAIL", "501 5.5.4"),
        (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f> NOTIFY=NEVER", "555 5.5.4"),
        (b"MAIL FROM:<a@b.c>\r\nRCPT FROM:<d@e.f>", "501 5.5.4"),
        (b"MAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>", "503 5.5.1"),
        (b"RCPT TO:<d@e.f>", "503 5.5.1"),
        (b"DATA", "503 5.5.1"),
        (b"MAIL FROM:<a@b.c>\r\nDATA", "554 5.5.1"),
        (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA now", "501 5.5.4"),
    ],
)
def test_bad_parameters_and_sequence_errors_get_their_codes(
    session: SessionMaker, commands: bytes, expected: str
) -> None:
    s = session()
    s.send(b"EHLO c\r\n")
    s.replies()
    s.send(commands + b"\r\n")
    assert s.codes()[-1] == expected
    assert s.queue_files() == []


def test_mail_before_helo_is_a_bad_sequence(session: SessionMaker) -> None:
    s = session()
    s.send(b"MAIL FROM:<a@b.c>\r\n")
    assert s.replies() == ["503 5.5.1 Send HELO/EHLO first"]


def test_data_when_every_recipient_was_refused_is_554(session: SessionMaker) -> None:
    s = session()
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bad>\r\nRCPT TO:<>\r\nDATA\r\n")
    assert s.codes()[-4:] == ["250 2.1.0", "501 5.1.3", "501 5.1.3", "554 5.5.1"]


@pytest.mark.parametrize("reset", [b"RSET", b"EHLO again"])
def test_rset_and_ehlo_clear_the_transaction(session: SessionMaker, reset: bytes) -> None:
    s = session()
    s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    s.replies()
    s.send(reset + b"\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    codes = s.codes()
    assert codes[0].startswith("250")
    assert codes[-2:] == ["503 5.5.1", "503 5.5.1"]
    s.send(b"MAIL FROM:<a@b.c>\r\n")  # a new MAIL is not "nested"
    assert s.codes() == ["250 2.1.0"]


@pytest.mark.parametrize(
    "command, expected",
    [
        (b"NOOP", "250 2.0.0 OK"),
        (b"noop with an argument", "250 2.0.0 OK"),
        (b"RSET", "250 2.0.0 Reset OK"),
        (
            b"VRFY postmaster",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (b"HELP", "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"),
        (b"FROBNICATE", "500 5.5.2 Command unrecognized"),
        (b"", "500 5.5.2 Command unrecognized"),
        (b"AUTH PLAIN AGFiYwBkZWY=", "502 5.5.1 Command not implemented"),
        (b"STARTTLS", "502 5.5.1 Command not implemented"),
        (b"EXPN staff", "502 5.5.1 Command not implemented"),
        (b"BDAT 10 LAST", "502 5.5.1 Command not implemented"),
    ],
)
def test_simple_commands_get_their_replies(
    session: SessionMaker, command: bytes, expected: str
) -> None:
    s = session()
    s.send(command + b"\r\n")
    assert s.replies() == [expected]
    assert not s.closed


def test_http_request_is_answered_554_and_closed(session: SessionMaker) -> None:
    s = session()
    s.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert s.replies() == ["554 5.7.0 This is an SMTP server, not HTTP"]
    assert s.closed


# -- spool failures (pitfall 9, reliability case 16) -----------------------------------------------


def _fail_every_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_the_directory_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's fsync and the rename succeed; the fsync of queue/ afterwards fails."""
    real_fsync = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_the_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    def rename(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", rename)


def _fail_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes into the tmp file fail (ENOSPC at write time rather than at fsync)."""

    class FullDisk:
        def __init__(self, file: Any) -> None:
            self._file = file

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._file, name)

    real_open_writer = Spool.open_writer

    def open_writer(self: Spool, envelope: Any, smtp_acceptance: bool = False) -> MessageWriter:
        writer = real_open_writer(self, envelope, smtp_acceptance)
        writer._file = FullDisk(writer._file)  # type: ignore[assignment]
        return writer

    monkeypatch.setattr(Spool, "open_writer", open_writer)


@pytest.mark.parametrize(
    "break_spool",
    [_fail_every_fsync, _fail_the_directory_fsync, _fail_the_rename, _fail_every_write],
    ids=lambda f: f.__name__.strip("_"),
)
def test_spool_failure_at_the_dot_is_451_and_leaves_no_file(
    session: SessionMaker,
    monkeypatch: pytest.MonkeyPatch,
    break_spool: Callable[[pytest.MonkeyPatch], None],
) -> None:
    s = session()
    break_spool(monkeypatch)
    s.start_data()
    s.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert s.replies() == ["451 4.3.0 Local error: message not accepted, try again later"]
    monkeypatch.undo()
    assert s.queue_files() == [] and s.tmp_files() == []
    assert s.accepted == []
    assert _rejected(s, "spool_error") == 1
    s.send(b"NOOP\r\n")  # the session goes on; the client may retry
    assert s.codes() == ["250 2.0.0"]


def _open_writer_raises(s: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    def open_writer(self: Spool, envelope: Any, smtp_acceptance: bool = False) -> MessageWriter:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Spool, "open_writer", open_writer)


def test_tmp_directory_missing_answers_451_at_the_dot(session: SessionMaker) -> None:
    """A small message touches the disk only at commit: the failure is reported there."""
    s = session()
    s.start_data()
    s.spool.tmp.rmdir()
    s.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert s.replies() == ["451 4.3.0 Local error: message not accepted, try again later"]
    assert s.queue_files() == [] and s.accepted == []


def test_tmp_directory_missing_refuses_a_large_message_too(session: SessionMaker) -> None:
    """A large message spills to tmp/ as it arrives; a failure there is still a 451 at the dot."""
    s = session()
    s.start_data()
    s.spool.tmp.rmdir()
    s.send(b"Subject: x\r\n\r\n" + (b"y" * 998 + b"\r\n") * 600 + b".\r\n")
    assert s.replies() == ["451 4.3.0 Local error: message not accepted, try again later"]
    assert s.queue_files() == [] and s.accepted == []


def test_spool_that_cannot_open_a_file_answers_451_at_data(
    session: SessionMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = session()
    s.start_mail()
    _open_writer_raises(s, monkeypatch)
    s.send(b"DATA\r\nSubject: x\r\n")
    assert s.replies() == [
        "451 4.3.0 Local error: cannot write to the spool",
        "500 5.5.2 Command unrecognized",  # still in command mode: no body is being taken
    ]
    s.send(b"RCPT TO:<d@e.f>\r\n")  # the transaction was reset
    assert s.codes() == ["503 5.5.1"]
    assert s.queue_files() == []


# -- disconnects ---------------------------------------------------------------------------------


def test_disconnect_in_the_middle_of_a_small_message_leaves_nothing(session: SessionMaker) -> None:
    s = session()
    s.start_data()
    s.send(b"Subject: cut short\r\n\r\nhalf a mess")
    assert s.tmp_files() == []  # small messages stay in memory until the final dot
    s.disconnect()
    assert s.tmp_files() == [] and s.queue_files() == [] and s.accepted == []


def test_disconnect_in_the_middle_of_data_removes_the_tmp_file(session: SessionMaker) -> None:
    s = session()
    s.start_data()
    s.send(b"Subject: cut short\r\n\r\n" + (b"y" * 998 + b"\r\n") * 600 + b"half a mess")
    assert len(s.tmp_files()) == 1  # a large message spills to tmp/ as it arrives
    s.disconnect()
    assert s.tmp_files() == [] and s.queue_files() == []
    assert s.accepted == []
    assert s.factory.active == set()
    assert s.clock.getDelayedCalls() == []  # idle and session timers are gone too


# -- timeouts and the error budget (pitfall 12, reliability cases 13, 14) --------------------------


def test_idle_client_gets_421_and_is_closed(session: SessionMaker) -> None:
    s = session(smtp_config(idle_timeout=10))
    s.clock.advance(9.9)
    assert s.replies() == [] and not s.closed
    s.clock.advance(0.2)
    assert s.replies() == [f"421 4.4.2 {HOSTNAME} Idle timeout, closing connection"]
    assert s.closed


def test_each_command_restarts_the_idle_timer(session: SessionMaker) -> None:
    s = session(smtp_config(idle_timeout=10))
    s.clock.advance(9)
    s.send(b"NOOP\r\n")
    s.clock.advance(9)
    assert not s.closed
    s.clock.advance(1.1)
    assert s.codes()[-1] == "421 4.4.2"


def test_idle_timeout_applies_in_the_middle_of_data(session: SessionMaker) -> None:
    s = session(smtp_config(idle_timeout=10))
    s.start_data()
    s.send(b"partial line without its end")
    s.clock.advance(11)
    assert s.codes() == ["421 4.4.2"]
    assert s.closed
    assert s.tmp_files() == [] and s.queue_files() == []


def test_client_sending_noop_every_second_is_closed_at_the_session_deadline(
    session: SessionMaker,
) -> None:
    s = session(smtp_config(idle_timeout=10, session_timeout=30))
    for _ in range(29):
        s.clock.advance(1)
        s.send(b"NOOP\r\n")
    assert not s.closed
    assert s.codes() == ["250 2.0.0"] * 29
    s.clock.advance(1)
    assert s.replies() == [f"421 4.4.2 {HOSTNAME} Session too long, closing connection"]
    assert s.closed


def test_too_many_errors_end_the_session_with_421(session: SessionMaker) -> None:
    s = session(smtp_config(max_errors=3))
    s.send(b"BAD1\r\nBAD2\r\n")
    assert s.codes() == ["500 5.5.2", "500 5.5.2"]
    assert not s.closed
    s.send(b"BAD3\r\nNOOP\r\n")
    assert s.replies() == [
        "500 5.5.2 Command unrecognized",
        f"421 4.7.0 {HOSTNAME} Too many errors, closing connection",
    ]
    assert s.closed


def test_rejected_message_counts_toward_the_error_budget(session: SessionMaker) -> None:
    s = session(smtp_config(max_errors=2))
    s.send(b"BAD\r\n")
    s.start_data()
    s.send(b"bare\nLF\r\n.\r\n")
    assert s.codes() == ["550 5.5.2", "421 4.7.0"]
    assert s.closed


def test_closed_session_whose_client_never_reads_is_aborted_after_a_grace(
    session: SessionMaker,
) -> None:
    """loseConnection waits for our replies to drain; a client that never reads must not
    keep the connection and its slot forever."""
    s = session()
    s.send(b"QUIT\r\n")
    assert s.codes() == ["221 2.0.0"]
    assert not s.transport.disconnected  # still flushing, as far as the transport knows
    s.clock.advance(CLOSE_GRACE)
    assert s.transport.disconnected  # aborted


def test_commit_that_never_answers_after_the_deadline_ends_in_an_abort_without_reply(
    session: SessionMaker,
) -> None:
    runner = ManualRunner()
    s = session(smtp_config(session_timeout=30, idle_timeout=10), runner=runner)
    s.start_data()
    s.send(b"hello\r\n.\r\n")
    s.clock.advance(31)  # deadline passes while the fsync is pending: held
    assert s.replies() == [] and not s.transport.disconnected
    s.clock.advance(10)  # the fsync never returns
    assert s.replies() == []  # no 421 that a late 250 could contradict
    assert s.transport.disconnected


def test_greet_pause_holds_the_banner_and_refuses_talk_before_it(tmp_path: Path) -> None:
    s = open_session(tmp_path, config=smtp_config(greet_pause=2.0))
    assert s.replies() == []
    s.clock.advance(2.0)
    assert s.replies() == [f"220 {HOSTNAME} ESMTP mailrelay"]
    s.send(b"EHLO ok.example\r\n")
    assert s.replies()[-1].startswith("250 ")

    early = open_session(tmp_path / "early", config=smtp_config(greet_pause=2.0))
    early.send(b"EHLO early\r\nMAIL FROM:<a@b.c>\r\n")
    assert early.replies() == ["554 5.5.1 Protocol error: talk before the banner"]
    assert early.closed
    early.clock.advance(2.0)
    assert early.replies() == []  # no banner after the refusal


class _WriteCounter(SmallBufferTransport):
    def __init__(self) -> None:
        super().__init__(limit=1 << 30, peerAddress=LOCAL_V4)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def test_the_replies_to_one_read_of_pipelined_commands_leave_in_one_write(
    session: SessionMaker,
) -> None:
    """One write, not one per reply: with replies sent at once (netwrite), a second small send
    behind an unacknowledged one waited ~40 ms for the client's delayed ACK (review)."""
    transport = _WriteCounter()
    runner = ManualRunner()
    s = session(transport=transport, runner=runner)
    s.send(b"EHLO client.test\r\n")
    transport.writes.clear()
    s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<g@h.i>\r\nDATA\r\n")
    assert len(transport.writes) == 1
    assert transport.writes[0].count(b"\r\n") == 4
    # The commit's 250 is written when the fsync is done, whatever else is buffered: at once.
    transport.writes.clear()
    s.send(b"hello\r\n.\r\n")
    assert transport.writes == []
    runner.complete()
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"250 2.0.0 Ok")


def test_inbound_sessions_turn_nagle_off(tmp_path: Path) -> None:
    from twisted.internet.interfaces import ITCPTransport
    from zope.interface import implementer

    @implementer(ITCPTransport)
    class TCPish(StringTransport):
        nodelay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay = enabled

    factory = make_factory(tmp_path, smtp_config())
    proto = factory.buildProtocol(LOCAL_V4)
    assert isinstance(proto, RelayESMTP)
    transport = TCPish(peerAddress=LOCAL_V4)
    proto.makeConnection(transport)
    assert transport.nodelay
