"""End to end: the installed ``mailrelay queue`` command against a running ``twistd`` (over
its control socket) and on the spool of a stopped one (under the spool's lock)."""

from __future__ import annotations

import json
import os
import re
import smtplib
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mailrelay.blocking import InlineRunner
from mailrelay.cli import control_client
from mailrelay.spool.format import Envelope, Outcome, Status, encode_message, read_journal
from mailrelay.spool.store import FAILED, JOURNAL_SUFFIX, QUEUE, Spool, SpoolLock, new_queue_id
from tests.support.net import free_port, wait_until
from tests.support.relay import RelayProcess
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e

MAILRELAY = str(Path(sys.executable).with_name("mailrelay"))
DEFAULT_RETRY = 300.0  # spool.retry_initial: no retry on its own during a test


def send(port: int, tag: str) -> str:
    """One message through the relay's SMTP port; returns its queue ID from the 250 reply."""
    data = f"From: app@example.com\r\nTo: {tag}@example.com\r\nSubject: {tag}\r\n\r\n{tag}\r\n"
    with smtplib.SMTP("127.0.0.1", port, local_hostname="tester", timeout=30) as client:
        client.ehlo()
        assert client.mail("app@example.com")[0] == 250
        assert client.rcpt(f"{tag}@example.com")[0] == 250
        code, reply = client.data(data.encode())
    assert code == 250, reply
    match = re.search(rb"queued as ([0-9A-F]{22})", reply)
    assert match is not None, reply
    return match.group(1).decode()


class Cli:
    def __init__(self, config: Path) -> None:
        self.config = config

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [MAILRELAY, "--config", str(self.config), "queue", *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert "Traceback" not in result.stderr
        return result

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert (result.returncode, result.stderr) == (0, ""), result
        return result.stdout

    def entries(self) -> dict[str, dict[str, Any]]:
        return {e["queue_id"]: e for e in json.loads(self.ok("list", "--json"))}


def deferrals(spool: Path, queue_id: str, area: str = "queue") -> int:
    """How many deferred outcomes the message's journal records (one per attempt here)."""
    path = spool / area / (queue_id + JOURNAL_SUFFIX)
    try:
        outcomes = read_journal(path.read_bytes()).outcomes
    except FileNotFoundError:
        return 0
    return sum(1 for o in outcomes if o.status is Status.DEFERRED)


def wait_for_attempts(spool: Path, ids: list[str], count: int, timeout: float = 15.0) -> None:
    wait_until(
        lambda: all(deferrals(spool, i) >= count for i in ids),
        timeout=timeout,
        what=f"{count} deferred attempt(s) of {ids} in their journals",
    )


def states(spool: Path) -> dict[str, str]:
    """The daemon's listing, asked in process (cheap enough to poll; the CLI is checked
    separately)."""
    reply = control_client.request(spool / "control.sock", {"command": "list"}, 10.0)
    assert reply["ok"] is True, reply
    return {e["queue_id"]: e["state"] for e in reply["result"]}


def log_has(relay: RelayProcess, text: str) -> bool:
    try:
        return text in relay.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return False


def test_queue_commands_against_a_running_daemon(tmp_path: Path) -> None:
    """list/show/hold/release/delete/flush/retry through the control socket: the daemon acts
    at once (a released or flushed message is tried again) and its index stays in step."""
    refusing = free_port()  # nothing listens there: every attempt is deferred
    relay = RelayProcess.with_upstream(tmp_path, refusing)
    spool = tmp_path / "spool"
    assert relay.config_path is not None
    cli = Cli(relay.config_path)
    with relay:
        socket_mode = stat.S_IMODE(os.stat(spool / "control.sock").st_mode)
        assert socket_mode == 0o600
        m1, m2, m3 = (send(relay.smtp_port, tag) for tag in ("m1", "m2", "m3"))
        wait_for_attempts(spool, [m1, m2, m3], 1)
        wait_until(
            lambda: set(states(spool).values()) == {"deferred"},
            timeout=10,
            what="three deferred messages in the listing",
        )

        # list: the human table and the JSON agree on everything.
        entries = cli.entries()
        assert sorted(entries) == sorted([m1, m2, m3])
        for entry in entries.values():
            assert entry["last_error"].startswith("provider primary unavailable (connect:")
            assert entry["sender"] == "app@example.com"
            assert (entry["recipients"], entry["pending"]) == (1, 1)
            delay = entry["next_attempt"] - entry["received_at"]
            assert DEFAULT_RETRY * 0.8 < delay < DEFAULT_RETRY * 1.2
        table = cli.ok("list")
        assert table.splitlines()[-1] == "-- 3 message(s): 3 deferred"
        for queue_id in (m1, m2, m3):
            (row,) = [line for line in table.splitlines() if line.startswith(queue_id)]
            assert row.split()[1] == "deferred" and row.endswith("<app@example.com>")
        assert table.count("last error: provider primary unavailable (connect:") == 3

        # show
        shown = json.loads(cli.ok("show", m1, "--json"))
        assert shown["state"] == "deferred"
        assert shown["recipient_status"] == {"m1@example.com": "deferred"}
        assert shown["helo"] == "tester"
        assert [h["status"] for h in shown["history"]] == ["deferred"]
        human = cli.ok("show", m1)
        assert human.splitlines()[0] == f"queue id:     {m1}"
        assert "  <m1@example.com>  deferred" in human.splitlines()

        # hold: out of the queue, into hold/, shown as held.
        assert cli.ok("hold", m1) == f"{m1}: held\n"
        assert (spool / "hold" / m1).is_file() and not (spool / "queue" / m1).exists()
        assert states(spool)[m1] == "held"
        assert cli.run("hold", m1).returncode == 1  # already held: wrong state

        # release: back in the queue and tried again at once.
        assert cli.ok("release", m1) == f"{m1}: released\n"
        assert (spool / "queue" / m1).is_file() and not (spool / "hold" / m1).exists()
        wait_for_attempts(spool, [m1], 2)

        # delete: gone from the disk and from the daemon's index.
        assert cli.ok("delete", m2) == f"{m2}: deleted\n"
        assert not (spool / "queue" / m2).exists()
        assert not (spool / "queue" / (m2 + JOURNAL_SUFFIX)).exists()
        assert m2 not in states(spool)
        assert cli.run("show", m2).returncode == 1  # unknown ID

        # flush: every deferred message is tried again now.
        wait_until(lambda: cli.entries()[m1]["state"] == "deferred", timeout=10, what="m1 deferred")
        assert cli.ok("flush") == "2 deferred message(s) due now\n"
        wait_for_attempts(spool, [m1], 3)
        wait_for_attempts(spool, [m3], 2)
        assert log_has(relay, "flush: 2 deferred message(s) due now")

        # retry: one message now.
        wait_until(lambda: cli.entries()[m3]["state"] == "deferred", timeout=10, what="m3 deferred")
        assert cli.ok("retry", m3) == f"{m3}: scheduled\n"
        wait_for_attempts(spool, [m3], 3)
        assert deferrals(spool, m1) == 3  # only m3 was retried

        for line in (
            f"control: hold {m1} -> ok",
            f"control: release {m1} -> ok",
            f"control: delete {m2} -> ok",
            f"control: hold {m1} -> wrong-state",
            f"control: show {m2} -> unknown-id",
        ):
            assert log_has(relay, line), line
    assert not (spool / "control.sock").exists()  # removed by the daemon at stop


def test_offline_commands_on_a_stopped_daemons_spool_take_effect_at_its_next_start(
    tmp_path: Path,
) -> None:
    """Held offline stays held when the daemon starts; released or flushed offline is
    delivered at once when it starts."""
    upstream_port = free_port()
    relay = RelayProcess.with_upstream(tmp_path, upstream_port)
    spool = tmp_path / "spool"
    assert relay.config_path is not None
    cli = Cli(relay.config_path)
    with relay:
        m1, m2, m3 = (send(relay.smtp_port, tag) for tag in ("m1", "m2", "m3"))
        wait_for_attempts(spool, [m1, m2, m3], 1)
    assert not (spool / "control.sock").exists()

    # The daemon is down: the commands work on the files, under the lock.
    entries = cli.entries()
    assert {i: e["state"] for i, e in entries.items()} == {
        m1: "deferred",
        m2: "deferred",
        m3: "deferred",
    }
    assert cli.ok("hold", m1) == f"{m1}: held\n"
    assert cli.ok("hold", m2) == f"{m2}: held\n"
    assert cli.ok("release", m2) == f"{m2}: released (delivered when the daemon runs)\n"
    assert cli.ok("flush") == "1 deferred message(s) due now\n"
    assert cli.ok("list").splitlines()[-1] == "-- 3 message(s): 1 held, 2 ready"
    assert not (spool / "control.sock").exists()

    with UpstreamProcess(tmp_path / "upstream", port=upstream_port) as upstream:
        relay.start()
        try:
            arrived = upstream.wait_for_messages(2, timeout=15)
            assert sorted(m["rcpt_tos"][0] for m in arrived) == [
                "m2@example.com",
                "m3@example.com",
            ]
            wait_until(
                lambda: not (spool / "queue" / m2).exists() and not (spool / "queue" / m3).exists(),
                timeout=10,
                what="m2 and m3 removed from the queue after delivery",
            )
            # The daemon indexed m1 as held: it was not tried, and it is listed as held.
            assert {i: e["state"] for i, e in cli.entries().items()} == {m1: "held"}
            assert (spool / "hold" / m1).is_file()
            assert upstream.message_count() == 2
            # Released through the daemon, it goes at once.
            assert cli.ok("release", m1) == f"{m1}: released\n"
            (*_, last) = upstream.wait_for_messages(3, timeout=15)
            assert last["rcpt_tos"] == ["m1@example.com"]
        finally:
            relay.stop()


def test_a_locked_spool_is_refused_with_75(tmp_path: Path) -> None:
    """Another process holds the spool's lock (a daemon starting, another queue command)."""
    spool = tmp_path / "spool"
    (spool / "queue").mkdir(parents=True)
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{spool}"\nmin_free_space = 0\n')
    cli = Cli(config)
    lock = SpoolLock(spool, "mailrelay daemon")
    try:
        for args in (("list",), ("hold", "0" * 22)):
            result = cli.run(*args)
            assert result.returncode == 75 and result.stdout == ""
            assert result.stderr == (
                f"mailrelay: spool {spool} is in use by another process (pid {os.getpid()},"
                " mailrelay daemon); a daemon starting or stopping? try again in a moment\n"
            )
    finally:
        lock.release()
    assert cli.ok("list").splitlines()[-1] == "-- 0 message(s)"


def test_retry_of_dead_letters_against_a_running_daemon(tmp_path: Path) -> None:
    """retry ID / --failed / --all with the daemon running: dead letters go back to queue/ and
    are tried at once (only the recipient that failed), deferred mail is due now."""
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, InlineRunner())
    spool.prepare()
    now = time.time()
    dead = []
    for n in range(3):
        envelope = Envelope(
            new_queue_id(now - 100 + n), "app@example.com", ("a@example.com", "b@example.com"),
            now - 100, "127.0.0.1", "app",
        )  # fmt: skip
        spool.write_durably(envelope, encode(envelope))
        spool.append_journal_now(
            envelope.queue_id,
            [
                Outcome("a@example.com", Status.DELIVERED, "250 ok", "primary", now - 90),
                Outcome("b@example.com", Status.FAILED, "550 5.1.1 unknown", "primary", now - 90),
            ],
        )
        spool.move_now(envelope.queue_id, QUEUE, FAILED)
        dead.append(envelope.queue_id)
    refusing = free_port()
    relay = RelayProcess.with_upstream(tmp_path, refusing)
    assert relay.config_path is not None
    cli = Cli(relay.config_path)
    with relay:
        assert cli.ok("retry", dead[0]) == f"{dead[0]}: requeued\n"
        wait_for_attempts(spool_dir, [dead[0]], 1)
        assert cli.ok("retry", "--failed") == "2 dead letter(s) requeued\n"
        wait_for_attempts(spool_dir, dead, 1)
        for queue_id in dead:
            # Only b, which had failed, was tried again; a stays delivered.
            outcomes = read_journal(
                (spool_dir / "queue" / (queue_id + JOURNAL_SUFFIX)).read_bytes()
            ).outcomes
            tried = {o.recipient for o in outcomes if o.status is Status.DEFERRED}
            assert tried == {"b@example.com"}
        assert (
            cli.ok("retry", "--all") == "3 deferred message(s) due now, 0 dead letter(s) requeued\n"
        )
        wait_for_attempts(spool_dir, dead, 2)
        assert list((spool_dir / "failed").iterdir()) == []


def encode(envelope: Envelope) -> bytes:
    return encode_message(envelope, b"Subject: dead\r\n\r\nbody\r\n")
