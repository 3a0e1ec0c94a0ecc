"""RelayClient AUTH: the mechanism order, the LOGIN and CRAM-MD5 exchanges byte for byte, one
attempt per connection, and no credential anywhere but in the AUTH exchange itself."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mailrelay.outbound.client import SessionError
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
