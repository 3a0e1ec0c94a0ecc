"""smtp.processes = 2, end to end on the real twistd process: an acceptor process accepts mail
on the relay's own listening socket (even while the relay process is frozen), every message
is delivered exactly once whichever process took it, /metrics counts mail both took, a killed
acceptor is restarted, and a stopped relay leaves no acceptor behind."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import free_port, http_get, wait_until
from tests.support.rawsmtp import RawSMTP
from tests.support.relay import RelayProcess, relay_config
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e

THREADS = 6
PER_THREAD = 10
SENDER = "app@example.com"
RECIPIENT = "rcpt@example.com"


def metric(port: int, name: str) -> float | None:
    """One unlabelled sample of /metrics; also checks that no family is exposed twice."""
    _, text = http_get(port, "/metrics")
    families = list(text_string_to_metric_families(text.decode()))
    names = [f.name for f in families]
    assert [n for n, c in Counter(names).items() if c > 1] == []
    for family in families:
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def events(relay: RelayProcess) -> list[dict[str, Any]]:
    """The relay's JSON log so far (a line still being written is skipped)."""
    found = []
    try:
        text = relay.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def acceptor_pids(relay: RelayProcess) -> list[int]:
    """Pids from "acceptor 1 started (pid N)", in order."""
    return [
        int(e["pid"])
        for e in events(relay)
        if str(e.get("message", "")).startswith("acceptor 1 started") and e.get("pid")
    ]


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])  # a zombie is gone for us


def alive(pid: int) -> bool:
    return parent_of(pid) is not None


def acceptors_of(spool: Path) -> list[int]:
    """Every live acceptor process working on this spool (its settings name the spool)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ours = b"mailrelay.acceptors" in cmdline and str(spool).encode() in cmdline
        if ours and alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def message(tag: str) -> bytes:
    return (
        # With Date and Message-ID the relay adds nothing but its Received header on top.
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {tag}\r\n"
        f"Date: Fri, 27 Nov 2026 13:57:12 +0000\r\nMessage-ID: <{tag}@example.com>\r\n\r\n"
        f"body of {tag}\r\n.a line starting with a dot\r\n\r\nend {tag}\r\n"
    ).encode()


def send(port: int, tags: list[str]) -> None:
    """One SMTP connection, every tag's message over it."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="tester", timeout=20) as client:
        for tag in tags:
            assert client.sendmail(SENDER, [RECIPIENT], message(tag)) == {}


def delivered(upstream: UpstreamProcess) -> Counter[str]:
    """Subject tag -> times it arrived upstream, each checked intact."""
    seen: Counter[str] = Counter()
    for m in upstream.messages():
        body: bytes = m["body"]
        subject = [line for line in body.split(b"\r\n") if line.startswith(b"Subject: ")]
        tag = subject[0][len(b"Subject: ") :].decode()
        # The relay prepends its Received header; the rest is the message as sent.
        assert body.startswith(b"Received: ") and body.endswith(message(tag)), body
        assert m["mail_from"] == SENDER and m["rcpt_tos"] == [RECIPIENT]
        seen[tag] += 1
    return seen


def sent_by_the_acceptor_alone(relay: RelayProcess, tag: str) -> None:
    """Freeze the relay process: only an acceptor can take the connection and answer 250.
    The relay process then delivers it once it runs again."""
    assert relay._proc is not None
    relay._proc.send_signal(signal.SIGSTOP)
    try:
        send(relay.smtp_port, [tag])
    finally:
        relay._proc.send_signal(signal.SIGCONT)


def test_acceptor_process_accepts_is_restarted_and_stops_with_the_relay(tmp_path: Path) -> None:
    with UpstreamProcess(tmp_path / "upstream") as upstream:
        smtp_port, http_port = free_port(), free_port()
        spool = tmp_path / "spool"
        text = relay_config(spool, smtp_port, http_port, upstream.port, {"processes": 2})
        relay = RelayProcess(
            tmp_path, text, smtp_port, http_port, extra_args=("--log-format", "json")
        )
        with relay:
            assert relay._proc is not None
            relay_pid = relay._proc.pid
            wait_until(lambda: acceptor_pids(relay), 10, what="acceptor 1 started")
            [first] = acceptor_pids(relay)
            assert parent_of(first) == relay_pid
            assert acceptors_of(spool) == [first]

            # (a) The acceptor alone takes mail; then 60 over 6 connections at once.
            sent_by_the_acceptor_alone(relay, "solo-0")
            tags = [[f"t{t}-m{m}" for m in range(PER_THREAD)] for t in range(THREADS)]
            with ThreadPoolExecutor(THREADS) as pool:
                for future in [pool.submit(send, smtp_port, batch) for batch in tags]:
                    future.result()
            total = 1 + THREADS * PER_THREAD
            upstream.wait_for_messages(total, timeout=20)
            expected = {"solo-0": 1} | {tag: 1 for batch in tags for tag in batch}
            wait_until(lambda: delivered(upstream) == expected, 5, what="all delivered once")
            # Acceptors' snapshots come every second: the sum includes the acceptor's mail.
            wait_until(
                lambda: metric(http_port, "mailrelay_messages_received_total") == total,
                10,
                what=f"mailrelay_messages_received_total == {total}",
            )
            received = [e for e in events(relay) if e.get("event") == "received"]
            assert len(received) == total
            from_acceptor = [e for e in received if e.get("acceptor") == 1]
            assert from_acceptor, "no received line came from the acceptor"

            # (b) SIGKILL the acceptor in the middle of a large message (spilled to tmp/): it is
            # restarted, on the same listening socket, and its partial file is removed.
            relay._proc.send_signal(signal.SIGSTOP)
            try:
                cut = RawSMTP(smtp_port)  # only the acceptor can take it and answer
                assert cut.code().startswith("220")
                cut.send(b"EHLO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<r@example.com>\r\n")
                cut.send(b"DATA\r\n")
                assert cut.reply()[-1].startswith("250")
                assert cut.codes(3) == ["250 2.1.0", "250 2.1.5", "354"]
                cut.send(b"Subject: cut short\r\n\r\n" + b"x" * 998 + b"\r\n")
                cut.send((b"y" * 998 + b"\r\n") * 600)  # ~600 KB: past SPILL_SIZE
                wait_until(lambda: list((spool / "tmp").iterdir()), 10, what="a file in tmp/")
            finally:
                relay._proc.send_signal(signal.SIGCONT)
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: not list((spool / "tmp").iterdir()), 10, what="tmp/ cleared")
            cut.sock.close()
            wait_until(
                lambda: any(
                    str(e.get("message", "")).startswith("acceptor 1 exited") for e in events(relay)
                ),
                10,
                what="acceptor 1 exited",
            )
            wait_until(lambda: len(acceptor_pids(relay)) == 2, 10, what="a new acceptor 1")
            second = acceptor_pids(relay)[1]
            assert second != first and not alive(first)
            assert parent_of(second) == relay_pid
            assert acceptors_of(spool) == [second]
            sent_by_the_acceptor_alone(relay, "solo-1")
            send(smtp_port, ["after-kill"])
            upstream.wait_for_messages(total + 2, timeout=20)
            expected |= {"solo-1": 1, "after-kill": 1}
            wait_until(lambda: delivered(upstream) == expected, 5, what="all delivered once")
            status, body = http_get(http_port, "/health")
            assert status == 200, body
            assert metric(http_port, "mailrelay_acceptor_restarts_total") == 1
            # The killed acceptor's count stays: the counter never goes backwards.
            wait_until(
                lambda: metric(http_port, "mailrelay_messages_received_total") == total + 2,
                10,
                what=f"mailrelay_messages_received_total == {total + 2}",
            )

            # A SIGTERM of its own (say, to the whole process group) is the relay's to act on:
            # the acceptor stays and keeps accepting (review: it died during the drain time).
            os.kill(second, signal.SIGTERM)
            sent_by_the_acceptor_alone(relay, "after-term")
            assert alive(second) and acceptor_pids(relay) == [first, second]
            upstream.wait_for_messages(total + 3, timeout=20)

            # (c) SIGTERM the relay: it exits cleanly and takes its acceptor with it.
            relay._proc.send_signal(signal.SIGTERM)
            # twistd ends a clean stop by re-raising the signal it got.
            assert relay._proc.wait(timeout=20) in (0, -signal.SIGTERM), relay.log_tail()
            wait_until(lambda: not alive(second), 5, what=f"acceptor {second} gone")
            assert acceptors_of(spool) == []
            # It stopped on its SIGTERM, cleanly: neither killed nor failing.
            stops = [
                e["message"]
                for e in events(relay)
                if str(e.get("message", "")).startswith(("acceptor 1 stopped", "acceptor 1 still"))
            ]
            assert stops == []
        assert "Server Shut Down." in relay.log_path.read_text()


def test_a_unix_listener_keeps_its_mode_and_its_file_with_acceptors(tmp_path: Path) -> None:
    """Acceptors share TCP listeners only: Twisted's UNIX port, adopted, made a mode=600
    socket 666, and unlinked it when the acceptor exited (review)."""
    smtp_port, http_port = free_port(), free_port()
    sock = tmp_path / "smtp.sock"
    text = relay_config(tmp_path / "spool", smtp_port, http_port, None, {"processes": 2})
    text = text.replace(
        f'listen = ["tcp:{smtp_port}:interface=127.0.0.1"]',
        f'listen = ["tcp:{smtp_port}:interface=127.0.0.1", "unix:{sock}:mode=600"]',
    )
    relay = RelayProcess(tmp_path, text, smtp_port, http_port, extra_args=("--log-format", "json"))
    with relay:
        wait_until(lambda: acceptor_pids(relay), 10, what="acceptor 1 started")
        [first] = acceptor_pids(relay)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(acceptor_pids(relay)) == 2, 10, what="a new acceptor 1")
        wait_until(lambda: alive(acceptor_pids(relay)[1]), 5, what="the new acceptor running")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(sock))
            assert client.recv(100).startswith(b"220 ")
