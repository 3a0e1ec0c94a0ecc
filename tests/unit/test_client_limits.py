"""RelayClient against a hostile or broken server: reply size limits, stage deadlines that a
drip of lines cannot push back, clean texts, the setup stage of a lost connection, reply
codes on setup failures, and addresses it cannot encode."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.address import IPv6Address
from twisted.mail import smtp

from mailrelay.outbound.replies import (
    MAX_LINE_LENGTH,
    MAX_REPLY_LINES,
    MAX_REPLY_TEXT,
    REDACTED,
    _clean_text,
)
from mailrelay.outbound.results import FailureClass, Kind
from mailrelay.outbound.session import SessionError
from mailrelay.outbound.transaction import NON_ASCII_ADDRESS
from tests.unit.fakes import (
    EHLO_PIPELINING,
    TIMEOUTS,
    TCPLikeTransport,
    TLSTransport,
    has_fired,
    message,
    result_of,
)
from tests.unit.test_client import (
    EHLO_AUTH,
    EHLO_STARTTLS,
    PASSWORD,
    TLS_CONTEXT,
    Session,
    by_recipient,
    ready_session,
)

A, B = "a@example.test", "b@example.test"
GREETING = TIMEOUTS["greeting_timeout"]
COMMAND = TIMEOUTS["command_timeout"]


# -- deadlines: only a complete reply restarts a stage timer -------------------------------------


@pytest.mark.parametrize("line", [b"220-still here\r\n", b"000 informational\r\n"])
def test_a_drip_of_lines_does_not_extend_the_greeting_deadline(line: bytes) -> None:
    s = Session()
    for _ in range(int(GREETING) - 1):
        s.up.reply(line)
        s.clock.advance(1.0)
    assert not has_fired(s.client.ready)
    s.up.reply(line)
    s.clock.advance(1.1)
    assert s.session_error().stage == "timeout"
    assert s.up.aborted


def test_a_drip_of_continuation_lines_does_not_extend_a_transaction_deadline() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    for _ in range(int(COMMAND) - 1):
        s.up.reply(b"250-wait for it\r\n")
        s.clock.advance(1.0)
    assert not has_fired(d)
    s.clock.advance(1.1)
    [r] = result_of(d)
    assert (r.kind, r.failure) == (Kind.TEMPORARY, FailureClass.TIMEOUT)


def test_a_partial_line_does_not_extend_the_deadline() -> None:
    s = Session()
    s.clock.advance(GREETING - 1)
    s.up.reply(b"220 almost")  # no CRLF: not even a line
    s.clock.advance(1.1)
    assert s.session_error().stage == "timeout"


def test_a_complete_reply_starts_the_next_stage_timer() -> None:
    """The greeting arrives just before its deadline: EHLO gets a full command timeout."""
    s = Session()
    s.clock.advance(GREETING - 0.5)
    s.up.reply(b"220-upstream.test\r\n220 ESMTP\r\n")
    s.clock.advance(COMMAND - 0.1)
    assert not has_fired(s.client.ready)
    s.up.reply(EHLO_PIPELINING)
    assert result_of(s.client.ready) is s.client


def test_each_pipelined_reply_restarts_the_command_timer() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.clock.advance(COMMAND - 1)
    s.up.reply(b"250 sender ok\r\n")
    s.clock.advance(COMMAND - 1)
    assert not has_fired(d)
    s.up.reply(b"250 rcpt ok\r\n354 go\r\n250 queued\r\n")
    [r] = result_of(d)
    assert r.kind is Kind.DELIVERED


def test_the_starttls_reply_has_a_timer_of_its_own() -> None:
    s = Session(transport=TLSTransport(), tls="starttls", tls_options=TLS_CONTEXT)
    s.up.reply(b"220 hi\r\n")
    s.clock.advance(COMMAND - 1)
    s.up.reply(EHLO_STARTTLS)
    assert s.up.take().endswith(b"STARTTLS\r\n")
    s.clock.advance(COMMAND - 0.1)
    assert not has_fired(s.client.ready)
    s.clock.advance(0.2)
    assert s.session_error().stage == "timeout"


# -- reply size ----------------------------------------------------------------------------------


def test_a_reply_of_the_maximum_number_of_lines_is_accepted() -> None:
    s = Session()
    s.up.reply(b"220-x\r\n" * (MAX_REPLY_LINES - 1) + b"220 x\r\n")
    assert s.up.take() == b"EHLO relay.test\r\n"
    assert not has_fired(s.client.ready)


@pytest.mark.parametrize("line", [b"220-x\r\n", b"000 x\r\n"])
def test_one_line_more_ends_the_session(line: bytes) -> None:
    s = Session()
    s.up.reply(line * MAX_REPLY_LINES + b"220 x\r\n")
    exc = s.session_error()
    assert (exc.stage, exc.detail, exc.code) == ("protocol", "reply too long", None)
    assert s.up.aborted
    assert s.up.take() == b""
    assert s.client.resp == []  # nothing kept


def test_a_reply_over_64_kib_ends_the_session() -> None:
    s = Session()
    line = b"220-" + b"x" * (MAX_LINE_LENGTH - 4) + b"\r\n"
    s.up.reply(line * 40)  # 40 lines, about 80 KiB
    assert s.session_error().detail == "reply too long"
    assert s.up.aborted


def test_a_long_reply_in_a_transaction_is_a_protocol_error() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(b"250-x\r\n" * MAX_REPLY_LINES + b"250 ok\r\n")
    [r] = result_of(d)
    assert (r.kind, r.failure) == (Kind.TEMPORARY, FailureClass.PROTOCOL)
    assert "reply too long" in r.reply
    assert s.up.aborted


def test_a_line_of_the_maximum_length_is_accepted() -> None:
    s = Session()
    s.up.reply(b"220 " + b"x" * (MAX_LINE_LENGTH - 4) + b"\r\n")
    assert s.up.take() == b"EHLO relay.test\r\n"


@pytest.mark.parametrize("crlf", [b"\r\n", b""], ids=["complete", "unterminated"])
def test_a_longer_line_ends_the_session_as_a_protocol_error(crlf: bytes) -> None:
    s = Session()
    s.up.reply(b"220 " + b"x" * (MAX_LINE_LENGTH - 3) + crlf)
    if not crlf:
        s.up.reply(b"xx")  # the buffer now exceeds a line's worth without a CRLF
    exc = s.session_error()
    assert (exc.stage, exc.detail) == ("protocol", "reply line too long")
    assert s.up.aborted


def test_a_long_line_after_the_session_failed_is_ignored_over_tcp() -> None:
    """A TCP transport keeps delivering after abort: no second failure, no exception."""
    s = Session(transport=TCPLikeTransport())
    s.up.reply(b"421 busy\r\n")
    s.up.reply(b"x" * (MAX_LINE_LENGTH * 2) + b"\r\n")
    assert s.session_error().stage == "greeting"


def test_an_invalid_reply_line_is_a_protocol_error_with_a_short_detail() -> None:
    s = Session()
    s.up.reply(b"hello " + b"y" * 2000 + b"\r\n")
    exc = s.session_error()
    assert exc.stage == "protocol"
    assert exc.detail.startswith("invalid reply from server: hello")
    assert len(exc.detail) <= MAX_REPLY_TEXT


def test_an_error_without_a_code_has_its_detail_truncated() -> None:
    s = Session()
    s.client.sendError(smtp.SMTPProtocolError(-1, "z" * 5000))
    exc = s.session_error()
    assert exc.stage == "protocol"
    assert exc.detail == "z" * MAX_REPLY_TEXT


# -- clean texts -----------------------------------------------------------------------------------


def test_control_characters_in_a_reply_become_question_marks() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    evil = (
        b"550 5.1.1 \x1b[31mred\x1b[0m bell\x07 nul\x00 del\x7f c1\xc2\x9b "
        + "bidi\u202eevil\u2066".encode()
        + b" bad-utf8\xff\r\n"
    )
    s.up.reply(b"250 ok\r\n" + evil + b"354 go\r\n")
    s.up.take()
    s.up.reply(b".\r\n554 no valid recipients\r\n")  # the discard
    [r] = result_of(d)
    assert r.kind is Kind.PERMANENT
    assert r.reply.isprintable()
    assert r.reply == ("550 5.1.1 ?[31mred?[0m bell? nul? del? c1? bidi?evil? bad-utf8\ufffd")


def test_whitespace_is_collapsed_before_control_characters_are_replaced() -> None:
    assert _clean_text(b"a\r\n\tb \x0b\x0c c\x1cd") == "a b c d"
    assert _clean_text("x\x1by") == "x?y"


def _clean_text_by_definition(text: str, secrets: list[str]) -> str:
    def redact(text: str) -> str:
        for secret in sorted(secrets, key=len, reverse=True):
            if secret:
                text = text.replace(secret, REDACTED)
        return text

    text = redact(" ".join(redact(text).split()))
    return "".join(c if c.isprintable() else "?" for c in text)


@given(
    st.text(st.characters(max_codepoint=0x2100), max_size=60),
    st.lists(st.text(st.sampled_from("ab \n\x1b"), max_size=4), max_size=3, unique=True),
)
def test_the_shortcuts_of_clean_text_change_nothing(text: str, secrets: list[str]) -> None:
    assert _clean_text(text, secrets) == _clean_text_by_definition(text, secrets)


def test_a_multi_line_reply_becomes_one_line() -> None:
    s = ready_session()
    d = s.client.send(message(A))
    s.up.reply(b"250 ok\r\n550-5.1.1 first\r\n550 5.1.1 second\r\n503 no\r\n")
    [r] = result_of(d)
    assert r.reply == "550 5.1.1 first 5.1.1 second"


# -- where a connection lost during setup failed ---------------------------------------------------


def _lost(s: Session) -> SessionError:
    s.up.lose(error.ConnectionLost())
    return s.session_error()


def test_lost_before_the_greeting_is_connect() -> None:
    s = Session()
    assert _lost(s).stage == "connect"


def test_lost_waiting_for_the_starttls_reply_is_connect() -> None:
    s = Session(transport=TLSTransport(), tls="starttls", tls_options=TLS_CONTEXT)
    s.up.reply(b"220 hi\r\n")
    s.up.reply(EHLO_STARTTLS)
    exc = _lost(s)
    assert exc.stage == "connect"
    assert "(starttls)" in exc.detail


@pytest.mark.parametrize("ehlo_begun", [False, True])
def test_lost_in_the_handshake_or_the_ehlo_after_it_is_tls(ehlo_begun: bool) -> None:
    s = Session(transport=TLSTransport(), tls="starttls", tls_options=TLS_CONTEXT)
    s.up.reply(b"220 hi\r\n")
    s.up.reply(EHLO_STARTTLS)
    s.up.reply(b"220 go ahead\r\n")
    if ehlo_begun:  # a continuation line only: the EHLO reply is still pending
        s.up.reply(b"250-upstream.test\r\n")
    assert _lost(s).stage == "tls"


def _starttls_to_auth(**config: Any) -> Session:
    s = Session(
        transport=TLSTransport(),
        password=PASSWORD,
        tls="starttls",
        tls_options=TLS_CONTEXT,
        host="smtp.example.test",
        username="user",
        **config,
    )
    s.up.reply(b"220 hi\r\n")
    s.up.reply(EHLO_STARTTLS)
    s.up.reply(b"220 go ahead\r\n")
    s.up.reply(EHLO_AUTH)
    assert s.up.take().split(b"\r\n")[-2].startswith(b"AUTH PLAIN ")
    return s


def test_lost_waiting_for_the_auth_reply_after_starttls_is_auth() -> None:
    """/tmp/rv/r5.py: a server that drops the connection on bad credentials."""
    s = _starttls_to_auth()
    exc = _lost(s)
    assert exc.stage == "auth"
    assert "(auth)" in exc.detail


def test_lost_waiting_for_the_auth_reply_with_implicit_tls_is_auth() -> None:
    s = Session(
        password=PASSWORD,
        tls="implicit",
        tls_options=TLS_CONTEXT,
        host="smtp.example.test",
        username="user",
    )
    s.up.reply(b"220 hi\r\n")
    s.up.reply(EHLO_AUTH)
    assert b"AUTH PLAIN" in s.up.take()
    assert _lost(s).stage == "auth"


def test_an_ssl_error_is_tls_whatever_the_step() -> None:
    from OpenSSL import SSL

    s = _starttls_to_auth()
    s.up.lose(SSL.Error([("SSL routines", "", "bad record mac")]))
    assert s.session_error().stage == "tls"


# -- reply codes on setup failures -----------------------------------------------------------------


def test_a_refusing_greeting_carries_its_code() -> None:
    s = Session()
    s.up.reply(b"421 4.7.0 too many connections from your host\r\n")
    exc = s.session_error()
    assert (exc.stage, exc.code) == ("greeting", 421)


def test_a_refused_ehlo_carries_its_code() -> None:
    s = Session()
    s.up.reply(b"220 hi\r\n")
    s.up.reply(b"550 5.7.1 go away\r\n")
    exc = s.session_error()
    assert (exc.stage, exc.code) == ("greeting", 550)
    assert "550 5.7.1 go away" in exc.detail


def test_a_refused_starttls_carries_its_code() -> None:
    s = Session(transport=TLSTransport(), tls="starttls", tls_options=TLS_CONTEXT)
    s.up.reply(b"220 hi\r\n")
    s.up.reply(EHLO_STARTTLS)
    s.up.reply(b"454 4.7.0 TLS not available\r\n")
    exc = s.session_error()
    assert (exc.stage, exc.code) == ("tls", 454)


def test_a_refused_auth_carries_its_code() -> None:
    s = Session(username="user", password=PASSWORD)
    s.up.reply(b"220 hi\r\n")
    s.up.reply(EHLO_AUTH)
    s.up.reply(b"535 5.7.8 no\r\n")
    exc = s.session_error()
    assert (exc.stage, exc.code) == ("auth", 535)


@pytest.mark.parametrize("how", ["timeout", "lost", "no-starttls", "invalid"])
def test_failures_not_decided_by_a_reply_carry_no_code(how: str) -> None:
    s = Session(transport=TLSTransport(), tls="starttls", tls_options=TLS_CONTEXT)
    if how == "timeout":
        s.clock.advance(GREETING + 1)
    elif how == "lost":
        s.up.lose(error.ConnectionLost())
    elif how == "no-starttls":
        s.up.reply(b"220 hi\r\n" + EHLO_PIPELINING)
    else:
        s.up.reply(b"2xx what\r\n")
    assert s.session_error().code is None


def test_session_error_code_defaults_to_none() -> None:
    assert SessionError("auth", "x").code is None
    assert SessionError("greeting", "421 busy", 421).code == 421


# -- addresses that are not ASCII ------------------------------------------------------------------


def test_a_non_ascii_sender_is_refused_at_once_and_the_client_stays_ready() -> None:
    s = ready_session()
    d = s.client.send(message(A, B, sender="jörg@example.test"))
    results = result_of(d)
    assert [(r.recipient, r.kind, r.failure, r.code, r.reply) for r in results] == [
        (A, Kind.PERMANENT, FailureClass.MAIL, None, NON_ASCII_ADDRESS),
        (B, Kind.PERMANENT, FailureClass.MAIL, None, NON_ASCII_ADDRESS),
    ]
    assert s.up.take() == b""
    assert s.client.is_ready
    # And the next message goes out as usual.
    s.client.send(message(A))
    assert s.up.take().startswith(b"MAIL FROM:<sender@example.test>")


def test_only_non_ascii_recipients_are_refused_at_once() -> None:
    s = ready_session()
    d = s.client.send(message("jörg@example.test", "zoë@example.test"))
    results = result_of(d)
    assert {(r.kind, r.failure, r.code, r.reply) for r in results} == {
        (Kind.PERMANENT, FailureClass.RCPT, None, NON_ASCII_ADDRESS)
    }
    assert s.up.take() == b""
    assert s.client.is_ready


def test_a_non_ascii_recipient_is_left_out_of_the_transaction_of_the_others() -> None:
    s = ready_session()
    bad = "jörg@example.test"
    d = s.client.send(message(A, bad, B))
    written = s.up.take()
    assert b"RCPT TO:<a@example.test>" in written
    assert b"RCPT TO:<b@example.test>" in written
    assert written.count(b"RCPT TO") == 2
    s.up.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n")
    in_order = result_of(d)
    assert [r.recipient for r in in_order] == [A, bad, B]  # the message's order
    results = by_recipient(in_order)
    assert results[A].kind is Kind.DELIVERED and results[B].kind is Kind.DELIVERED
    assert (results[bad].kind, results[bad].failure, results[bad].reply) == (
        Kind.PERMANENT,
        FailureClass.RCPT,
        NON_ASCII_ADDRESS,
    )


def test_a_non_ascii_recipient_with_an_8bit_refusal_is_still_permanent() -> None:
    s = ready_session(b"250 up\r\n")
    bad = "jörg@example.test"
    msg = message(A, bad)
    msg = type(msg)(msg.queue_id, msg.sender, msg.recipients, b"caf\xc3\xa9\r\n", body_8bit=True)
    results = by_recipient(result_of(s.client.send(msg)))
    assert results[bad].kind is Kind.PERMANENT
    assert (results[A].kind, results[A].failure) == (Kind.TEMPORARY, FailureClass.UNAVAILABLE)
    assert s.client.is_ready


# -- the loopback peer check (AUTH without TLS) ---------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_auth_without_tls_needs_a_loopback_peer_too(host: str) -> None:
    s = Session(username="user", password=PASSWORD, host=host)
    s.up.transport.peerAddr = IPv6Address("TCP", "2001:db8::25", 25)
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_AUTH)
    exc = s.session_error()
    assert (exc.stage, exc.detail) == ("auth", "refusing to send credentials without TLS")
    assert s.up.take() == b""


def test_auth_without_tls_to_a_loopback_ipv6_peer_is_allowed() -> None:
    s = Session(username="user", password=PASSWORD, host="localhost")
    s.up.transport.peerAddr = IPv6Address("TCP", "::1", 25)
    s.up.reply(b"220 hi\r\n")
    s.up.take()
    s.up.reply(EHLO_AUTH)
    assert s.up.take().startswith(b"AUTH PLAIN ")
