"""Tests of the fault-injection tools themselves: the test PKI (tests/support/certs.py), the
fault proxy (faultproxy.py), smtp-sink (smtpsink.py) and the scripted faults of the aiosmtpd
upstream (upstream.py). The fault suite trusts what they do, so each is checked here with
clients we did not write: smtplib, ssl and raw sockets.

Where a test asserts that nothing arrives (a stall, a hang), it waits a short, fixed read
timeout: an absence cannot be waited for any other way.
"""

from __future__ import annotations

import datetime
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support import smtpsink
from tests.support.certs import LOOPBACK_NAMES, WRONG_NAME, ServerKind, session_pki
from tests.support.faultproxy import FaultProxy
from tests.support.net import port_accepts, wait_until
from tests.support.smtpsink import SmtpSink
from tests.support.upstream import UpstreamProcess, run_script

pytestmark = pytest.mark.integration

SILENCE = 0.3  # how long "nothing arrives" is watched for
BODY = b"Subject: tools\r\n\r\nhello\r\n"


def _client(port: int, timeout: float = 5.0) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.localhost", timeout=timeout)


def _raw(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_reply(sock: socket.socket) -> bytes:
    """Read until a final reply line ("NNN " + text + CRLF) has arrived."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def _send_up_to_the_final_dot(sock: socket.socket) -> None:
    """After the greeting, pipeline EHLO, MAIL, RCPT and DATA; once the 354 has arrived, send
    BODY and the final dot (the reply to it is left to the caller)."""
    _read_reply(sock)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    data = b""
    while b"354" not in data:
        data += sock.recv(65536)
    sock.sendall(BODY + b".\r\n")


def _silent(sock: socket.socket) -> bool:
    """True if nothing (not even EOF) arrives on sock within SILENCE seconds."""
    sock.settimeout(SILENCE)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    return False


def _tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file or session_pki().ca_file))
    return context


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[UpstreamProcess]:
    with UpstreamProcess(tmp_path / "upstream") as proc:
        yield proc


def _tls_upstream(tmp_path: Path, kind: ServerKind = "valid", **options: Any) -> UpstreamProcess:
    """An upstream (not started) offering STARTTLS with a server certificate of the session
    PKI."""
    cert = session_pki().server(kind)
    return UpstreamProcess(tmp_path / "up", tls_cert=cert.chain, tls_key=cert.key, **options)


# -- certs -------------------------------------------------------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_pki_certificates_have_the_promised_names_issuers_and_dates() -> None:
    pki = session_pki()
    assert session_pki() is pki  # one per session
    ca = _load(pki.ca_file)
    now = datetime.datetime.now(datetime.UTC)

    def sans(cert: x509.Certificate) -> set[str]:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | {
            str(n) for n in ext.get_values_for_type(x509.IPAddress)
        }

    valid = _load(pki.server("valid").chain)
    assert sans(valid) == set(LOOPBACK_NAMES)
    assert valid.issuer == ca.subject
    assert valid.not_valid_after_utc > now
    assert _load(pki.server("untrusted").chain).issuer != ca.subject
    assert sans(_load(pki.server("wrong_name").chain)) == {WRONG_NAME}
    expired = _load(pki.server("expired").chain)
    assert expired.issuer == ca.subject and expired.not_valid_after_utc < now
    client = _load(pki.client.cert)
    assert client.issuer == ca.subject
    assert b"PRIVATE KEY" not in pki.client.cert.read_bytes()
    assert b"PRIVATE KEY" in pki.client.combined.read_bytes()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("valid", None),
        ("untrusted", "certificate verify failed"),
        ("wrong_name", "mismatch"),
        ("expired", "expired"),
    ],
)
def test_server_certificates_verify_as_named(
    tmp_path: Path, kind: ServerKind, error: str | None
) -> None:
    with _tls_upstream(tmp_path, kind) as up, _client(up.port) as client:
        client.ehlo()
        if error is None:
            client.starttls(context=_tls_context())
            client.ehlo()
            assert client.noop()[0] == 250
        else:
            with pytest.raises(ssl.SSLCertVerificationError, match=error):
                client.starttls(context=_tls_context())


def test_client_certificate_is_required_and_accepted(tmp_path: Path) -> None:
    pki = session_pki()
    with _tls_upstream(tmp_path, tls_client_ca=pki.ca_file) as up:
        with _client(up.port) as client:
            client.ehlo()
            with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, OSError)):
                client.starttls(context=_tls_context())
                client.ehlo()  # TLS 1.3: the server's refusal shows on the first read
        with _client(up.port) as client:
            client.ehlo()
            context = _tls_context()
            context.load_cert_chain(pki.client.cert, pki.client.key)
            client.starttls(context=context)
            client.ehlo()
            assert client.sendmail("a@example.test", ["b@example.test"], BODY) == {}
        assert up.message_count() == 1


# -- fault proxy -------------------------------------------------------------------------------


def test_proxy_pass_forwards_and_records(upstream: UpstreamProcess) -> None:
    with FaultProxy(upstream.port) as proxy:
        for _ in range(2):
            with _client(proxy.port) as client:
                assert client.sendmail("a@example.test", ["b@example.test"], BODY) == {}
        wait_until(lambda: proxy.open_connections == 0, timeout=5, what="connections closed")
        assert proxy.connection_count == 2
        first = proxy.records()[0]
        assert b"MAIL FROM:<A@EXAMPLE.TEST>" in first.client_plaintext.upper()
        assert first.server_bytes.startswith(b"220 ")
        assert not first.triggered and not first.tls_started
        assert proxy.errors == []
    assert [m["body"] for m in upstream.messages()] == [BODY, BODY]
    assert upstream.connection_count() == 2


def test_proxy_reset_at_connect_sends_rst_and_never_reaches_upstream(
    upstream: UpstreamProcess,
) -> None:
    with FaultProxy(upstream.port, mode="reset", at="connect") as proxy:
        # The RST may already be there when connect() returns (then connect reports it).
        with pytest.raises(ConnectionResetError), _raw(proxy.port) as s:
            s.recv(100)
        wait_until(lambda: proxy.connection_count == 1, timeout=5, what="1 connection")
    assert upstream.connection_count() == 0


def test_proxy_reset_after_server_line(upstream: UpstreamProcess) -> None:
    with FaultProxy(upstream.port, mode="reset", at="server:220") as proxy:
        with _raw(proxy.port) as s:
            data = b""
            with pytest.raises(ConnectionResetError):
                while chunk := s.recv(100):
                    data += chunk
                raise AssertionError(f"EOF instead of a reset after {data!r}")
            # Linux hands over what arrived before the RST, then reports the reset.
            assert data.startswith(b"220 ") and data.endswith(b"\r\n")
        assert proxy.records()[0].triggered


def test_proxy_reset_after_client_bytes_forwards_exactly_n() -> None:
    # A bare socket as the upstream, to see exactly which bytes got through.
    with socket.create_server(("127.0.0.1", 0)) as server:
        target = server.getsockname()[1]
        with FaultProxy(target, mode="reset", at="bytes:10") as proxy, _raw(proxy.port) as s:
            peer, _ = server.accept()  # the proxy connects upstream when it accepts
            with peer:
                s.sendall(b"EHLO client.localhost\r\nNOOP\r\n")
                with pytest.raises(ConnectionResetError):
                    s.recv(100)
                peer.settimeout(5)
                received = b""
                while len(received) < 10:
                    received += peer.recv(100)
                assert received == b"EHLO clien"
                assert _silent(peer)
            assert proxy.records()[0].triggered


def test_proxy_reset_after_final_dot_lets_the_upstream_store_it(
    upstream: UpstreamProcess,
) -> None:
    with FaultProxy(upstream.port, mode="reset", at="final-dot") as proxy:
        with _client(proxy.port) as client, pytest.raises((smtplib.SMTPException, OSError)):
            client.sendmail("a@example.test", ["b@example.test"], BODY)
        # The reply was lost on the way back; the message itself reached the upstream.
        [stored] = upstream.wait_for_messages(1)
        assert stored["body"] == BODY


def test_proxy_reset_after_client_command(upstream: UpstreamProcess) -> None:
    with FaultProxy(upstream.port, mode="reset", at="client:RCPT") as proxy:
        with _client(proxy.port) as client:
            client.ehlo()
            assert client.mail("a@example.test")[0] == 250
            with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
                client.rcpt("b@example.test")
        assert proxy.records()[0].triggered


def test_proxy_stall_at_connect_is_a_silent_greeting(upstream: UpstreamProcess) -> None:
    with FaultProxy(upstream.port, mode="stall", at="connect") as proxy, _raw(proxy.port) as s:
        assert _silent(s)
    assert upstream.connection_count() == 0


def test_proxy_stall_after_354_swallows_the_body(upstream: UpstreamProcess) -> None:
    with FaultProxy(upstream.port, mode="stall", at="server:354") as proxy, _raw(proxy.port) as s:
        _read_reply(s)
        s.sendall(b"EHLO c\r\n")
        _read_reply(s)
        s.sendall(b"MAIL FROM:<a@example.test>\r\n")
        assert _read_reply(s).startswith(b"250")
        s.sendall(b"RCPT TO:<b@example.test>\r\n")
        assert _read_reply(s).startswith(b"250")
        s.sendall(b"DATA\r\n")
        assert _read_reply(s).startswith(b"354")
        s.sendall(BODY + b".\r\n")
        assert _silent(s)
        assert proxy.records()[0].triggered
    assert upstream.message_count() == 0


def test_proxy_stall_after_final_dot_hides_the_reply(upstream: UpstreamProcess) -> None:
    with FaultProxy(upstream.port, mode="stall", at="final-dot") as proxy, _raw(proxy.port) as s:
        _read_reply(s)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        wait_until(lambda: b"354" in proxy.records()[0].server_bytes, timeout=5, what="354")
        s.settimeout(5)
        while b"354" not in s.recv(65536):
            pass
        s.sendall(BODY + b".\r\n")
        upstream.wait_for_messages(1)  # stored and answered upstream...
        assert _silent(s)  # ...but the answer never comes through


def test_proxy_injects_bytes_after_starttls_ready(tmp_path: Path) -> None:
    with (
        _tls_upstream(tmp_path) as up,
        FaultProxy(up.port, mode="inject_after_starttls") as proxy,
        _raw(proxy.port) as s,
    ):
        _read_reply(s)
        s.sendall(b"EHLO c\r\n")
        _read_reply(s)
        s.sendall(b"STARTTLS\r\n")
        data = b""
        while not data.endswith(b"250 injected\r\n"):
            data += s.recv(65536)
        assert data.startswith(b"220 ")
        assert data.count(b"\r\n") == 2
        assert proxy.records()[0].tls_started


def test_proxy_strips_starttls_from_ehlo(tmp_path: Path) -> None:
    with (
        _tls_upstream(tmp_path) as up,
        FaultProxy(up.port, mode="strip_starttls") as proxy,
    ):
        with _client(up.port) as direct:
            direct.ehlo()
            assert direct.has_extn("starttls")
            direct_features = set(direct.esmtp_features)
        with _client(proxy.port) as client:
            code, _ = client.ehlo()
            assert code == 250
            assert not client.has_extn("starttls")
            assert set(client.esmtp_features) == direct_features - {"starttls"}
        assert b"STARTTLS" not in proxy.records()[0].server_bytes.upper()


def test_proxy_stop_closes_connections_and_the_listener(upstream: UpstreamProcess) -> None:
    proxy = FaultProxy(upstream.port).start()
    port = proxy.port
    with _raw(port) as s:
        assert _read_reply(s).startswith(b"220")
        proxy.stop()
        s.settimeout(5)
        assert s.recv(100) == b""  # FIN, not a reset
    assert not port_accepts("127.0.0.1", port)
    proxy.stop()  # idempotent


def test_proxy_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FaultProxy(25, mode="reset")  # no trigger
    with pytest.raises(ValueError):
        FaultProxy(25, mode="stall", at="sometimes")
    with pytest.raises(ValueError):
        FaultProxy(25, target_host="192.0.2.1")


# -- smtp-sink ---------------------------------------------------------------------------------


def test_smtp_sink_captures_and_counts() -> None:
    with SmtpSink() as sink, _client(sink.port) as client:
        refused = client.sendmail("a@example.test", ["b@example.test", "c@example.test"], BODY)
        assert refused == {}
        client.quit()
        sink.wait_for_counter("quit", 1)
        [message] = sink.messages()
        assert message.mail_from == "a@example.test"
        assert message.rcpt_tos == ("b@example.test", "c@example.test")
        assert message.body == BODY.replace(b"\r\n", b"\n")
        assert sink.counters() == {"sess": 1, "quit": 1, "mesg": 1}


@pytest.mark.parametrize(
    ("options", "command", "expected"),
    [
        ({"disconnect_421": ["MAIL"]}, "mail", 421),
        ({"soft_reject": ["RCPT"]}, "rcpt", 450),
        ({"hard_reject": ["RCPT"]}, "rcpt", 500),
        ({"hard_reject": ["MAIL"]}, "mail", 500),
    ],
)
def test_smtp_sink_scripted_replies(
    options: dict[str, list[str]], command: str, expected: int
) -> None:
    with SmtpSink(**options) as sink, _client(sink.port) as client:  # type: ignore[arg-type]
        client.ehlo()
        if command == "mail":
            code, _ = client.mail("a@example.test")
        else:
            assert client.mail("a@example.test")[0] == 250
            code, _ = client.rcpt("b@example.test")
        assert code == expected


def test_smtp_sink_silent_disconnect() -> None:
    with SmtpSink(disconnect=["DATA"]) as sink, _client(sink.port) as client:
        client.ehlo()
        client.mail("a@example.test")
        client.rcpt("b@example.test")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.data(BODY)
        assert sink.message_count() == 0


def test_smtp_sink_disconnect_after_final_dot_still_captures() -> None:
    with SmtpSink(disconnect=["."]) as sink, _client(sink.port) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("a@example.test", ["b@example.test"], BODY)
        wait_until(lambda: sink.message_count() == 1, timeout=5, what="capture")


def test_smtp_sink_delays_the_reply_to_data() -> None:
    with SmtpSink(data_delay=1) as sink, _client(sink.port) as client:
        client.ehlo()
        client.mail("a@example.test")
        client.rcpt("b@example.test")
        started = time.monotonic()
        client.putcmd("data")
        code, _ = client.getreply()
        assert code == 354
        assert time.monotonic() - started >= 0.9
        client.send(BODY + b".\r\n")
        assert client.getreply()[0] == 250


def test_smtp_sink_stop_frees_the_port() -> None:
    sink = SmtpSink().start()
    port = sink.port
    assert port_accepts("127.0.0.1", port)
    sink.cleanup()
    assert sink.returncode is not None
    assert not port_accepts("127.0.0.1", port)
    assert not sink.dir.exists()


def test_smtp_sink_missing_binary_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtpsink, "SMTP_SINK", Path("/nonexistent/smtp-sink"))
    sink = SmtpSink()
    try:
        with pytest.raises(FileNotFoundError, match="postfix"):
            sink.start()
    finally:
        sink.cleanup()


# -- scripted aiosmtpd upstream ----------------------------------------------------------------


@pytest.mark.parametrize("greeting", ["421 4.3.2 not now", "554 5.3.2 no service"])
def test_upstream_refusing_greeting(tmp_path: Path, greeting: str) -> None:
    with UpstreamProcess(tmp_path / "up", greeting=greeting) as up, _raw(up.port) as s:
        assert _read_reply(s) == greeting.encode() + b"\r\n"
        if greeting.startswith("4"):
            s.settimeout(5)
            assert s.recv(100) == b""  # closed at once
        else:
            s.sendall(b"EHLO c\r\n")
            assert _read_reply(s).startswith(b"503")
            s.sendall(b"QUIT\r\n")
            assert _read_reply(s).startswith(b"221")


def test_upstream_scripted_replies(tmp_path: Path) -> None:
    replies = {
        "RCPT:bad-": "550 5.1.1 no such user",
        "RCPT:bad-but-": "551 5.1.6 moved",
        "DOT": "554 5.6.0 content rejected",
    }
    with UpstreamProcess(tmp_path / "up", replies=replies) as up, _client(up.port) as client:
        client.ehlo()
        client.mail("a@example.test")
        assert client.rcpt("ok@example.test")[0] == 250
        assert client.rcpt("bad-1@example.test") == (550, b"5.1.1 no such user")
        assert client.rcpt("bad-but-x@example.test")[0] == 551  # the longest prefix wins
        assert client.data(BODY)[0] == 554
        assert up.message_count() == 0


@pytest.mark.parametrize(
    ("key", "reply"), [("MAIL", "451 4.3.0 later"), ("DATA", "452 4.3.1 full")]
)
def test_upstream_scripted_mail_and_data_replies(tmp_path: Path, key: str, reply: str) -> None:
    with UpstreamProcess(tmp_path / "up", replies={key: reply}) as up, _client(up.port) as client:
        client.ehlo()
        code, _ = client.mail("a@example.test")
        if key == "MAIL":
            assert code == 451
            return
        assert client.rcpt("b@example.test")[0] == 250
        client.putcmd("data")
        assert client.getreply() == (452, b"4.3.1 full")
        assert up.message_count() == 0


def test_upstream_421_reply_closes_the_connection(tmp_path: Path) -> None:
    with (
        UpstreamProcess(tmp_path / "up", replies={"MAIL": "421 4.3.2 going down"}) as up,
        _raw(up.port) as s,
    ):
        _read_reply(s)
        s.sendall(b"EHLO c\r\n")
        _read_reply(s)
        s.sendall(b"MAIL FROM:<a@example.test>\r\n")
        assert _read_reply(s) == b"421 4.3.2 going down\r\n"
        s.settimeout(5)
        assert s.recv(100) == b""


def test_upstream_hang_at_greeting(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "up", hang_at="greeting") as up, _raw(up.port) as s:
        assert _silent(s)
        wait_until(lambda: up.connection_count() == 1, timeout=5, what="connection recorded")


def test_upstream_hang_at_data_sends_354_then_nothing(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "up", hang_at="data") as up, _raw(up.port) as s:
        _send_up_to_the_final_dot(s)
        assert _silent(s)
        assert up.message_count() == 0


def test_upstream_hang_at_final_stores_but_never_answers(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "up", hang_at="final") as up, _raw(up.port) as s:
        _send_up_to_the_final_dot(s)
        up.wait_for_messages(1)
        assert _silent(s)


def test_upstream_reject_auth_records_each_attempt(tmp_path: Path) -> None:
    with _tls_upstream(tmp_path, auth=("relay", "right"), reject_auth=True) as up:
        with _client(up.port) as client:
            client.ehlo()
            client.starttls(context=_tls_context())
            client.ehlo()
            with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
                client.login("relay", "right")
            assert excinfo.value.smtp_code == 535
        # smtplib tries each mechanism it knows once: every AUTH command is recorded, over
        # TLS, with its mechanism and never its arguments.
        attempts = up.auth_attempts()
        assert attempts and all(conn == 1 and tls for conn, tls, _ in attempts)
        assert {mech for _, _, mech in attempts} <= {"PLAIN", "LOGIN", "CRAM-MD5"}
        assert b"right" not in (up.out / "auth").read_bytes()


def test_upstream_auth_in_clear_is_offered_and_recorded_as_clear(tmp_path: Path) -> None:
    with _tls_upstream(tmp_path, auth=("relay", "secret"), auth_in_clear=True) as up:
        with _client(up.port) as client:
            client.ehlo()
            assert client.has_extn("starttls") and client.has_extn("auth")
            client.login("relay", "secret")
            assert client.sendmail("a@example.test", ["b@example.test"], BODY) == {}
        assert up.auth_attempts()[0][:2] == (1, False)


def test_upstream_cli_documents_and_checks_the_fault_options() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr.decode()
    for option in (b"--greeting", b"--reply", b"--hang-at", b"--reject-auth", b"--auth-in-clear"):
        assert option in result.stdout
    for bad in (["--reply", "HELO=250 ok"], ["--reply", "MAIL=oops"], ["--greeting", "220 hi"]):
        result = run_script("--out", "/nonexistent", *bad)
        assert result.returncode == 2, bad
