"""End to end: ``mailrelay-sendmail`` (the installed script) hands a message to a running
``twistd`` through the maildrop and pokes it over the control socket; with the daemon down,
the message waits in the maildrop and goes out when the daemon starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailrelay.spool.store import is_queue_id
from tests.support.net import wait_until
from tests.support.relay import RelayProcess
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e

SENDMAIL = str(Path(sys.executable).with_name("mailrelay-sendmail"))
# MaildropPickup's polling interval in the daemon (service.py uses the default): a message
# that arrives well within it was picked up because sendmail asked, not by the polling.
POLL_INTERVAL = 5.0


def sendmail(config: Path, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MAILRELAY_CONFIG": str(config)}
    return subprocess.run([SENDMAIL, *args], input=stdin, capture_output=True, env=env, timeout=60)


def php_mail(tag: str) -> bytes:
    """What PHP's mail() pipes into ``sendmail -t -i``: LF line endings, Bcc in the header."""
    return (
        f"To: To Person <to-{tag}@example.com>\n"
        f"Cc: cc-{tag}@example.com\n"
        f"Bcc: hidden-{tag}@example.com\n"
        f"Subject: {tag}\n"
        "\n"
        f"body of {tag}\n"
        ".a line starting with a dot\n"
    ).encode()


def maildrop_names(spool: Path) -> list[str]:
    try:
        return sorted(os.listdir(spool / "maildrop"))
    except FileNotFoundError:
        return []


def test_sendmail_to_a_running_daemon_is_delivered_at_once_without_bcc(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "upstream") as upstream:
        relay = RelayProcess.with_upstream(tmp_path, upstream.port)
        assert relay.config_path is not None
        spool = tmp_path / "spool"
        with relay:
            started = time.monotonic()
            result = sendmail(
                relay.config_path, "-t", "-i", "-f", "app@example.com", stdin=php_mail("now")
            )
            assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
            (message,) = upstream.wait_for_messages(1, timeout=POLL_INTERVAL - 1)
            elapsed = time.monotonic() - started
            assert maildrop_names(spool) == []
            log = relay.log_path.read_text(errors="replace")
    assert elapsed < POLL_INTERVAL
    # The daemon was told over its control socket, and answered.
    assert re.search(r"control: pickup\s+-> ok", log)
    assert "picked up from maildrop: from=<app@example.com> recipients=3" in log
    assert message["mail_from"] == "app@example.com"
    assert message["rcpt_tos"] == [
        "to-now@example.com",
        "cc-now@example.com",
        "hidden-now@example.com",
    ]
    body: bytes = message["body"]
    assert b"bcc" not in body.lower() and b"hidden-now" not in body
    assert b"\r\nSubject: now\r\n" in body
    assert b"\r\nTo: To Person <to-now@example.com>\r\n" in body
    assert body.endswith(b"\r\n\r\nbody of now\r\n.a line starting with a dot\r\n")
    assert body.startswith(b"Received: ")  # the relay's own, on top of sendmail's


def test_sendmail_while_the_daemon_is_down_waits_in_the_maildrop(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "upstream") as upstream:
        relay = RelayProcess.with_upstream(tmp_path, upstream.port)
        assert relay.config_path is not None
        spool = tmp_path / "spool"
        relay.start()  # creates the spool and its maildrop
        relay.stop()
        assert not (spool / "control.sock").exists()

        result = sendmail(
            relay.config_path, "-t", "-i", "-f", "app@example.com", stdin=php_mail("later")
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
        (name,) = maildrop_names(spool)
        assert is_queue_id(name)
        assert upstream.message_count() == 0

        with relay:
            (message,) = upstream.wait_for_messages(1, timeout=15)
            assert maildrop_names(spool) == []
            wait_until(
                lambda: not (spool / "queue" / name).exists(),
                timeout=10,
                what="the delivered message removed from the queue",
            )
    assert message["rcpt_tos"] == [
        "to-later@example.com",
        "cc-later@example.com",
        "hidden-later@example.com",
    ]
    assert b"hidden-later" not in message["body"]
    assert f"{name} picked up from maildrop".encode() in relay.log_path.read_bytes()
