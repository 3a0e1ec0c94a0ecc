"""End to end: the real ``twistd`` process, real SMTP clients, a real upstream process."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.net import free_port, port_accepts, wait_until
from tests.support.relay import REPO_ROOT, TWISTD, RelayProcess, relay_config
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e

MAILRELAY = str(Path(sys.executable).with_name("mailrelay"))


def message(subject: str, body: bytes) -> bytes:
    return (
        f"From: app@example.com\r\nTo: user@example.com\r\nSubject: {subject}\r\n\r\n".encode()
        + body
    )


def body_with_dot_at(offset: int) -> bytes:
    """A body whose first line starts with '.', and another line starting at ``offset``."""
    first = b".first line starts with a dot\r\n"
    filler = b""
    while len(first) + len(filler) + 78 <= offset:
        filler += b"x" * 76 + b"\r\n"
    pad = offset - len(first) - len(filler) - 2
    filler += b"y" * pad + b"\r\n"
    body = first + filler + b".line at the boundary\r\n.\r\n..two dots\r\nend\r\n"
    assert body.index(b".line at the boundary") == offset
    return body


def as_relayed(sent: bytes) -> re.Pattern[bytes]:
    """What arrives for ``sent``: its header, the Date: and Message-ID: the relay adds (the
    messages here have neither), the empty line and the body, byte for byte, at the end."""
    head, _, body = sent.partition(b"\r\n\r\n")
    added = rb"Date: [^\r\n]+\r\nMessage-ID: <[0-9A-F]{22}@[^>\r\n]+>\r\n"
    return re.compile(re.escape(head + b"\r\n") + added + re.escape(b"\r\n" + body) + rb"\Z")


def send(port: int, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="tester", timeout=30) as client:
        refused = client.sendmail(sender, recipients, data)
        assert refused == {}


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


def metric(port: int, name: str) -> float:
    _, text = http_get(port, "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def maildir_bodies(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


@pytest.mark.skipif(
    port_accepts("127.0.0.1", 2525) or port_accepts("127.0.0.1", 8025),
    reason="the embedded default's ports 2525/8025 are taken on this machine",
)
def test_embedded_default_captures_mail_into_maildir_byte_for_byte(tmp_path: Path) -> None:
    """The README's first command: no config, mail sent with smtplib lands in ./Maildir."""
    three_recipients = message("three", b"Hello all three.\r\n")
    dots = message("dots", body_with_dot_at(16384))
    big = message("big", (b"z" * 998 + b"\r\n") * 5243)  # about 5 MB
    with RelayProcess(tmp_path) as relay:
        send(
            relay.smtp_port,
            "app@example.com",
            ["a@example.com", "b@example.com", "c@example.com"],
            three_recipients,
        )
        send(relay.smtp_port, "app@example.com", ["a@example.com"], dots)
        send(relay.smtp_port, "app@example.com", ["a@example.com"], big)
        wait_until(
            lambda: (
                (tmp_path / "Maildir" / "new").exists()
                and len(list((tmp_path / "Maildir" / "new").iterdir())) == 3
                # Delivered mail then leaves the spool (journal first, then the file).
                and not list((tmp_path / "spool" / "queue").iterdir())
            ),
            timeout=30,
            what="three messages in the Maildir and an empty spool queue",
        )
        status, health = http_get(relay.http_port, "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"
    stored = maildir_bodies(tmp_path / "Maildir")
    # Each file is our trace headers followed by exactly what the client sent, plus the
    # Date: and Message-ID: fields it lacked.
    for sent in (three_recipients, dots, big):
        matches = [s for s in stored if as_relayed(sent).search(s)]
        assert len(matches) == 1, "a message did not arrive byte for byte"
    (three,) = [s for s in stored if as_relayed(three_recipients).search(s)]
    assert three.count(b"X-Original-To: ") == 3  # one file for the three recipients


def test_thousand_messages_from_ten_clients_reuse_the_pool(tmp_path: Path) -> None:
    """1000 messages from 10 concurrent clients all arrive, over at most pool-size connections."""
    with UpstreamProcess(tmp_path / "upstream") as upstream:
        relay = RelayProcess.with_upstream(tmp_path, upstream.port)
        with relay:
            received_before = metric(relay.http_port, "mailrelay_messages_received_total")

            def client(n: int) -> None:
                with smtplib.SMTP(
                    "127.0.0.1", relay.smtp_port, local_hostname="tester", timeout=30
                ) as c:
                    for i in range(100):
                        c.sendmail(
                            "app@example.com",
                            [f"user{n}@example.com"],
                            message(f"{n}-{i}", b"body\r\n"),
                        )

            with ThreadPoolExecutor(10) as pool:
                list(pool.map(client, range(10)))
            messages = upstream.wait_for_messages(1000, timeout=60)
            assert (
                metric(relay.http_port, "mailrelay_messages_received_total")
                == received_before + 1000
            )
            wait_until(
                lambda: metric(relay.http_port, "mailrelay_messages_delivered_total") == 1000,
                timeout=20,
                what="delivered counter at 1000",
            )
    subjects = {m["body"].split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in messages}
    assert len(messages) == 1000 and len(subjects) == 1000  # each exactly once
    assert upstream.connection_count() <= 4  # the default pool size


def test_accepted_message_survives_sigkill_while_upstream_is_down(tmp_path: Path) -> None:
    """250 given, relay SIGKILLed, restarted, upstream started later: the message arrives."""
    upstream_port = free_port()
    relay = RelayProcess.with_upstream(tmp_path, upstream_port, retry_initial=0.2, retry_max=0.5)
    relay.start()
    try:
        send(
            relay.smtp_port,
            "app@example.com",
            ["user@example.com"],
            message("survivor", b"keep me\r\n"),
        )
        relay.kill()
        assert len(list((tmp_path / "spool" / "queue").iterdir())) >= 1
        relay.start()
        with UpstreamProcess(tmp_path / "upstream", port=upstream_port) as upstream:
            (arrived,) = upstream.wait_for_messages(1, timeout=30)
            assert as_relayed(message("survivor", b"keep me\r\n")).search(arrived["body"])
            assert arrived["rcpt_tos"] == ["user@example.com"]
    finally:
        relay.stop()


def test_health_metrics_and_methods(tmp_path: Path) -> None:
    """/health is JSON, /metrics is Prometheus text, POST gets 405, unknown paths 404."""
    with RelayProcess.with_upstream(tmp_path, None) as relay:
        status, body = http_get(relay.http_port, "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and "uptime_seconds" in health
        assert health["queue"]["queued"] == 0
        assert health["providers"][0]["breaker"] == "closed"
        _, text = http_get(relay.http_port, "/metrics")
        assert b"# TYPE mailrelay_messages_received_total counter" in text
        request = urllib.request.Request(f"http://127.0.0.1:{relay.http_port}/health", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as posted:
            urllib.request.urlopen(request, timeout=10)
        assert posted.value.code == 405
        with pytest.raises(urllib.error.HTTPError) as missing:
            http_get(relay.http_port, "/nope")
        assert missing.value.code == 404


def test_relay_tac_serves_with_config_from_environment(tmp_path: Path) -> None:
    """``twistd -ny relay.tac`` reads MAILRELAY_CONFIG and serves SMTP."""
    smtp_port, http_port = free_port(), free_port()
    config = relay_config(tmp_path / "spool", smtp_port, http_port, None)
    relay = RelayProcess(tmp_path, config, smtp_port, http_port, use_tac=True)
    with relay, smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="tester", timeout=10) as c:
        code, _ = c.noop()
        assert code == 250


def test_twistd_help_lists_the_config_option() -> None:
    result = subprocess.run(
        [TWISTD, "mailrelay", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "--config" in result.stdout


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("[smtp]\nlisten = 25\n", "smtp.listen: must be an endpoint string"),
        (
            "[[providers]]\nname = 'p'\nhost = '127.0.0.1'\nport = 'x'\n",
            "providers[0].port: must be an integer",
        ),
        ("[routing]\ndefault = ['nope']\n", "routing.default[0]: no provider named 'nope'"),
        ("[smtp]\nlisten = ['tcp:2525']\n", "smtp.listen[0]: listens on 0.0.0.0"),
        ("[bogus]\n", "bogus: unknown key"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_and_nonzero(tmp_path: Path, config: str, expected: str) -> None:
    """twistd with a bad config: one line naming the key, non-zero exit, no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text(config)
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailrelay", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if "config error" in line]) == 1


def test_check_config_prints_effective_config_and_rejects_bad_ones(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        "[[providers]]\nname = 'ses'\nhost = 'email-smtp.example.com'\nport = 587\n"
        "username = 'AKIA'\npassword_env = 'MAILRELAY_TEST_UNSET_SECRET'\n"
    )
    ok = subprocess.run(
        [MAILRELAY, "check-config", str(good)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert 'default = ["ses"]' in ok.stdout
    assert "# NOT SET in this environment" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool]\nretry_initial = -1\n")
    result = subprocess.run(
        [MAILRELAY, "check-config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    assert (
        result.stderr.strip()
        == "mailrelay: config error: spool.retry_initial: must be greater than 0"
    )
    unknown = subprocess.run([MAILRELAY, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 64 and "Traceback" not in unknown.stderr


def test_readme_config_is_valid() -> None:
    """The config shown in the README parses as written."""
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("```toml\n") + len("```toml\n")
    text = readme[start : readme.index("```", start)]
    import tomllib

    from mailrelay.config import parse

    config = parse(tomllib.loads(text))
    assert config.routing.default == ("primary",)
    assert config.provider("primary").port == 2600
