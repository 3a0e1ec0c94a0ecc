"""Tests for the upstream test server itself (tests/support/upstream.py).

Other integration and e2e tests trust what it stores byte for byte, so check that here with a
client we did not write: smtplib.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import wait_until
from tests.support.upstream import TRY_LATER, UpstreamProcess, run_script

pytestmark = pytest.mark.integration

SIXTY_MB = 60 * 1024 * 1024


def _client(upstream: UpstreamProcess) -> smtplib.SMTP:
    # local_hostname avoids smtplib's socket.getfqdn() (a DNS lookup) on EHLO.
    return smtplib.SMTP(upstream.host, upstream.port, local_hostname="client.localhost", timeout=10)


def _send(client: smtplib.SMTP, data: bytes, rcpts: list[str] | None = None) -> None:
    refused = client.sendmail("from@example.test", rcpts or ["to@example.test"], data)
    assert refused == {}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[UpstreamProcess]:
    with UpstreamProcess(tmp_path / "upstream") as proc:
        yield proc


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(
            # First body line starts with ".", then a line that is only ".", then "..".
            # smtplib doubles each leading dot on the wire; the server must undo exactly that.
            b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..\r\nlast\r\n",
            b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..\r\nlast\r\n",
            id="dot-lines",
        ),
        pytest.param(
            b".first line of DATA\r\n\r\nbody\r\n",
            b".first line of DATA\r\n\r\nbody\r\n",
            id="dot-first-line",
        ),
        pytest.param(
            # smtplib adds the missing final CRLF before the terminating ".".
            b"Subject: no eol\r\n\r\n.\r\nend",
            b"Subject: no eol\r\n\r\n.\r\nend\r\n",
            id="no-final-crlf",
        ),
        pytest.param(
            # No line-ending normalisation: bare LF and bare CR are stored as sent.
            b"Subject: eol\r\n\r\nbare\nlf\rcr\r\n",
            b"Subject: eol\r\n\r\nbare\nlf\rcr\r\n",
            id="bare-lf-cr-untouched",
        ),
        pytest.param(
            "Subject: 8bit\r\n\r\nh\u00e9 \u2713\r\n".encode(),
            "Subject: 8bit\r\n\r\nh\u00e9 \u2713\r\n".encode(),
            id="8bit",
        ),
    ],
)
def test_stores_data_as_sent(upstream: UpstreamProcess, sent: bytes, expected: bytes) -> None:
    with _client(upstream) as client:
        _send(client, sent)
    [message] = upstream.wait_for_messages(1)
    assert message["body"] == expected
    assert message["size"] == len(expected)
    assert message["mail_from"] == "from@example.test"
    assert message["rcpt_tos"] == ["to@example.test"]


def test_dot_after_bare_lf_is_not_unstuffed(upstream: UpstreamProcess) -> None:
    # Documents a disagreement, not a wish: smtplib doubles a dot after a bare LF, aiosmtpd
    # only unstuffs dots after CRLF. Byte-comparing tests must avoid "\n." in their data.
    with _client(upstream) as client:
        _send(client, b"Subject: lf-dot\r\n\r\na\n.b\r\n")
    [message] = upstream.wait_for_messages(1)
    assert message["body"] == b"Subject: lf-dot\r\n\r\na\n..b\r\n"


def test_ehlo_advertises_pipelining_8bitmime_and_size(upstream: UpstreamProcess) -> None:
    with _client(upstream) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("pipelining")
        assert client.has_extn("8bitmime")
        assert int(client.esmtp_features["size"]) >= SIXTY_MB


def test_messages_over_one_connection_count_once(upstream: UpstreamProcess) -> None:
    with _client(upstream) as client:
        for i in range(3):
            _send(client, f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode())
    messages = upstream.wait_for_messages(3)
    assert [m["body"] for m in messages] == [
        f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode() for i in range(3)
    ]
    assert [m["connection"] for m in messages] == [1, 1, 1]
    assert upstream.connection_count() == 1


def test_concurrent_connections_count_separately(upstream: UpstreamProcess) -> None:
    with _client(upstream) as first, _client(upstream) as second:
        # Both are connected (smtplib read the 220 greeting) before either sends anything.
        wait_until(lambda: upstream.connection_count() == 2, timeout=5, what="2 connections")
        _send(second, b"Subject: second\r\n\r\n2\r\n")
        _send(first, b"Subject: first\r\n\r\n1\r\n")
    messages = upstream.wait_for_messages(2)
    serial_by_subject = {m["body"].split(b"\r\n", 1)[0]: m["connection"] for m in messages}
    assert serial_by_subject == {b"Subject: first": 1, b"Subject: second": 2}
    assert upstream.connection_count() == 2


def test_rcpt_prefix_gets_4xx(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "up", rcpt_4xx_prefix="later-") as upstream:
        with _client(upstream) as client:
            refused = client.sendmail(
                "from@example.test",
                ["ok@example.test", "later-1@example.test"],
                b"Subject: partial\r\n\r\nx\r\n",
            )
            assert refused == {"later-1@example.test": (451, TRY_LATER[4:].encode())}
            # When every recipient is refused there is no DATA and nothing is stored.
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("from@example.test", ["later-2@example.test"], b"\r\n")
        [message] = upstream.wait_for_messages(1)
        assert message["rcpt_tos"] == ["ok@example.test"]


def test_every_nth_data_gets_4xx(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "up", data_4xx_every=2) as upstream:
        with _client(upstream) as client:
            _send(client, b"Subject: 1\r\n\r\n1\r\n")
            with pytest.raises(smtplib.SMTPDataError) as excinfo:
                client.sendmail("from@example.test", ["to@example.test"], b"Subject: 2\r\n\r\n")
            assert excinfo.value.smtp_code == 451
            _send(client, b"Subject: 3\r\n\r\n3\r\n")
        messages = upstream.wait_for_messages(2)
        assert [m["body"].split(b"\r\n", 1)[0] for m in messages] == [
            b"Subject: 1",
            b"Subject: 3",
        ]


def test_stop_is_clean_with_a_client_connected(upstream: UpstreamProcess) -> None:
    with _client(upstream) as client:
        client.noop()
        assert upstream.stop() == 0


def test_script_form_imports() -> None:
    # `python tests/support/upstream.py` runs without `tests` on sys.path.
    result = run_script("--help")
    assert result.returncode == 0, result.stderr.decode()
    assert b"--reply-data-4xx-every" in result.stdout
