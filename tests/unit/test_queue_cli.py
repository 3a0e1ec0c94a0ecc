"""``mailrelay queue ...`` in process, on a stopped daemon's spool (no control socket): what it
prints, what it changes on disk, and its exit codes. Nothing it does may put a traceback on
stderr."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailrelay.cli.main import main
from mailrelay.spool.format import Outcome, Status, decode_journal
from mailrelay.spool.store import FAILED, HOLD, JOURNAL_SUFFIX, QUEUE, Spool, SpoolLock
from tests.unit.fakes import envelope, make_spool, store

A, B = "a@example.test", "b@example.test"
HOUR = 3600.0


def qid(n: int) -> str:
    return f"{n:022X}"


@attrs.frozen
class Run:
    code: int | str | None
    out: str
    err: str


@attrs.define
class Queue:
    """A spool with one message in each state, and a config naming it."""

    root: Path
    config: Path
    spool: Spool
    now: float
    capsys: pytest.CaptureFixture[str]
    ready: str = ""
    deferred: str = ""
    held: str = ""
    dead: str = ""

    def run(self, *args: str, config: bool = True) -> Run:
        argv = (["--config", str(self.config)] if config else []) + list(args)
        try:
            code: int | str | None = main(argv)
        except SystemExit as e:
            code = e.code
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err and "Traceback" not in out
        return Run(code, out, err)

    def files(self, area: str) -> list[str]:
        return sorted(p.name for p in self.spool.area(area).iterdir())

    def ids(self, area: str) -> list[str]:
        return [n for n in self.files(area) if not n.endswith(JOURNAL_SUFFIX)]

    def mtime(self, queue_id: str, area: str = QUEUE) -> float:
        return os.stat(self.spool.area(area) / queue_id).st_mtime

    def journal(self, queue_id: str, area: str = QUEUE) -> list[tuple[str, Status]]:
        data = (self.spool.area(area) / (queue_id + JOURNAL_SUFFIX)).read_bytes()
        return [(o.recipient, o.status) for o in decode_journal(data)]


def write_config(path: Path, spool: Path) -> Path:
    path.write_text(f'[spool]\npath = "{spool}"\nmin_free_space = 0\n')
    return path


@pytest.fixture
def q(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Queue]:
    root = tmp_path / "spool"
    spool = make_spool(root)
    now = time.time()
    queue = Queue(root, write_config(tmp_path / "relay.toml", root), spool, now, capsys)
    received = now - HOUR

    def put(n: int, recipients: tuple[str, ...] = (A,)) -> str:
        return store(spool, envelope(qid(n), recipients, received_at=received))

    queue.ready = put(1)
    queue.deferred = put(2)
    spool.append_journal_now(
        queue.deferred, [Outcome(A, Status.DEFERRED, "451 4.3.0 try later", "p1", now - 60)]
    )
    os.utime(spool.queue / queue.deferred, (now + HOUR, now + HOUR))
    queue.held = put(3)
    spool.move_now(queue.held, QUEUE, HOLD)
    queue.dead = put(4, (A, B))
    spool.append_journal_now(
        queue.dead,
        [
            Outcome(A, Status.DELIVERED, "250 2.0.0 ok", "p1", now - 120),
            Outcome(B, Status.FAILED, "550 5.1.1 no such user", "p1", now - 120),
        ],
    )
    spool.move_now(queue.dead, QUEUE, FAILED)
    yield queue


# -- list and show --------------------------------------------------------------------------------


def test_list_prints_a_table_with_states_last_errors_and_a_summary(q: Queue) -> None:
    result = q.run("queue", "list")
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    assert lines[0].split() == [
        "QUEUE",
        "ID",
        "STATE",
        "AGE",
        "SIZE",
        "RCPT",
        "NEXT",
        "ATTEMPT",
        "SENDER",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:-1] if not line.startswith(" ")}
    assert set(rows) == {q.ready, q.deferred, q.held, q.dead}
    assert rows[q.ready][1:3] == ["ready", "60m"]
    assert rows[q.ready][4:] == ["1/1", "-", "<sender@example.test>"]
    assert rows[q.deferred][1] == "deferred"
    next_attempt = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(q.now + HOUR))
    assert " ".join(rows[q.deferred][5:7]) == next_attempt
    assert rows[q.held][1] == "held"
    assert rows[q.dead][1] == "failed" and rows[q.dead][4] == "0/2"
    # Each last error is on the line after its message's row.
    after = {
        lines[i - 1].split()[0]: line.strip()
        for i, line in enumerate(lines)
        if i and line.startswith(" ")
    }
    assert after == {
        q.deferred: "last error: 451 4.3.0 try later",
        q.dead: "last error: 550 5.1.1 no such user",
    }
    assert lines[-1] == "-- 4 message(s): 1 deferred, 1 failed, 1 held, 1 ready"


def test_list_of_an_empty_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "spool"
    make_spool(root)
    config = write_config(tmp_path / "relay.toml", root)
    assert main(["--config", str(config), "queue", "list"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == ["-- 0 message(s)"] and err == ""
    assert main(["--config", str(config), "queue", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_list_json_is_one_array_of_entries(q: Queue) -> None:
    result = q.run("queue", "list", "--json")
    assert (result.code, result.err) == (0, "")
    entries = json.loads(result.out)
    assert [e["queue_id"] for e in entries] == [q.ready, q.deferred, q.held, q.dead]
    by_id: dict[str, dict[str, Any]] = {e["queue_id"]: e for e in entries}
    assert {i: e["state"] for i, e in by_id.items()} == {
        q.ready: "ready",
        q.deferred: "deferred",
        q.held: "held",
        q.dead: "failed",
    }
    assert by_id[q.deferred]["next_attempt"] == pytest.approx(q.now + HOUR, abs=1e-3)
    assert by_id[q.deferred]["last_error"] == "451 4.3.0 try later"
    assert by_id[q.dead]["recipients"] == 2 and by_id[q.dead]["pending"] == 0
    assert by_id[q.ready]["received_at"] == pytest.approx(q.now - HOUR)
    assert by_id[q.ready]["size"] == (q.spool.queue / q.ready).stat().st_size
    assert by_id[q.ready]["sender"] == "sender@example.test"


def test_show_prints_the_envelope_and_the_history(q: Queue) -> None:
    result = q.run("queue", "show", q.dead)
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    assert lines[0] == f"queue id:     {q.dead}"
    assert lines[1] == "state:        failed"
    assert lines[2].startswith("received:     ") and lines[2].endswith("(60m ago)")
    assert lines[4] == "sender:       <sender@example.test>"
    assert lines[5] == "client:       127.0.0.1 (helo client.test)"
    assert "last error:   550 5.1.1 no such user" in lines
    start = lines.index("recipients:")
    assert lines[start + 1 : start + 3] == [f"  <{A}>  delivered", f"  <{B}>  failed"]
    history = lines[lines.index("history:") + 1 :]
    assert len(history) == 2
    assert history[0].endswith(f"<{A}>  delivered via p1: 250 2.0.0 ok")
    assert history[1].endswith(f"<{B}>  failed via p1: 550 5.1.1 no such user")


def test_show_json(q: Queue) -> None:
    result = q.run("queue", "show", q.deferred, "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["queue_id"] == q.deferred and report["state"] == "deferred"
    assert report["recipient_status"] == {A: "deferred"}
    assert report["history"] == [
        {
            "recipient": A,
            "status": "deferred",
            "reply": "451 4.3.0 try later",
            "provider": "p1",
            "at": pytest.approx(q.now - 60),
            "uncertain": False,
        }
    ]
    assert (report["client"], report["helo"], report["body_8bit"]) == (
        "127.0.0.1",
        "client.test",
        False,
    )


# -- acting on messages ---------------------------------------------------------------------------


def test_hold_moves_a_queued_message_to_hold(q: Queue) -> None:
    result = q.run("queue", "hold", q.deferred)
    assert result == Run(0, f"{q.deferred}: held\n", "")
    assert q.deferred not in q.files(QUEUE)
    assert q.deferred in q.files(HOLD) and q.deferred + JOURNAL_SUFFIX in q.files(HOLD)
    assert json.loads(q.run("queue", "show", q.deferred, "--json").out)["state"] == "held"


def test_release_puts_a_held_message_back_due_now(q: Queue) -> None:
    before = time.time()
    result = q.run("queue", "release", q.held)
    assert result == Run(0, f"{q.held}: released (delivered when the daemon runs)\n", "")
    assert q.ids(HOLD) == []
    assert before - 1 <= q.mtime(q.held) <= time.time()


def test_delete_removes_a_message_and_its_journal(q: Queue) -> None:
    assert q.run("queue", "delete", q.dead) == Run(0, f"{q.dead}: deleted\n", "")
    assert q.files(FAILED) == []
    assert q.run("queue", "delete", q.held) == Run(0, f"{q.held}: deleted\n", "")
    assert q.files(HOLD) == []
    assert q.run("queue", "delete", q.dead).code == 1


def test_retry_of_a_deferred_message_makes_it_due_now(q: Queue) -> None:
    result = q.run("queue", "retry", q.deferred)
    assert result == Run(0, f"{q.deferred}: scheduled (delivered when the daemon runs)\n", "")
    assert q.mtime(q.deferred) <= time.time()


def test_retry_of_a_dead_letter_requeues_its_failed_recipients(q: Queue) -> None:
    result = q.run("queue", "retry", q.dead)
    assert result == Run(0, f"{q.dead}: requeued (delivered when the daemon runs)\n", "")
    assert q.files(FAILED) == []
    assert q.journal(q.dead) == [
        (A, Status.DELIVERED),
        (B, Status.FAILED),
        (B, Status.REQUEUED),
    ]
    assert q.mtime(q.dead) <= time.time()


def test_retry_failed_requeues_every_dead_letter(q: Queue) -> None:
    assert q.run("queue", "retry", "--failed") == Run(0, "1 dead letter(s) requeued\n", "")
    assert q.files(FAILED) == []
    assert q.dead in q.files(QUEUE)
    assert q.mtime(q.deferred) == pytest.approx(q.now + HOUR)  # left alone
    assert q.run("queue", "retry", "--failed") == Run(0, "0 dead letter(s) requeued\n", "")


def test_retry_all_makes_deferred_due_and_requeues_dead_letters(q: Queue) -> None:
    result = q.run("queue", "retry", "--all")
    assert result == Run(0, "1 deferred message(s) due now, 1 dead letter(s) requeued\n", "")
    assert q.mtime(q.deferred) <= time.time()
    assert q.files(FAILED) == []
    assert q.ids(HOLD) == [q.held]  # held stays held


def test_flush_makes_every_deferred_message_due_now(q: Queue) -> None:
    assert q.run("queue", "flush") == Run(0, "1 deferred message(s) due now\n", "")
    assert q.mtime(q.deferred) <= time.time()
    assert q.run("queue", "flush") == Run(0, "0 deferred message(s) due now\n", "")
    states = {e["queue_id"]: e["state"] for e in json.loads(q.run("queue", "list", "--json").out)}
    assert states[q.deferred] == "ready"


def test_a_spool_from_before_the_hold_area_gets_it(q: Queue) -> None:
    q.run("queue", "release", q.held)
    os.rmdir(q.spool.hold)
    assert q.run("queue", "hold", q.ready).code == 0
    assert q.ids(HOLD) == [q.ready]


# -- exit codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["show", "hold", "release", "delete", "retry"])
@pytest.mark.parametrize("queue_id", [qid(404), "../queue", "lock"])
def test_an_unknown_id_exits_1(q: Queue, command: str, queue_id: str) -> None:
    before = {area: q.files(area) for area in (QUEUE, HOLD, FAILED)}
    result = q.run("queue", command, queue_id)
    assert result == Run(1, "", f"mailrelay: no message {queue_id} in the spool\n")
    assert {area: q.files(area) for area in (QUEUE, HOLD, FAILED)} == before


@pytest.mark.parametrize(
    ("command", "which", "message"),
    [
        ("release", "ready", "{id} is queued, not held"),
        ("hold", "held", "{id} is held, not queued"),
        ("hold", "dead", "{id} is failed, not queued"),
        ("retry", "held", "{id} is held, not queued or failed"),
    ],
)
def test_a_message_in_the_wrong_state_exits_1(
    q: Queue, command: str, which: str, message: str
) -> None:
    queue_id = getattr(q, which)
    result = q.run("queue", command, queue_id)
    assert result == Run(1, "", "mailrelay: " + message.format(id=queue_id) + "\n")


def test_an_empty_id_is_a_usage_error_not_an_internal_one(q: Queue) -> None:
    assert q.run("queue", "show", "").code == 64


def test_no_spool_at_the_configured_path_exits_66(tmp_path: Path, q: Queue) -> None:
    missing = tmp_path / "nowhere"
    write_config(q.config, missing)
    result = q.run("queue", "list")
    assert result.code == 66 and result.out == ""
    assert result.err.startswith(f"mailrelay: no spool at {missing} (spool.path of {q.config};")
    assert result.err.count("\n") == 1
    assert not missing.exists()  # nothing created


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[spool\n", "not valid TOML"),
        ("[spool]\nretry_initial = -1\n", "spool.retry_initial: must be greater than 0"),
        ("[bogus]\n", "bogus: unknown key"),
    ],
)
def test_a_bad_config_exits_78_in_one_line(q: Queue, text: str, expected: str) -> None:
    q.config.write_text(text)
    result = q.run("queue", "list")
    assert result.code == 78 and result.out == ""
    assert result.err.startswith("mailrelay: config error: ") and expected in result.err
    assert result.err.count("\n") == 1


def test_a_missing_config_file_exits_78(q: Queue, tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result = q.run("--config", str(missing), "queue", "list", config=False)
    assert result == Run(78, "", f"mailrelay: config error: {missing}: no such file\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["queue"],
        ["queue", "bogus"],
        ["queue", "hold"],
        ["queue", "show"],
        ["queue", "retry"],
        ["queue", "retry", qid(1), "--all"],
        ["queue", "retry", "--all", "--failed"],
        ["queue", "list", "--bogus"],
        ["queue", "flush", qid(1)],
        ["queue", "hold", qid(1), qid(2)],
    ],
)
def test_a_bad_command_line_exits_64(q: Queue, argv: list[str]) -> None:
    before = {area: q.files(area) for area in (QUEUE, HOLD, FAILED)}
    result = q.run(*argv)
    assert result.code == 64 and result.out == ""
    assert "error:" in result.err
    assert {area: q.files(area) for area in (QUEUE, HOLD, FAILED)} == before


@pytest.mark.parametrize(
    "argv",
    [
        ["queue", "list"],
        ["queue", "hold", qid(1)],
        ["queue", "flush"],
        ["queue", "retry", "--all"],
    ],
)
def test_a_locked_spool_exits_75_and_changes_nothing(q: Queue, argv: list[str]) -> None:
    lock = SpoolLock(q.root, "mailrelay daemon")
    try:
        before = {area: q.files(area) for area in (QUEUE, HOLD, FAILED)}
        mtime = q.mtime(q.deferred)
        result = q.run(*argv)
    finally:
        lock.release()
    assert result.code == 75 and result.out == ""
    assert result.err == (
        f"mailrelay: spool {q.root} is in use by another process (pid {os.getpid()},"
        " mailrelay daemon); a daemon starting or stopping? try again in a moment\n"
    )
    assert {area: q.files(area) for area in (QUEUE, HOLD, FAILED)} == before
    assert q.mtime(q.deferred) == mtime
    # Free again, the same command works.
    assert q.run(*argv).code == 0


def test_the_lock_is_released_after_each_command(q: Queue) -> None:
    assert q.run("queue", "hold", q.ready).code == 0
    SpoolLock(q.root, "a daemon starting").release()  # would raise SpoolBusy if still held
    assert q.run("queue", "release", q.ready).code == 0
    SpoolLock(q.root, "a daemon starting").release()


def test_a_dead_daemons_socket_file_means_offline(q: Queue) -> None:
    """A control.sock nobody listens on (a SIGKILLed daemon's) is no daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(q.root / "control.sock"))
    sock.close()
    assert q.run("queue", "hold", q.ready) == Run(0, f"{q.ready}: held\n", "")
    assert q.ids(HOLD) == sorted([q.ready, q.held])


# -- where the config comes from ------------------------------------------------------------------


def test_mailrelay_config_is_used_without_config_option(
    q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILRELAY_CONFIG", str(q.config))
    result = q.run("queue", "hold", q.ready, config=False)
    assert result == Run(0, f"{q.ready}: held\n", "")
    assert q.ready in q.ids(HOLD)


def test_config_option_wins_over_mailrelay_config(
    q: Queue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MAILRELAY_CONFIG", str(tmp_path / "missing.toml"))
    assert q.run("queue", "list").code == 0
    assert q.run("queue", "list", config=False).code == 78


def test_without_any_config_the_default_spool_is_relative_to_the_working_directory(
    q: Queue, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    result = q.run("queue", "list", config=False)
    assert result.code == 66 and "the embedded default" in result.err
    make_spool(workdir / "spool")
    assert q.run("queue", "list", config=False).code == 0


def test_control_characters_from_other_users_never_reach_the_terminal() -> None:
    from mailrelay.cli.queue import render

    report = {
        "queue_id": qid(1),
        "state": "ready",
        "received_at": None,
        "size": 1,
        "sender": "a@example.test",
        "client": "sendmail uid=1000",
        "helo": "\x1b]0;owned\x07",
        "recipient_status": {},
        "history": [
            {
                "recipient": A,
                "status": "deferred",
                "reply": "451 \x1b[2Jcleared",
                "provider": "p1",
                "at": 0.0,
                "uncertain": False,
            }
        ],
    }
    text = render("show", {"id": qid(1)}, report, 0.0)
    assert "\x1b" not in text and "\x07" not in text
    assert "?]0;owned?" in text and "451 ?[2Jcleared" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the spool to another user")
def test_offline_changes_by_another_user_than_the_spools_owner_are_refused(q: Queue) -> None:
    os.chown(q.root, 65534, 65534)  # the daemon's user, say
    run = q.run("queue", "hold", q.deferred)
    assert run.code == 77
    assert "run this as the spool's owner (uid 65534)" in run.err
    assert q.deferred in q.ids(QUEUE)
    assert q.run("queue", "list").code == 0  # reading is fine
