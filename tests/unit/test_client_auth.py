"""RelayClient AUTH: the mechanism order, the LOGIN and CRAM-MD5 exchanges byte for byte, one
attempt per connection, and no credential anywhere but in the AUTH exchange itself."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mailrelay.outbound.session import SessionError
from tests.unit.fakes import LogCapture, has_fired, message, result_of
from tests.unit.test_client import PASSWORD, Session

USER = "user@example.test"
USER_B64 = base64.b64encode(USER.encode())
PASSWORD_B64 = base64.b64encode(PASSWORD.encode())
PLAIN_TOKEN = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
LOGIN_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # base64 "Username:"
LOGIN_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # base64 "Password:"


def ehlo_offering(mechanisms: bytes) -> bytes:
    return b"250-upstream.test\r\n250-PIPELINING\r\n250 AUTH " + mechanisms + b"\r\n"


def greeted(**config: Any) -> Session:
    """A session to a loopback host (AUTH allowed without TLS) after the greeting."""
    values: dict[str, Any] = {"username": USER, "password": PASSWORD, "host": "127.0.0.1"}
    values.update(config)
    s = Session(**values)
    s.up.reply(b"220 hi\r\n")
    assert s.up.take() == b"EHLO relay.test\r\n"
    return s


def auth_error(s: Session) -> SessionError:
    exc = s.session_error()
    assert exc.stage == "auth"
    return exc


def assert_no_secret(texts: list[str]) -> None:
    for text in texts:
        for secret in (PASSWORD, PASSWORD_B64.decode(), PLAIN_TOKEN.decode()):
            assert secret not in text


# -- the exchanges ------------------------------------------------------------------------------


def test_login_exchange_byte_exact() -> None:
    s = greeted()
    s.up.reply(ehlo_offering(b"LOGIN"))
    assert s.up.take() == b"AUTH LOGIN\r\n"
    s.up.reply(LOGIN_USERNAME)
    assert s.up.take() == USER_B64 + b"\r\n"
    s.up.reply(LOGIN_PASSWORD)
    assert s.up.take() == PASSWORD_B64 + b"\r\n"
    assert not has_fired(s.client.ready)
    s.up.reply(b"235 2.7.0 Authentication successful\r\n")
    assert result_of(s.client.ready) is s.client
    assert s.client.is_ready
    assert s.up.take() == b""


def test_cram_md5_exchange_matches_the_rfc_2195_example() -> None:
    s = greeted(username="tim", password="tanstaaftanstaaf")
    s.up.reply(ehlo_offering(b"CRAM-MD5"))
    assert s.up.take() == b"AUTH CRAM-MD5\r\n"
    s.up.reply(b"334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
    assert s.up.take() == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"
    s.up.reply(b"235 2.7.0 ok\r\n")
    assert result_of(s.client.ready) is s.client


@pytest.mark.parametrize(
    ("configured", "offered", "first_line"),
    [
        # The default order: PLAIN, LOGIN, CRAM-MD5, whatever order the server lists them in.
        (None, b"CRAM-MD5 LOGIN PLAIN", b"AUTH PLAIN " + PLAIN_TOKEN),
        (None, b"CRAM-MD5 LOGIN", b"AUTH LOGIN"),
        (None, b"cram-md5 xoauth2", b"AUTH CRAM-MD5"),
        (("CRAM-MD5", "LOGIN"), b"PLAIN LOGIN CRAM-MD5", b"AUTH CRAM-MD5"),
        (("LOGIN",), b"PLAIN LOGIN", b"AUTH LOGIN"),
    ],
)
def test_the_first_configured_mechanism_the_server_offers_wins(
    configured: tuple[str, ...] | None, offered: bytes, first_line: bytes
) -> None:
    s = greeted(**({} if configured is None else {"auth_mechanisms": configured}))
    s.up.reply(ehlo_offering(offered))
    assert s.up.take() == first_line + b"\r\n"


def test_no_configured_mechanism_offered_names_the_mechanisms_only() -> None:
    s = greeted(auth_mechanisms=("LOGIN", "CRAM-MD5"))
    s.up.reply(ehlo_offering(b"PLAIN XOAUTH2"))
    exc = auth_error(s)
    assert exc.detail == "server offers none of the configured AUTH mechanisms: LOGIN CRAM-MD5"
    assert USER not in str(exc)
    assert s.up.take() == b""
    assert s.up.aborted


# -- one attempt ---------------------------------------------------------------------------------


def test_535_on_login_is_one_attempt_and_never_leaks_the_password() -> None:
    """Pitfall 24: no second mechanism, no second try; pitfall 23: no secret in errors/logs."""
    with LogCapture() as logs:
        s = greeted()
        s.up.reply(ehlo_offering(b"CRAM-MD5 LOGIN"))  # CRAM-MD5: never a second choice
        assert s.up.take() == b"AUTH LOGIN\r\n"
        s.up.reply(LOGIN_USERNAME)
        s.up.reply(LOGIN_PASSWORD)
        assert s.up.take() == USER_B64 + b"\r\n" + PASSWORD_B64 + b"\r\n"
        s.up.reply(b"535 5.7.8 Authentication failed: " + PASSWORD_B64 + b"\r\n")
        # Whatever follows on the same chunk or later is not acted on.
        s.up.reply(b"334 VXNlcm5hbWU6\r\n250 ok\r\n")
        exc = auth_error(s)
    assert exc.detail == "credentials rejected (535)"
    assert s.up.take() == b""  # no CRAM-MD5, no second AUTH LOGIN
    assert s.up.aborted
    assert_no_secret([str(exc), repr(exc), exc.detail, *logs.texts()])


def test_535_on_cram_md5_is_one_attempt() -> None:
    s = greeted(username="tim", password="tanstaaftanstaaf", auth_mechanisms=("CRAM-MD5", "LOGIN"))
    s.up.reply(ehlo_offering(b"CRAM-MD5 LOGIN"))
    s.up.reply(b"334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
    s.up.reply(b"535 5.7.8 nope\r\n")
    assert s.up.take().count(b"AUTH") == 1
    assert auth_error(s).detail == "credentials rejected (535)"


def test_login_refused_before_the_credentials_sends_none_and_tries_nothing_else() -> None:
    s = greeted()
    s.up.reply(ehlo_offering(b"LOGIN CRAM-MD5"))
    assert s.up.take() == b"AUTH LOGIN\r\n"
    s.up.reply(b"504 5.5.4 mechanism not available\r\n")
    assert auth_error(s).detail == "AUTH LOGIN refused (504)"
    assert s.up.take() == b""


def test_an_extra_challenge_after_the_password_fails_without_another_answer() -> None:
    s = greeted()
    s.up.reply(ehlo_offering(b"LOGIN"))
    s.up.reply(LOGIN_USERNAME + LOGIN_PASSWORD)
    s.up.take()
    s.up.reply(b"334 UGFzc3dvcmQ6\r\n")
    assert auth_error(s).detail == "credentials rejected (334)"
    assert s.up.take() == b""


def test_a_malformed_cram_md5_challenge_sends_nothing() -> None:
    s = greeted(auth_mechanisms=("CRAM-MD5",))
    s.up.reply(ehlo_offering(b"CRAM-MD5"))
    s.up.take()
    s.up.reply(b"334 not base64!\r\n")
    assert auth_error(s).detail == "malformed AUTH CRAM-MD5 challenge"
    assert s.up.take() == b""
    assert s.up.aborted


@pytest.mark.parametrize("mechanism", ["LOGIN", "CRAM-MD5"])
def test_no_auth_in_clear_text_to_a_remote_host_whatever_the_mechanism(mechanism: str) -> None:
    s = greeted(host="192.0.2.1", auth_mechanisms=(mechanism,))
    s.up.reply(ehlo_offering(mechanism.encode()))
    assert auth_error(s).detail == "refusing to send credentials without TLS"
    assert s.up.take() == b""


# -- the secret stays in the exchange ------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_the_password_is_written_only_in_the_auth_exchange_and_never_logged(
    mechanism: str,
) -> None:
    with LogCapture() as logs:
        s = greeted(auth_mechanisms=(mechanism,))
        s.up.reply(ehlo_offering(b"PLAIN LOGIN"))
        if mechanism == "LOGIN":
            s.up.reply(LOGIN_USERNAME + LOGIN_PASSWORD)
        auth_writes = list(s.up.transport.writes)
        s.up.take()
        s.up.reply(b"235 ok\r\n")
        result_of(s.client.ready)
        # A transaction ending in a 421 (logged) and the QUIT after it.
        d = s.client.send(message("a@example.test", body=b"Subject: x\r\n\r\nbody\r\n"))
        s.up.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.up.reply(b"421 4.3.0 closing\r\n")
        result_of(d)
        s.up.reply(b"221 bye\r\n")
        after_auth = s.up.take()
    secret_writes = [w for w in auth_writes if PASSWORD_B64 in w or PLAIN_TOKEN in w]
    assert len(secret_writes) == 1  # the one line that carries it
    assert PASSWORD.encode() not in b"".join(auth_writes)  # never in clear, only base64
    for secret in (PASSWORD.encode(), PASSWORD_B64, PLAIN_TOKEN):
        assert secret not in after_auth
    assert_no_secret(list(logs.texts()))


# -- echoes of the credentials are scrubbed from every text --------------------------------------

CRAM_CHALLENGE = b"334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n"
CRAM_ANSWER_B64 = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
CRAM_ANSWER = b"tim b913a602c7eda7a495b4e6e7334d3890"


def authenticated(mechanism: bytes = b"PLAIN", **config: Any) -> Session:
    s = greeted(auth_mechanisms=(mechanism.decode(),), **config)
    s.up.reply(ehlo_offering(mechanism))
    if mechanism == b"LOGIN":
        s.up.reply(LOGIN_USERNAME + LOGIN_PASSWORD)
    elif mechanism == b"CRAM-MD5":
        s.up.reply(CRAM_CHALLENGE)
    s.up.take()
    s.up.reply(b"235 ok\r\n")
    assert result_of(s.client.ready) is s.client
    return s


def test_an_echo_of_the_plain_token_after_235_is_scrubbed_from_the_log() -> None:
    """/tmp/secrev/r1.py: "235" and then an echo, read as an unsolicited reply."""
    with LogCapture() as logs:
        s = greeted()
        s.up.reply(ehlo_offering(b"PLAIN"))
        s.up.take()
        s.up.reply(b"235 ok\r\n500 5.5.1 unknown command " + PLAIN_TOKEN + b"\r\n")
    texts = list(logs.texts())
    assert_no_secret(texts)
    assert any("500 5.5.1 unknown command [redacted]" in t for t in texts)
    assert s.up.take() == b"QUIT\r\n"


def test_an_echo_in_a_later_reply_is_scrubbed_from_the_results() -> None:
    s = authenticated()
    d = s.client.send(message("a@example.test", "b@example.test"))
    s.up.take()
    s.up.reply(
        b"250 ok\r\n550 5.1.1 you said " + PLAIN_TOKEN + b"\r\n"
        b"550-5.1.1 that is " + PASSWORD_B64 + b"\r\n550 5.1.1 or " + PASSWORD.encode() + b"\r\n"
        b"503 no\r\n"
    )
    results = result_of(d)
    assert [r.reply for r in results] == [
        "550 5.1.1 you said [redacted]",
        "550 5.1.1 that is [redacted] 5.1.1 or [redacted]",
    ]


def test_an_echo_in_a_non_numeric_line_during_auth_is_scrubbed() -> None:
    s = greeted()
    s.up.reply(ehlo_offering(b"PLAIN"))
    s.up.take()
    s.up.reply(b"xyz unrecognized: AUTH PLAIN " + PLAIN_TOKEN + b"\r\n")
    exc = s.session_error()
    assert exc.stage == "protocol"
    assert exc.detail == "invalid reply from server: xyz unrecognized: AUTH PLAIN [redacted]"


def test_the_login_answers_are_scrubbed_base64_or_not() -> None:
    s = authenticated(b"LOGIN")
    d = s.client.send(message("a@example.test"))
    s.up.take()
    echo = b" ".join([USER_B64, PASSWORD_B64, USER.encode(), PASSWORD.encode()])
    s.up.reply(b"550 5.7.1 " + echo + b"\r\n503 no\r\n503 no\r\n")
    [r] = result_of(d)
    assert r.reply == "550 5.7.1 [redacted] [redacted] [redacted] [redacted]"


def test_the_cram_md5_answer_is_scrubbed_base64_or_not() -> None:
    s = authenticated(b"CRAM-MD5", username="tim", password="tanstaaftanstaaf")
    d = s.client.send(message("a@example.test"))
    s.up.take()
    s.up.reply(b"550 5.7.1 " + CRAM_ANSWER_B64 + b" / " + CRAM_ANSWER + b"\r\n503 no\r\n503 no\r\n")
    [r] = result_of(d)
    assert r.reply == "550 5.7.1 [redacted] / [redacted]"


def test_a_connection_lost_detail_is_scrubbed_and_the_secrets_go_with_the_connection() -> None:
    from twisted.internet import error

    s = authenticated()
    d = s.client.send(message("a@example.test"))
    s.up.lose(error.ConnectionLost("peer said " + PASSWORD))
    [r] = result_of(d)
    assert PASSWORD not in r.reply
    assert "[redacted]" in r.reply
    assert s.client._secrets == set()


def test_an_error_detail_from_send_error_is_scrubbed() -> None:
    from twisted.mail import smtp

    s = greeted()
    s.up.reply(ehlo_offering(b"PLAIN"))
    s.client.sendError(smtp.SMTPProtocolError(-1, b"echo " + PLAIN_TOKEN))
    assert s.session_error().detail == "echo [redacted]"


# -- a password that cannot be used, and what is kept after AUTH ---------------------------------


def test_a_password_that_is_not_utf8_fails_auth_cleanly() -> None:
    """/tmp/secrev/r5.py: os.environ keeps undecodable bytes as surrogates."""
    with LogCapture() as logs:
        s = greeted(password="hunter2\udcff-tail")
        s.up.reply(ehlo_offering(b"PLAIN LOGIN"))
        exc = auth_error(s)
    assert exc.detail == "cannot use the configured password (not UTF-8)"
    assert exc.code is None
    assert s.up.take() == b""
    assert s.up.aborted
    for text in [str(exc), repr(exc), *logs.texts()]:
        assert "hunter2" not in text
        assert "position" not in text


@pytest.mark.parametrize(
    ("raised", "detail"),
    [
        (ValueError("bad"), "malformed AUTH LOGIN challenge"),
        (UnicodeEncodeError("utf-8", "x\udcff", 1, 2, "no"), "cannot use the configured password"),
        (RuntimeError(PASSWORD), "cannot answer the AUTH LOGIN"),
    ],
)
def test_a_responder_that_raises_fails_auth_without_its_text(
    monkeypatch: pytest.MonkeyPatch, raised: Exception, detail: str
) -> None:
    def broken(_challenge: bytes) -> bytes:
        raise raised

    monkeypatch.setattr(
        "mailrelay.outbound.client.auth_exchange", lambda *_: (b"AUTH LOGIN", [broken])
    )
    s = greeted(auth_mechanisms=("LOGIN",))
    s.up.reply(ehlo_offering(b"LOGIN"))
    assert s.up.take() == b"AUTH LOGIN\r\n"
    s.up.reply(LOGIN_USERNAME)
    exc = auth_error(s)
    assert exc.detail.startswith(detail)
    assert PASSWORD not in exc.detail
    assert s.up.take() == b""
    assert s.up.aborted


@pytest.mark.parametrize("final", [b"235 ok\r\n", b"535 no\r\n"], ids=["success", "failure"])
def test_the_password_is_dropped_once_the_auth_exchange_is_over(final: bytes) -> None:
    s = greeted(auth_mechanisms=("LOGIN",))
    s.up.reply(ehlo_offering(b"LOGIN"))
    s.up.reply(LOGIN_USERNAME)
    assert s.client._password == PASSWORD  # still needed for the next challenge
    s.up.reply(LOGIN_PASSWORD + final)
    assert s.client._password is None
    assert not s.client._auth_responders
    if final.startswith(b"535"):
        auth_error(s)


def test_the_auth_steps_have_a_command_timer_each() -> None:
    """No line restarts a timer any more: each AUTH step arms its own."""
    from tests.unit.fakes import TIMEOUTS

    command = TIMEOUTS["command_timeout"]
    s = greeted(auth_mechanisms=("LOGIN",))
    s.up.reply(ehlo_offering(b"LOGIN"))
    s.clock.advance(command - 1)
    s.up.reply(LOGIN_USERNAME)
    s.clock.advance(command - 1)
    s.up.reply(LOGIN_PASSWORD)
    s.clock.advance(command - 0.5)
    assert not has_fired(s.client.ready)
    s.clock.advance(1)
    assert s.session_error().stage == "timeout"
