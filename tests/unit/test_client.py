"""RelayClient over a StringTransport: one persistent ESMTP session, driven reply by reply."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.task import Clock

from mailrelay.outbound.client import QUIT_TIMEOUT, RelayClient
from mailrelay.outbound.payload import build_data_payload
from mailrelay.outbound.results import FailureClass, Kind, OutboundMessage, RecipientResult
from mailrelay.outbound.session import SessionError, failure_class_of_stage
from mailrelay.outbound.transaction import NO_8BITMIME
from tests.unit.fakes import (
    EHLO_PIPELINING,
    EHLO_PLAIN,
    TIMEOUTS,
    LogCapture,
    RecordingTransport,
    TCPLikeTLSTransport,
    TLSTransport,
    Upstream,
    failure_of,
    has_fired,
    message,
    provider_config,
    result_of,
)

A, B, C = "a@example.test", "b@example.test", "c@example.test"
PASSWORD = "s3cret-Pa55word"
TLS_CONTEXT = object()  # stands in for the IOpenSSLClientConnectionCreator


class Session:
    """A client, its clock and the upstream end of its connection."""

    def __init__(
        self,
        transport: RecordingTransport | None = None,
        password: str | None = None,
        tls_options: Any = None,
        **config: Any,
    ) -> None:
        self.clock = Clock()
        self.config = provider_config(**config)
        self.client = RelayClient(self.config, self.clock, tls_options, password)
        self.up = Upstream.connect(self.client, transport)

    def set_up(self, ehlo: bytes = EHLO_PIPELINING) -> None:
        """Greeting and EHLO; the session must be ready afterwards."""
        self.up.reply(b"220 upstream.test ESMTP\r\n")
        assert self.up.take() == b"EHLO relay.test\r\n"
        self.up.reply(ehlo)
        assert result_of(self.client.ready) is self.client
        assert self.client.is_ready
        self.up.take()

    def session_error(self) -> SessionError:
        """The SessionError that ``ready`` failed with (call once per test)."""
        exc = failure_of(self.client.ready).value
        assert isinstance(exc, SessionError), exc
        return exc


def ready_session(ehlo: bytes = EHLO_PIPELINING, **config: Any) -> Session:
    s = Session(**config)
    s.set_up(ehlo)
    return s


def by_recipient(results: list[RecipientResult]) -> dict[str, RecipientResult]:
    return {r.recipient: r for r in results}


# -- setup ------------------------------------------------------------------------------------


def test_greeting_gets_ehlo_with_the_configured_helo_name() -> None:
    s = Session(helo="relay.example.org")
    assert s.up.take() == b""  # nothing before the greeting
    s.up.reply(b"220 upstream.test ESMTP\r\n")
    assert s.up.take() == b"EHLO relay.example.org\r\n"
    assert not has_fired(s.client.ready)


def test_tcp_nodelay_is_requested_on_connect() -> None:
    """Nagle + delayed ACK cost ~45 ms per message (pitfall 17)."""
    s = Session()
    assert s.up.transport.no_delay is True


def test_ready_fires_after_ehlo_and_the_session_idles() -> None:
    s = ready_session()
    assert s.up.take() == b""  # no MAIL, no QUIT: waits for the pool
    assert s.client.messages_sent == 0


@pytest.mark.parametrize(
    "greeting",
    [
        b"421 4.3.2 busy, try later\r\n",
        b"554 5.7.1 go away\r\n",
        b"450 not now\r\n",
    ],
)
def test_refusing_greeting_fails_setup_at_greeting(greeting: bytes) -> None:
    s = Session()
    s.up.reply(greeting)
    exc = s.session_error()
    assert exc.stage == "greeting"
    assert greeting[:3].decode() in exc.detail
    assert s.up.aborted
    assert b"EHLO" not in s.up.take()


def test_ehlo_rejected_fails_setup_without_helo_fallback() -> None:
    s = Session()
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(b"502 5.5.1 no EHLO here\r\n")
    assert s.session_error().stage == "greeting"
    assert b"HELO" not in s.up.take()


def test_connection_lost_during_setup_fails_ready_at_connect() -> None:
    s = Session()
    s.up.reply(b"220 hi\r\n")
    s.up.lose(error.ConnectionLost())
    exc = s.session_error()
    assert exc.stage == "connect"


# -- timeouts ---------------------------------------------------------------------------------


def test_greeting_timeout() -> None:
    s = Session()
    s.clock.advance(TIMEOUTS["greeting_timeout"] - 0.1)
    assert not has_fired(s.client.ready)
    s.clock.advance(0.2)
    assert s.session_error().stage == "timeout"
    assert s.up.aborted


def test_command_timeout_during_ehlo() -> None:
    """After the greeting the command timeout applies, not the (shorter) greeting one."""
    s = Session()
    s.clock.advance(TIMEOUTS["greeting_timeout"] - 1)
    s.up.reply(b"220 hi\r\n")
    s.clock.advance(TIMEOUTS["command_timeout"] - 0.1)
    assert not has_fired(s.client.ready)
    s.clock.advance(0.2)
    assert s.session_error().stage == "timeout"
    assert s.up.aborted


def test_no_timer_left_after_a_failed_setup() -> None:
    s = Session()
    s.up.reply(b"421 bye\r\n")
    failure_of(s.client.ready)
    assert s.clock.getDelayedCalls() == []


def test_idle_timeout_when_ready_sends_quit() -> None:
    s = ready_session()
    s.clock.advance(TIMEOUTS["idle_timeout"] - 0.1)
    assert s.up.take() == b""
    s.clock.advance(0.2)
    assert s.up.take() == b"QUIT\r\n"
    assert not s.client.is_ready
    s.up.reply(b"221 bye\r\n")
    assert s.up.closing


def test_quit_without_an_answer_is_aborted_after_the_quit_timeout() -> None:
    """QUIT_TIMEOUT, not the command timeout: a leaving connection holds a pool slot."""
    s = ready_session(command_timeout=300.0)
    s.client.quit()
    assert s.up.take() == b"QUIT\r\n"
    s.clock.advance(QUIT_TIMEOUT - 0.1)
    assert not s.up.aborted
    s.clock.advance(0.2)
    assert s.up.aborted


def test_the_quit_timeout_is_never_longer_than_the_command_timeout() -> None:
    s = ready_session(command_timeout=4.0)
    s.client.quit()
    s.clock.advance(4.1)
    assert s.up.aborted


def test_command_timeout_during_a_transaction_is_temporary_and_certain() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.clock.advance(TIMEOUTS["command_timeout"] - 0.1)
    assert not has_fired(d)
    s.clock.advance(0.2)
    [r] = result_of(d)
    assert r.kind is Kind.TEMPORARY
    assert r.uncertain is False
    assert "timeout" in r.reply
    assert s.up.aborted


def test_data_timeout_governs_the_wait_for_354() -> None:
    """After the last RCPT reply, the wait for DATA's 354 uses data_timeout, not command_timeout."""
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(b"250 ok\r\n250 ok\r\n")
    s.clock.advance(TIMEOUTS["command_timeout"] + 1)
    assert not has_fired(d)
    s.clock.advance(TIMEOUTS["data_timeout"] - TIMEOUTS["command_timeout"])
    [r] = result_of(d)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, False)


def test_final_timeout_after_the_payload_is_temporary_and_uncertain() -> None:
    """No reply to the final dot: the upstream may have the message (a possible duplicate)."""
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    # Transfer and final reply share one deadline: data_timeout + final_timeout.
    deadline = TIMEOUTS["data_timeout"] + TIMEOUTS["final_timeout"]
    s.clock.advance(deadline - 1)
    assert not has_fired(d)
    s.clock.advance(1)
    [r] = result_of(d)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, True)
    assert s.up.aborted


# -- transactions with PIPELINING -------------------------------------------------------------


def test_pipelined_mail_rcpts_data_go_in_one_write_then_the_payload_in_one_write() -> None:
    s = ready_session()
    msg = message(A, B, body=b".dot first\r\nline\r\n")
    d = s.client.send(msg)
    size = len(msg.body)
    assert s.up.transport.writes == [
        b"MAIL FROM:<sender@example.test> SIZE=%d\r\n" % size
        + b"RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    ]
    s.up.take()
    s.up.reply(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n")
    assert s.up.take() == b""  # nothing before the 354
    s.up.reply(b"354 go ahead\r\n")
    assert s.up.transport.writes == [build_data_payload(msg.body)]
    assert s.up.take() == b"..dot first\r\nline\r\n.\r\n"
    assert not has_fired(d)
    s.up.reply(b"250 2.0.0 Ok: queued as 4AB12\r\n")
    results = result_of(d)
    assert [r.recipient for r in results] == [A, B]
    assert all(r.kind is Kind.DELIVERED for r in results)
    assert all(r.reply == "250 2.0.0 Ok: queued as 4AB12" for r in results)
    assert all(not r.uncertain for r in results)
    # Still connected, ready for the next message without RSET or QUIT.
    assert s.up.take() == b""
    assert s.client.is_ready
    assert s.client.messages_sent == 1


def test_8bit_body_is_announced_when_the_server_offers_8bitmime() -> None:
    s = ready_session()
    msg = OutboundMessage("Q", "s@example.test", (A,), b"caf\xc3\xa9\r\n", body_8bit=True)
    s.client.send(msg)
    assert s.up.take().startswith(b"MAIL FROM:<s@example.test> SIZE=7 BODY=8BITMIME\r\n")


@pytest.mark.parametrize("ehlo", [EHLO_PLAIN.replace(b"8BITMIME", b"SIZE 1000"), b"250 up\r\n"])
def test_8bit_body_is_not_sent_to_a_server_without_8bitmime(ehlo: bytes) -> None:
    """RFC 6152: temporary for every recipient, so the router tries the next provider."""
    s = ready_session(ehlo)
    on_ready: list[RelayClient] = []
    s.client.on_ready = on_ready.append
    msg = OutboundMessage("Q", "s@example.test", (A, B), b"caf\xc3\xa9\r\n", body_8bit=True)
    results = result_of(s.client.send(msg))
    assert [(r.recipient, r.kind, r.reply) for r in results] == [
        (A, Kind.TEMPORARY, NO_8BITMIME),
        (B, Kind.TEMPORARY, NO_8BITMIME),
    ]
    assert not any(r.uncertain for r in results)
    assert s.up.take() == b""  # no MAIL at all
    # Still ready for the next (7-bit) message, without having reported itself ready again.
    assert s.client.is_ready
    assert on_ready == []
    assert s.client.messages_sent == 0
    d = s.client.send(message(A))
    assert s.up.take().startswith(b"MAIL FROM:<sender@example.test>")
    assert not has_fired(d)


@pytest.mark.parametrize(
    "data_reply",
    [b"250 2.0.0 Ok: queued as X", b"221 2.0.0 bye", b"235 ok", b"334 VXNlcm5hbWU6", b"600 odd"],
)
@pytest.mark.parametrize("ehlo", [EHLO_PIPELINING, EHLO_PLAIN], ids=["pipelined", "one-by-one"])
def test_a_reply_to_data_other_than_354_4xx_5xx_is_a_protocol_error(
    data_reply: bytes, ehlo: bytes
) -> None:
    """Replies shifted by one: a 250 to DATA must not count as delivered, no body was sent."""
    s = ready_session(ehlo)
    d = s.client.send(message(A, B))
    s.up.take()
    for reply in (b"250 ok", b"250 ok", b"550 5.1.1 no B", data_reply):
        s.up.reply(reply + b"\r\n")
    results = by_recipient(result_of(d))
    assert (results[A].kind, results[A].uncertain) == (Kind.TEMPORARY, False)
    assert "DATA" in results[A].reply
    assert data_reply.decode() in results[A].reply
    assert (results[B].kind, results[B].reply) == (Kind.PERMANENT, "550 5.1.1 no B")
    assert b"Subject" not in s.up.take()  # never the body, nor an RSET on a confused session
    assert s.up.aborted
    assert not s.client.is_ready


@pytest.mark.parametrize(
    ("data_reply", "kind"),
    [(b"451 4.3.0 try later", Kind.TEMPORARY), (b"554 5.7.1 not from you", Kind.PERMANENT)],
)
def test_data_refused_gives_the_accepted_recipients_its_reply_and_resets(
    data_reply: bytes, kind: Kind
) -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.take()
    s.up.reply(b"250 ok\r\n250 ok\r\n" + data_reply + b"\r\n")
    [r] = result_of(d)
    assert (r.kind, r.reply, r.uncertain) == (kind, data_reply.decode(), False)
    assert s.up.take() == b"RSET\r\n"
    assert not s.up.aborted


@pytest.mark.parametrize(
    ("rcpt_reply", "kind"),
    [
        (b"550 5.1.1 <b@example.test>: no such user", Kind.PERMANENT),
        (b"451 4.7.1 greylisted, try again", Kind.TEMPORARY),
        (b"452 4.5.3 too many recipients", Kind.TEMPORARY),
    ],
)
def test_one_rcpt_refused_others_delivered(rcpt_reply: bytes, kind: Kind) -> None:
    s = ready_session()
    d = s.client.send(message(A, B, C))
    s.up.take()
    s.up.reply(b"250 ok\r\n250 ok\r\n" + rcpt_reply + b"\r\n250 ok\r\n354 go\r\n")
    assert s.up.take().endswith(b"\r\n.\r\n")
    s.up.reply(b"250 2.0.0 Ok: queued as XYZ\r\n")
    results = by_recipient(result_of(d))
    assert results[B].kind is kind
    assert results[B].reply == rcpt_reply.decode()
    for r in (A, C):
        assert results[r].kind is Kind.DELIVERED
        assert results[r].reply == "250 2.0.0 Ok: queued as XYZ"


def test_final_5xx_fails_the_accepted_recipients_permanently_and_resets() -> None:
    s = ready_session()
    d = s.client.send(message(A, B))
    s.up.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 nope\r\n354 go\r\n")
    s.up.take()
    s.up.reply(b"554 5.6.0 content rejected\r\n")
    results = by_recipient(result_of(d))
    assert results[A] == RecipientResult(
        A, Kind.PERMANENT, "554 5.6.0 content rejected", failure=FailureClass.DATA, code=554
    )
    assert results[B] == RecipientResult(
        B, Kind.PERMANENT, "550 5.1.1 nope", failure=FailureClass.RCPT, code=550
    )
    assert s.up.take() == b"RSET\r\n"
    assert not s.client.is_ready
    s.up.reply(b"250 ok\r\n")
    assert s.client.is_ready


def test_final_4xx_is_temporary_for_the_accepted_recipients() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    s.up.reply(b"451 4.3.0 local error\r\n")
    [r] = result_of(d)
    assert (r.kind, r.reply, r.uncertain) == (Kind.TEMPORARY, "451 4.3.0 local error", False)


def test_mail_451_makes_every_recipient_temporary_and_rsets_before_reuse() -> None:
    s = ready_session()
    on_ready: list[RelayClient] = []
    s.client.on_ready = on_ready.append
    d = s.client.send(message(A, B))
    s.up.take()
    s.up.reply(b"451 4.3.0 sender check failed\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert not has_fired(d)
    s.up.reply(b"554 5.5.1 no valid recipients\r\n")
    results = result_of(d)
    assert [r.kind for r in results] == [Kind.TEMPORARY, Kind.TEMPORARY]
    assert all(r.reply == "451 4.3.0 sender check failed" for r in results)
    assert s.up.take() == b"RSET\r\n"
    assert not s.client.is_ready and on_ready == []
    s.up.reply(b"250 2.0.0 reset\r\n")
    assert s.client.is_ready
    assert on_ready == [s.client]


def test_rset_refused_makes_the_client_quit() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.take()
    s.up.reply(b"550 5.7.1 sender refused\r\n503 no\r\n503 no\r\n")
    result_of(d)
    assert s.up.take() == b"RSET\r\n"
    s.up.reply(b"421 4.3.0 closing\r\n")
    assert s.up.take() == b"QUIT\r\n"
    assert not s.client.is_ready


def test_pipelined_all_rcpts_refused_and_server_opens_data_gets_an_empty_message() -> None:
    """RFC 2920: a server may answer 354 although no RCPT was accepted; never send the body."""
    s = ready_session()
    d = s.client.send(message(A, body=b"secret body\r\n"))
    s.up.take()
    s.up.reply(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert s.up.take() == b".\r\n"
    s.up.reply(b"554 no valid recipients\r\n")
    [r] = result_of(d)
    assert (r.kind, r.reply) == (Kind.PERMANENT, "550 5.1.1 no")
    assert s.up.take() == b"RSET\r\n"


def test_connection_lost_after_the_payload_is_uncertain() -> None:
    s = ready_session()
    d = s.client.send(message(A, B))
    s.up.reply(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n")
    s.up.lose(error.ConnectionLost())
    results = by_recipient(result_of(d))
    assert (results[A].kind, results[A].uncertain) == (Kind.TEMPORARY, True)
    # B was refused before DATA: its answer stands and it is not "maybe delivered".
    assert (results[B].kind, results[B].uncertain) == (Kind.PERMANENT, False)


@pytest.mark.parametrize(
    "replies_before_loss",
    [b"", b"250 ok\r\n", b"250 ok\r\n250 ok\r\n"],
    ids=["before-mail-reply", "after-mail", "after-rcpt"],
)
def test_connection_lost_before_data_is_temporary_and_certain(replies_before_loss: bytes) -> None:
    s = ready_session()
    closed: list[RelayClient] = []
    s.client.on_closed = closed.append
    d = s.client.send(message(A))
    s.up.reply(replies_before_loss)
    s.up.lose(error.ConnectionLost())
    [r] = result_of(d)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, False)
    assert "connection lost" in r.reply
    assert closed == [s.client]
    assert not s.client.is_ready


@pytest.mark.parametrize("how", ["ehlo", "auth", "transaction", "rset"])
def test_a_positive_reply_while_idle_is_ignored(how: str) -> None:
    """Nothing is pending while ready: an unsolicited reply must not re-run the last step
    (EHLO parsing, AUTH, RSET) and report the client ready a second time (the pool would
    hold it twice as idle)."""
    if how == "auth":
        s = _auth_session()
        s.up.reply(EHLO_AUTH)
        s.up.take()
        s.up.reply(b"235 2.7.0 ok\r\n")
        result_of(s.client.ready)
    else:
        s = ready_session()
    if how in ("transaction", "rset"):
        d = s.client.send(message(A))
        if how == "transaction":
            s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        else:
            s.up.reply(b"451 4.3.0 later\r\n503 no\r\n503 no\r\n")
            s.up.reply(b"250 2.0.0 reset\r\n")
        result_of(d)
    assert s.client.is_ready
    s.up.take()
    on_ready: list[RelayClient] = []
    leaving: list[RelayClient] = []
    s.client.on_ready = on_ready.append
    s.client.on_leaving = leaving.append
    s.up.reply(b"250 unsolicited\r\n250-upstream.test\r\n250 AUTH PLAIN\r\n")
    assert s.up.take() == b""  # no AUTH again, no QUIT
    assert s.client.is_ready
    assert on_ready == [] and leaving == []
    # The session's extensions are those of the real EHLO: still pipelined.
    s.client.send(message(A, B))
    assert len(s.up.transport.writes) == 1


@pytest.mark.parametrize("reply", [b"421 4.4.2 idle too long, closing", b"554 5.3.2 going away"])
def test_an_error_reply_while_idle_means_the_server_is_leaving(reply: bytes) -> None:
    s = ready_session()
    leaving: list[RelayClient] = []
    s.client.on_leaving = leaving.append
    s.up.reply(reply + b"\r\n")
    assert s.up.take() == b"QUIT\r\n"
    assert not s.client.is_ready
    assert leaving == [s.client]
    s.up.reply(b"221 bye\r\n")
    assert s.up.closing


def test_idle_timeout_tells_the_pool_the_client_is_leaving() -> None:
    s = ready_session()
    leaving: list[RelayClient] = []
    s.client.on_leaving = leaving.append
    s.clock.advance(TIMEOUTS["idle_timeout"] + 0.1)
    assert s.up.take() == b"QUIT\r\n"
    assert leaving == [s.client]


# -- transactions without PIPELINING ----------------------------------------------------------


def test_without_pipelining_commands_go_one_at_a_time() -> None:
    s = ready_session(EHLO_PLAIN)
    d = s.client.send(message(A, B))
    assert s.up.take() == b"MAIL FROM:<sender@example.test>\r\n"
    s.up.reply(b"250 ok\r\n")
    assert s.up.take() == b"RCPT TO:<a@example.test>\r\n"
    s.up.reply(b"250 ok\r\n")
    assert s.up.take() == b"RCPT TO:<b@example.test>\r\n"
    s.up.reply(b"250 ok\r\n")
    assert s.up.take() == b"DATA\r\n"
    s.up.reply(b"354 go\r\n")
    assert s.up.transport.writes == [b"Subject: hi\r\n\r\nhello\r\n.\r\n"]
    s.up.take()
    s.up.reply(b"250 queued\r\n")
    assert [r.kind for r in result_of(d)] == [Kind.DELIVERED, Kind.DELIVERED]


def test_without_pipelining_all_rcpts_rejected_sends_no_data() -> None:
    s = ready_session(EHLO_PLAIN)
    d = s.client.send(message(A, B))
    s.up.reply(b"250 ok\r\n")
    s.up.reply(b"550 5.1.1 no A\r\n")
    s.up.reply(b"450 4.2.1 B mailbox busy\r\n")
    assert b"DATA" not in s.up.take().replace(b"RSET\r\n", b"")
    results = by_recipient(result_of(d))
    assert (results[A].kind, results[A].reply) == (Kind.PERMANENT, "550 5.1.1 no A")
    assert (results[B].kind, results[B].reply) == (Kind.TEMPORARY, "450 4.2.1 B mailbox busy")


def test_without_pipelining_mail_refused_sends_no_rcpt() -> None:
    s = ready_session(EHLO_PLAIN)
    d = s.client.send(message(A, B))
    s.up.take()
    s.up.reply(b"451 4.3.0 try later\r\n")
    assert s.up.take() == b"RSET\r\n"
    results = result_of(d)
    assert [(r.kind, r.reply) for r in results] == [(Kind.TEMPORARY, "451 4.3.0 try later")] * 2


# -- AUTH -------------------------------------------------------------------------------------

EHLO_AUTH = b"250-upstream.test\r\n250-PIPELINING\r\n250 AUTH LOGIN PLAIN\r\n"


def _auth_session() -> Session:
    s = Session(username="user@example.test", password=PASSWORD, host="127.0.0.1")
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    return s


def test_auth_plain_is_sent_once_with_the_credentials_and_then_ready() -> None:
    s = _auth_session()
    s.up.reply(EHLO_AUTH)
    token = base64.b64encode(b"\0user@example.test\0" + PASSWORD.encode())
    assert s.up.take() == b"AUTH PLAIN " + token + b"\r\n"
    assert not has_fired(s.client.ready)
    s.up.reply(b"235 2.7.0 ok\r\n")
    assert result_of(s.client.ready) is s.client


def test_auth_rejected_fails_setup_once_and_never_leaks_the_password() -> None:
    """535: one AUTH line only (pitfall 24); the secret in no error or log (pitfall 23)."""
    token = base64.b64encode(b"\0user@example.test\0" + PASSWORD.encode()).decode()
    with LogCapture() as logs:
        s = _auth_session()
        s.up.reply(EHLO_AUTH)
        s.up.reply(b"535 5.7.8 authentication failed\r\n")
        exc = s.session_error()
    written = s.up.take()
    assert written.count(b"AUTH") == 1
    assert exc.stage == "auth"
    assert s.up.aborted
    for text in [str(exc), repr(exc), exc.detail, *logs.texts()]:
        assert PASSWORD not in text
        assert token not in text


def test_auth_without_a_configured_mechanism_fails_setup_without_sending_credentials() -> None:
    s = _auth_session()
    s.up.reply(b"250-upstream.test\r\n250 AUTH XOAUTH2 GSSAPI\r\n")
    assert s.session_error().stage == "auth"
    assert b"AUTH" not in s.up.take()


def test_auth_required_but_not_offered_fails_setup() -> None:
    s = _auth_session()
    s.up.reply(EHLO_PLAIN)
    assert s.session_error().stage == "auth"
    assert s.up.take() == b""


def test_auth_is_refused_in_clear_text_to_a_remote_host() -> None:
    """Config forbids it; the client refuses as well (pitfall 22)."""
    s = Session(username="user", password=PASSWORD, host="192.0.2.1")
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_AUTH)
    assert s.session_error().stage == "auth"
    assert s.up.take() == b""


# -- STARTTLS ---------------------------------------------------------------------------------

EHLO_STARTTLS = b"250-upstream.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


def _starttls_session(
    transport: RecordingTransport | None = None, password: str | None = None, **config: Any
) -> Session:
    s = Session(
        transport=transport or TLSTransport(),
        password=password,
        tls="starttls",
        tls_options=TLS_CONTEXT,
        **config,
    )
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_STARTTLS)
    assert s.up.take() == b"STARTTLS\r\n"
    return s


def test_starttls_then_ehlo_again_then_ready() -> None:
    s = _starttls_session()
    s.up.reply(b"220 2.0.0 ready for TLS\r\n")
    assert s.up.transport.tls_started_with == [TLS_CONTEXT]
    assert s.up.take() == b"EHLO relay.test\r\n"
    s.up.reply(b"250-upstream.test\r\n250 PIPELINING\r\n")
    assert result_of(s.client.ready) is s.client


def test_starttls_then_auth_over_tls_to_a_remote_host() -> None:
    s = _starttls_session(username="user", host="192.0.2.1", password=PASSWORD)
    s.up.reply(b"220 ready\r\n")
    s.up.take()
    s.up.reply(EHLO_AUTH)
    assert s.up.take().startswith(b"AUTH PLAIN ")


@pytest.mark.parametrize(
    "injected",
    [b"250 injected\r\n", b"MAIL FROM:<x>\r\n", b"220 again\r\n", b"partial line"],
)
def test_bytes_after_starttls_ready_abort_the_session(injected: bytes) -> None:
    """Bytes sent in clear after '220 ready' must not be read as TLS data (pitfall 26)."""
    s = _starttls_session()
    s.up.reply(b"220 2.0.0 ready for TLS\r\n" + injected)
    assert s.session_error().stage == "tls"
    assert s.up.aborted
    assert s.up.transport.tls_started_with == []
    assert s.up.take() == b""


@pytest.mark.parametrize(
    "injected",
    [
        b"220 again\r\n",
        b"220 again\r\n250 AUTH PLAIN\r\n",
        b"220 again\r\n250 ok\r\n235 ok\r\n",
    ],
)
def test_injected_lines_are_not_acted_on_over_a_tcp_transport(injected: bytes) -> None:
    """A TCP transport keeps ``disconnecting`` False on abort, so LineReceiver goes on
    parsing the chunk: the client must ignore every line after it failed the session
    (no TLS on a dead connection, no EHLO, never the credentials)."""
    s = _starttls_session(
        TCPLikeTLSTransport(), username="user", host="192.0.2.1", password=PASSWORD
    )
    s.up.reply(b"220 2.0.0 ready for TLS\r\n" + injected)
    assert s.session_error().stage == "tls"
    assert s.up.aborted
    assert s.up.transport.tls_started_with == []
    assert s.up.take() == b""


def test_starttls_not_offered_fails_at_tls_and_never_continues_in_clear() -> None:
    s = Session(transport=TLSTransport(), tls="starttls", tls_options=TLS_CONTEXT)
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_PIPELINING)
    assert s.session_error().stage == "tls"
    assert s.up.take() == b""
    assert s.up.aborted


def test_starttls_refused_fails_at_tls() -> None:
    s = _starttls_session()
    s.up.reply(b"454 4.7.0 TLS not available\r\n")
    assert s.session_error().stage == "tls"
    assert s.up.transport.tls_started_with == []
    assert s.up.take() == b""


def test_starttls_that_cannot_start_fails_at_tls_without_another_ehlo() -> None:
    """A transport without startTLS: the stock client logs it and sends EHLO anyway."""
    s = _starttls_session(RecordingTransport())
    s.up.reply(b"220 ready\r\n")
    assert s.session_error().stage == "tls"
    assert s.up.aborted
    assert s.up.take() == b""


def test_auth_is_not_attempted_without_a_password() -> None:
    """An empty password would only count toward the provider's lockout."""
    s = Session(username="user", password=None, host="127.0.0.1")
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_AUTH)
    exc = s.session_error()
    assert exc.stage == "auth"
    assert s.up.take() == b""
    assert s.up.aborted


# -- implicit TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", [RecordingTransport, TLSTransport])
def test_implicit_tls_is_secure_from_the_start_auth_to_a_remote_host(
    transport: type[RecordingTransport],
) -> None:
    """The endpoint's TLS wrapper is no ISSLTransport; the session is TLS all the same, so
    AUTH goes to a non-loopback host, and STARTTLS (offered or not) is never sent."""
    s = Session(
        transport=transport(),
        password=PASSWORD,
        tls_options=TLS_CONTEXT,
        tls="implicit",
        host="smtp.example.com",
        username="user",
    )
    s.up.reply(b"220 smtp.example.com ESMTP\r\n")
    assert s.up.take() == b"EHLO relay.test\r\n"
    s.up.reply(b"250-smtp.example.com\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n")
    token = base64.b64encode(b"\0user\0" + PASSWORD.encode())
    assert s.up.take() == b"AUTH PLAIN " + token + b"\r\n"
    s.up.reply(b"235 2.7.0 ok\r\n")
    assert result_of(s.client.ready) is s.client
    assert getattr(s.up.transport, "tls_started_with", []) == []


def test_implicit_tls_without_auth_never_sends_starttls() -> None:
    s = Session(
        transport=TLSTransport(), tls_options=TLS_CONTEXT, tls="implicit", host="smtp.example.com"
    )
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_STARTTLS)
    assert result_of(s.client.ready) is s.client
    assert s.up.take() == b""
    assert s.up.transport.tls_started_with == []


def test_implicit_tls_connection_lost_during_setup_is_a_connect_failure() -> None:
    """Only a handshake error (SSL.Error) says "tls"; a plain loss after it is "connect"."""
    s = Session(tls_options=TLS_CONTEXT, tls="implicit", host="smtp.example.com")
    s.up.reply(b"220 hi\r\n")
    s.up.lose(error.ConnectionLost())
    assert s.session_error().stage == "connect"


def test_implicit_tls_handshake_failure_is_a_tls_failure() -> None:
    from OpenSSL import SSL

    s = Session(tls_options=TLS_CONTEXT, tls="implicit", host="smtp.example.com")
    s.up.lose(SSL.Error([("SSL routines", "", "certificate verify failed")]))
    assert s.session_error().stage == "tls"


# -- failure classes and codes ------------------------------------------------------------------


def classes(
    results: list[RecipientResult],
) -> dict[str, tuple[Kind, FailureClass | None, int | None]]:
    return {r.recipient: (r.kind, r.failure, r.code) for r in results}


@pytest.mark.parametrize(
    ("stage", "failure"),
    [
        ("connect", FailureClass.CONNECT),
        ("greeting", FailureClass.GREETING),
        ("tls", FailureClass.TLS),
        ("auth", FailureClass.AUTH),
        ("timeout", FailureClass.TIMEOUT),
        ("protocol", FailureClass.PROTOCOL),
        ("shutdown", FailureClass.UNAVAILABLE),
        ("lost", FailureClass.LOST),
    ],
)
def test_failure_class_of_stage(stage: str, failure: FailureClass) -> None:
    assert failure_class_of_stage(stage) is failure


def test_an_unknown_stage_is_still_a_session_class() -> None:
    assert failure_class_of_stage("something new").is_session


def test_delivered_results_carry_the_code_and_no_failure() -> None:
    s = ready_session()
    d = s.client.send(message(A, B))
    s.up.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 no B\r\n354 go\r\n250 2.0.0 queued\r\n")
    assert classes(result_of(d)) == {
        A: (Kind.DELIVERED, None, 250),
        B: (Kind.PERMANENT, FailureClass.RCPT, 550),
    }


@pytest.mark.parametrize("ehlo", [EHLO_PIPELINING, EHLO_PLAIN], ids=["pipelined", "one-by-one"])
def test_a_refused_mail_is_class_mail_for_every_recipient(ehlo: bytes) -> None:
    s = ready_session(ehlo)
    d = s.client.send(message(A, B))
    s.up.reply(b"550 5.7.1 sender refused\r\n")
    if ehlo == EHLO_PIPELINING:
        s.up.reply(b"503 no\r\n503 no\r\n554 no valid recipients\r\n")
    assert classes(result_of(d)) == {
        A: (Kind.PERMANENT, FailureClass.MAIL, 550),
        B: (Kind.PERMANENT, FailureClass.MAIL, 550),
    }


@pytest.mark.parametrize(
    ("replies", "code"),
    [
        (b"250 ok\r\n250 ok\r\n451 4.3.0 no DATA now\r\n", 451),  # the reply to DATA
        (b"250 ok\r\n250 ok\r\n354 go\r\n554 5.6.0 content rejected\r\n", 554),  # final dot
        (b"250 ok\r\n250 ok\r\n354 go\r\n452 4.3.1 out of space\r\n", 452),
    ],
    ids=["data", "final-5xx", "final-4xx"],
)
def test_replies_to_data_and_the_final_dot_are_class_data(replies: bytes, code: int) -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(replies)
    [r] = result_of(d)
    assert (r.failure, r.code, r.uncertain) == (FailureClass.DATA, code, False)


@pytest.mark.parametrize(
    ("replies", "uncertain"),
    [(b"", False), (b"250 ok\r\n250 ok\r\n", False), (b"250 ok\r\n250 ok\r\n354 go\r\n", True)],
    ids=["before-mail-reply", "before-354", "after-final-dot"],
)
def test_a_connection_lost_mid_transaction_is_class_lost(replies: bytes, uncertain: bool) -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(replies)
    s.up.lose(error.ConnectionLost())
    [r] = result_of(d)
    assert (r.kind, r.failure, r.code, r.uncertain) == (
        Kind.TEMPORARY,
        FailureClass.LOST,
        None,
        uncertain,
    )


@pytest.mark.parametrize(
    ("replies", "wait", "uncertain"),
    [
        (b"", TIMEOUTS["command_timeout"], False),
        (b"250 ok\r\n250 ok\r\n550 no B\r\n", TIMEOUTS["data_timeout"], False),
        (
            b"250 ok\r\n250 ok\r\n550 no B\r\n354 go\r\n",
            TIMEOUTS["data_timeout"] + TIMEOUTS["final_timeout"],
            True,
        ),
    ],
    ids=["command", "data", "final"],
)
def test_stage_timeouts_are_class_timeout(replies: bytes, wait: float, uncertain: bool) -> None:
    s = ready_session()
    d = s.client.send(message(A, B))
    s.up.reply(replies)
    s.clock.advance(wait + 0.1)
    results = by_recipient(result_of(d))
    assert (results[A].failure, results[A].code, results[A].uncertain) == (
        FailureClass.TIMEOUT,
        None,
        uncertain,
    )
    # An answer that came before the timeout stands.
    expected_b = (FailureClass.RCPT, 550) if replies else (FailureClass.TIMEOUT, None)
    assert (results[B].failure, results[B].code) == expected_b


@pytest.mark.parametrize(
    "bad_reply", [b"250 2.0.0 shifted by one\r\n", b"garbage\r\n"], ids=["data-250", "no-code"]
)
def test_protocol_errors_mid_transaction_are_class_protocol(bad_reply: bytes) -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(b"250 ok\r\n250 ok\r\n" + bad_reply)
    [r] = result_of(d)
    assert (r.kind, r.failure, r.code, r.uncertain) == (
        Kind.TEMPORARY,
        FailureClass.PROTOCOL,
        None,
        False,
    )
    assert s.up.aborted


def test_an_aborted_transaction_is_class_unavailable() -> None:
    """Our own shutdown: the provider is not to blame."""
    s = ready_session()
    d = s.client.send(message(A))
    s.client.abort("relay shutting down")
    [r] = result_of(d)
    assert (r.kind, r.failure) == (Kind.TEMPORARY, FailureClass.UNAVAILABLE)


def test_the_8bitmime_refusal_is_a_session_class_that_moves_on() -> None:
    s = ready_session(b"250 up\r\n")
    msg = OutboundMessage("Q", "s@example.test", (A,), b"caf\xc3\xa9\r\n", body_8bit=True)
    [r] = result_of(s.client.send(msg))
    assert (r.kind, r.failure, r.code) == (Kind.TEMPORARY, FailureClass.UNAVAILABLE, None)
    assert r.failure.is_session and not r.failure.counts_against_provider


# -- 421 in the middle of a transaction --------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        (
            b"421 4.3.2 shutting down\r\n",
            {A: FailureClass.MAIL, B: FailureClass.MAIL},
        ),
        (
            b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n",
            {A: FailureClass.RCPT, B: FailureClass.RCPT},
        ),
        (
            b"250 ok\r\n550 5.1.1 no A\r\n250 ok\r\n421 4.3.2 shutting down\r\n",
            {A: FailureClass.RCPT, B: FailureClass.DATA},
        ),
        (
            b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n421 4.3.2 shutting down\r\n",
            {A: FailureClass.DATA, B: FailureClass.DATA},
        ),
    ],
    ids=["mail", "rcpt", "data", "final-dot"],
)
def test_421_mid_transaction_is_that_stages_class_and_ends_the_session(
    replies: bytes, expected: dict[str, FailureClass]
) -> None:
    """A transaction class with code 421 (the router treats it as a 4xx of that stage); the
    server is closing, so QUIT instead of RSET, and the client never becomes ready again."""
    s = ready_session()
    on_ready: list[RelayClient] = []
    closed: list[RelayClient] = []
    s.client.on_ready = on_ready.append
    s.client.on_closed = closed.append
    d = s.client.send(message(A, B))
    s.up.take()
    s.up.reply(replies)
    results = result_of(d)
    assert {r.recipient: r.failure for r in results} == expected
    four21 = [r for r in results if r.code == 421]
    assert four21 and all(
        (r.kind, r.reply, r.uncertain) == (Kind.TEMPORARY, "421 4.3.2 shutting down", False)
        for r in four21
    )
    written = s.up.take()
    assert written.endswith(b"QUIT\r\n") and b"RSET" not in written
    assert not s.client.is_ready and not s.client.may_serve
    # Whatever else the closing server still sends, the client stays out of use.
    s.up.reply(b"503 5.5.1 bad sequence\r\n")
    assert s.up.closing
    s.up.lose()
    assert on_ready == [] and closed == [s.client]
    assert s.client.messages_sent == 1


def test_421_to_mail_without_pipelining_sends_no_rcpt() -> None:
    s = ready_session(EHLO_PLAIN)
    d = s.client.send(message(A))
    s.up.take()
    s.up.reply(b"421 4.3.2 closing\r\n")
    [r] = result_of(d)
    assert (r.failure, r.code) == (FailureClass.MAIL, 421)
    assert s.up.take() == b"QUIT\r\n"


# -- keepalive, idle limit, connection age -----------------------------------------------------


def keepalive_session(**config: Any) -> tuple[Session, list[str]]:
    """A ready session whose pool callbacks are recorded in order."""
    s = ready_session(**config)
    events: list[str] = []
    s.client.on_ready = lambda c: events.append("ready")
    s.client.on_leaving = lambda c: events.append("leaving")
    s.client.on_closed = lambda c: events.append("closed")
    return s, events


def test_keepalive_noops_at_the_interval_and_quits_at_the_idle_timeout() -> None:
    s, events = keepalive_session(keepalive=10.0, idle_timeout=30.0)
    s.clock.advance(9.9)
    assert s.up.take() == b""
    s.clock.advance(0.1)
    assert s.up.take() == b"NOOP\r\n"
    s.clock.advance(1.0)  # the reply takes a second: the interval counts from the reply
    s.up.reply(b"250 2.0.0 ok\r\n")
    s.clock.advance(9.9)
    assert s.up.take() == b""
    s.clock.advance(0.1)
    assert s.up.take() == b"NOOP\r\n"
    s.up.reply(b"250 2.0.0 ok\r\n")
    # 21 s idle so far; NOOPs are not use: QUIT 30 s after the session became ready.
    s.clock.advance(8.9)
    assert s.up.take() == b""
    s.clock.advance(0.1)
    assert s.up.take() == b"QUIT\r\n"
    assert events == ["leaving", "ready", "leaving", "ready", "leaving"]


def test_a_noop_in_flight_makes_the_client_not_ready_until_its_reply() -> None:
    """The pool hears on_leaving when the NOOP goes out and on_ready on its 2xx, so it never
    hands over a message whose MAIL reply could be confused with the NOOP's."""
    s, events = keepalive_session(keepalive=10.0, idle_timeout=300.0)
    s.clock.advance(10.0)
    assert s.up.take() == b"NOOP\r\n"
    assert events == ["leaving"]
    assert not s.client.is_ready
    assert s.client.may_serve  # still alive: the pool must not give up on it
    assert not s.client.in_setup
    with pytest.raises(AssertionError):
        s.client.send(message(A))
    assert s.up.take() == b""
    s.up.reply(b"250 ok\r\n")
    assert events == ["leaving", "ready"]
    assert s.client.is_ready
    d = s.client.send(message(A))
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
    assert result_of(d)[0].kind is Kind.DELIVERED


@pytest.mark.parametrize("reply", [b"421 4.4.2 closing", b"500 5.5.1 what", b"354 odd"])
def test_a_noop_answered_with_anything_but_2xx_quits(reply: bytes) -> None:
    s, events = keepalive_session(keepalive=10.0)
    s.clock.advance(10.0)
    assert s.up.take() == b"NOOP\r\n"
    s.up.reply(reply + b"\r\n")
    assert s.up.take() == b"QUIT\r\n"
    assert events == ["leaving"]  # once: the NOOP already took it out of the idle list
    assert not s.client.is_ready


def test_a_noop_without_reply_is_aborted_after_the_command_timeout() -> None:
    s, events = keepalive_session(keepalive=10.0)
    s.clock.advance(10.0)
    s.up.take()
    s.clock.advance(TIMEOUTS["command_timeout"] - 0.1)
    assert not s.up.aborted
    s.clock.advance(0.2)
    assert s.up.aborted
    assert not s.client.may_serve


def test_keepalive_zero_sends_no_noop() -> None:
    s, _ = keepalive_session(keepalive=0, idle_timeout=100.0)
    s.clock.advance(99.9)
    assert s.up.take() == b""
    s.clock.advance(0.1)
    assert s.up.take() == b"QUIT\r\n"


def test_the_idle_spell_starts_again_after_a_transaction() -> None:
    s, _ = keepalive_session(keepalive=0, idle_timeout=30.0)
    s.clock.advance(20.0)
    d = s.client.send(message(A))
    s.clock.advance(5.0)
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
    result_of(d)
    s.up.take()
    s.clock.advance(29.9)
    assert s.up.take() == b""
    s.clock.advance(0.1)
    assert s.up.take() == b"QUIT\r\n"


def test_an_unsolicited_line_while_idle_does_not_postpone_the_idle_timeout() -> None:
    """Each received line restarts TimeoutMixin's timer with its last period; the idle
    deadline stays where it was."""
    s, _ = keepalive_session(keepalive=0, idle_timeout=30.0)
    s.clock.advance(20.0)
    s.up.reply(b"250 unsolicited\r\n")
    s.clock.advance(9.5)
    assert s.up.take() == b""
    s.clock.advance(0.5)
    assert s.up.take() == b"QUIT\r\n"


def test_exactly_one_timer_per_connection() -> None:
    s = Session(keepalive=10.0, idle_timeout=35.0)

    def pending() -> int:
        return len([c for c in s.clock.getDelayedCalls() if c.active()])

    assert pending() == 1  # greeting
    s.set_up()
    assert pending() == 1  # keepalive
    s.clock.advance(10.0)
    assert pending() == 1  # the NOOP's reply
    s.up.reply(b"250 ok\r\n")
    assert pending() == 1
    d = s.client.send(message(A))
    assert pending() == 1
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
    result_of(d)
    assert pending() == 1
    s.client.quit()
    assert pending() == 1


def test_too_old_once_max_connection_age_has_passed_since_connect() -> None:
    s = Session(max_connection_age=100.0, keepalive=0, idle_timeout=1000.0)
    assert s.client.connected_at == 0.0
    s.clock.advance(5.0)
    s.set_up()
    s.clock.advance(94.5)
    assert not s.client.too_old
    s.clock.advance(0.5)
    assert s.client.too_old


def test_never_connected_is_not_too_old() -> None:
    client = RelayClient(provider_config(max_connection_age=1.0), Clock(), None)
    assert client.connected_at is None
    assert not client.too_old


def test_an_idle_client_quits_when_it_reaches_its_age_between_keepalives() -> None:
    s, events = keepalive_session(keepalive=10.0, idle_timeout=1000.0, max_connection_age=25.0)
    for _ in range(2):
        s.clock.advance(10.0)
        assert s.up.take() == b"NOOP\r\n"
        s.up.reply(b"250 ok\r\n")
    s.clock.advance(4.5)
    assert s.up.take() == b""
    s.clock.advance(0.5)
    assert s.client.too_old
    assert s.up.take() == b"QUIT\r\n"
    assert events[-1] == "leaving"


def test_a_client_ready_again_when_too_old_quits_at_its_next_tick() -> None:
    """The pool checks too_old when the client reports ready; if it keeps it idle anyway, the
    client leaves by itself at once instead of sending a NOOP."""
    s = ready_session(keepalive=10.0, idle_timeout=1000.0, max_connection_age=25.0)
    s.clock.advance(5.0)
    d = s.client.send(message(A))
    s.clock.advance(19.0)
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    s.clock.advance(2.0)
    s.up.reply(b"250 queued\r\n")
    result_of(d)
    assert s.client.too_old and s.client.is_ready
    s.up.take()
    s.clock.advance(0)
    assert s.up.take() == b"QUIT\r\n"


# -- a large payload, written a piece at a time -----------------------------------------------


def big_body() -> bytes:
    return b"Subject: big\r\n\r\n" + (b"RCPT TO:<victim@example.test>\r\n" * 40_000)


def test_a_large_payload_goes_in_pieces_and_the_dot_makes_it_uncertain() -> None:
    s = ready_session()
    msg = message(A, body=big_body())
    d = s.client.send(msg)
    s.up.take()
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    producer = s.up.transport.producer
    assert producer is not None
    while s.up.transport.producer is not None:
        producer.resumeProducing()
    assert s.up.take() == build_data_payload(msg.body)
    s.up.lose(error.ConnectionLost())  # after the final dot: maybe delivered
    [r] = result_of(d)
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, True)


def test_a_reply_before_the_end_of_a_large_payload_drops_the_connection() -> None:
    s = ready_session()
    d = s.client.send(message(A, body=big_body()))
    s.up.take()
    s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    producer = s.up.transport.producer
    assert producer is not None
    producer.resumeProducing()  # one piece of many
    s.up.take()
    s.up.reply(b"552 5.3.4 message too big\r\n")
    [r] = result_of(d)
    # The body was never complete: temporary and certain, and nothing more goes out (no
    # RSET, no next command, no rest of the body read as commands by the upstream).
    assert (r.kind, r.uncertain) == (Kind.TEMPORARY, False)
    assert r.failure is FailureClass.PROTOCOL and "552 5.3.4 message too big" in r.reply
    assert s.up.transport.producer is None
    producer.resumeProducing()
    assert s.up.take() == b""
    assert s.up.aborted
