"""mailrelay-sendmail and the maildrop it writes to: flags, message fix-ups, exit codes,
the checks the pickup side repeats on untrusted files, and the durable deposit."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from email.utils import formatdate
from pathlib import Path

import attrs
import pytest

from mailrelay.cli import sendmail
from mailrelay.cli.sendmail import Options, Refused, main, parse_args
from mailrelay.spool import maildrop
from mailrelay.spool.format import Envelope, StoredMessage, decode_message
from mailrelay.spool.maildrop import (
    MAILDROP,
    MaildropError,
    SpoolMissing,
    deposit,
    first_long_line,
    notify_daemon,
    validate,
)
from mailrelay.spool.store import ACCEPTOR_TAGS, SENDMAIL_TAG, queue_id_tag

NOW = 1_700_000_000.25
DATE = formatdate(NOW, localtime=True)
HOST = "host.test"
QID = "0000000000000100000001"


# -- helpers ------------------------------------------------------------------------------------


@attrs.frozen
class Run:
    code: int
    err: str
    spool: Path

    def messages(self) -> list[StoredMessage]:
        area = self.spool / MAILDROP
        if not area.exists():
            return []
        return [decode_message(p.read_bytes()) for p in sorted(area.iterdir())]

    def message(self) -> StoredMessage:
        (only,) = self.messages()
        return only


def write_config(tmp_path: Path, extra: str = "", spool: Path | None = None) -> Path:
    spool = tmp_path / "spool" if spool is None else spool
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[smtp]\nhostname = "{HOST}"\n{extra}\n[spool]\npath = "{spool}"\nmin_free_space = 0\n'
    )
    return path


RunFn = Callable[..., Run]


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[RunFn]:
    (tmp_path / "spool").mkdir()
    config = write_config(tmp_path)

    def _run(argv: Sequence[str], message: bytes = b"Subject: x\n\nhello\n", **kw: object) -> Run:
        options = {"environ": {}, "now": NOW, "uid": 1000, "login": "alice", **kw}
        code = main(argv, str(config), io.BytesIO(message), **options)  # type: ignore[arg-type]
        captured = capsys.readouterr()
        assert captured.out == ""
        return Run(code, captured.err, tmp_path / "spool")

    yield _run


def envelope(**changes: object) -> Envelope:
    base = Envelope(QID, "s@example.test", ("r@example.test",), NOW, "sendmail uid=1", "localhost")
    return attrs.evolve(base, **changes)


# -- flags --------------------------------------------------------------------------------------


def test_no_flags_gives_defaults_and_recipients() -> None:
    assert parse_args(["a@x.test", "b"]) == Options(recipients=("a@x.test", "b"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-fme@x.test"], Options(sender="me@x.test")),
        (["-f", "me@x.test"], Options(sender="me@x.test")),
        (["-r", "me@x.test"], Options(sender="me@x.test")),
        (["-rme@x.test"], Options(sender="me@x.test")),
        (["-f", "<me@x.test>"], Options(sender="me@x.test")),
        (["-f", "<>"], Options(sender="")),
        (["-f", ""], Options(sender="")),
        (["-FCron Daemon"], Options(full_name="Cron Daemon")),
        (["-F", "Line\r\nBcc: x"], Options(full_name="Line  Bcc: x")),
        (["-C", "/etc/relay.toml"], Options(config_path="/etc/relay.toml")),
        (["-C/etc/relay.toml"], Options(config_path="/etc/relay.toml")),
        (["-t"], Options(recipients_from_headers=True)),
        (["-i"], Options(dot_ends_input=False)),
        (["-oi"], Options(dot_ends_input=False)),
    ],
)
def test_each_flag(argv: list[str], expected: Options) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["-oem"],
        ["-oee"],
        ["-odi"],
        ["-odb"],
        ["-odq"],
        ["-om"],
        ["-oQ/var/spool/mqueue"],
        ["-B", "8BITMIME"],
        ["-B8BITMIME"],
        ["-N", "never"],
        ["-R", "hdrs"],
        ["-V", "envid"],
        ["-bm"],
        ["-v"],
        ["-U"],
    ],
)
def test_compatibility_flags_are_accepted_and_ignored(argv: list[str]) -> None:
    assert parse_args([*argv, "a@x.test"]) == Options(recipients=("a@x.test",))


def test_cron_command_line() -> None:
    """What cronie runs: sendmail -FCronDaemon -i -B8BITMIME -oem root."""
    options = parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert options == Options(recipients=("root",), full_name="CronDaemon", dot_ends_input=False)


def test_options_may_follow_recipients() -> None:
    assert parse_args(["a@x.test", "-oi"]) == Options(
        recipients=("a@x.test",), dot_ends_input=False
    )


def test_double_dash_ends_options() -> None:
    assert parse_args(["-i", "--", "-t", "b@x.test"]).recipients == ("-t", "b@x.test")


@pytest.mark.parametrize("flag", ["-bs", "-bp", "-q", "-q1h", "-X", "-ti", "-o", "-oX"])
def test_unknown_flag_is_a_usage_error(flag: str) -> None:
    with pytest.raises(Refused) as info:
        parse_args([flag, "a@x.test"])
    assert (info.value.code, info.value.message) == (64, f"unsupported option {flag}")


def test_flag_without_its_value_is_a_usage_error() -> None:
    with pytest.raises(Refused) as info:
        parse_args(["a@x.test", "-f"])
    assert info.value.code == 64 and "-f" in info.value.message


def test_unknown_flag_exits_64_naming_it(run: RunFn) -> None:
    result = run(["-bs"])
    assert (result.code, result.err) == (64, "mailrelay-sendmail: unsupported option -bs\n")
    assert result.messages() == []


def test_no_recipients_exits_64(run: RunFn) -> None:
    result = run([])
    assert (result.code, result.err) == (64, "mailrelay-sendmail: no recipients\n")


def test_t_without_any_recipient_header_exits_64(run: RunFn) -> None:
    result = run(["-t"], b"Subject: x\n\nbody\n")
    assert (result.code, result.err) == (64, "mailrelay-sendmail: no recipients\n")


# -- the deposited message ----------------------------------------------------------------------


def test_deposited_file_decodes_to_the_expected_envelope_and_body(run: RunFn) -> None:
    result = run(["-f", "app@example.test", "a@example.test"], b"Subject: hi\n\nhello\n")
    assert (result.code, result.err) == (0, "")
    stored = result.message()
    qid = stored.envelope.queue_id
    assert stored.envelope == Envelope(
        queue_id=qid,
        sender="app@example.test",
        recipients=("a@example.test",),
        received_at=NOW,
        client="sendmail uid=1000",
        helo="localhost",
        body_8bit=False,
    )
    assert (
        stored.body
        == (
            f"Received: by {HOST} (mailrelay sendmail, uid 1000) id {qid};\r\n\t{DATE}\r\n"
            "Subject: hi\r\n"
            "From: app@example.test\r\n"
            f"Date: {DATE}\r\n"
            f"Message-ID: <{qid}@{HOST}>\r\n"
            "\r\n"
            "hello\r\n"
        ).encode()
    )
    assert (result.spool / MAILDROP / qid).is_file()  # the file is named for its queue ID


def test_queue_id_is_time_sortable_from_now(run: RunFn) -> None:
    qid = run(["a@x.test"]).message().envelope.queue_id
    assert qid.startswith(f"{int(NOW * 1_000_000):014X}")


def test_queue_id_carries_the_sendmail_tag_no_acceptor_has(run: RunFn) -> None:
    qid = run(["a@x.test"]).message().envelope.queue_id
    assert queue_id_tag(qid) == SENDMAIL_TAG
    assert SENDMAIL_TAG > ACCEPTOR_TAGS


def test_8bit_body_is_flagged(run: RunFn) -> None:
    stored = run(["a@x.test"], "Subject: é\n\ncafé\n".encode()).message()
    assert stored.envelope.body_8bit is True
    assert stored.body.endswith("café\r\n".encode())


def test_existing_from_date_message_id_are_kept_and_not_added(run: RunFn) -> None:
    header = (
        b"from: Someone <s@x.test>\r\n"
        b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-Id: <given@x.test>\r\n"
        b"Subject: x\r\n"
    )
    stored = run(["a@x.test"], header + b"\r\nbody\r\n").message()
    received, _, rest = stored.body.partition(b"\r\n\t")
    assert received.startswith(b"Received: ")
    assert rest == f"{DATE}\r\n".encode() + header + b"\r\nbody\r\n"


def test_generated_from_uses_the_full_name(run: RunFn) -> None:
    stored = run(["-F", "Cron Daemon", "a@x.test"]).message()
    assert b"\r\nFrom: Cron Daemon <alice@host.test>\r\n" in stored.body


def test_generated_from_quotes_a_name_with_specials(run: RunFn) -> None:
    stored = run(["-F", "Smith, John", "a@x.test"]).message()
    assert b'\r\nFrom: "Smith, John" <alice@host.test>\r\n' in stored.body


def test_received_line(run: RunFn) -> None:
    stored = run(["a@x.test"], b"Subject: x\n\nbody\n", uid=33).message()
    qid = stored.envelope.queue_id
    expected = f"Received: by {HOST} (mailrelay sendmail, uid 33) id {qid};\r\n\t{DATE}\r\n"
    assert stored.body.startswith(expected.encode())
    assert stored.envelope.client == "sendmail uid=33"


def test_message_without_header_is_all_body(run: RunFn) -> None:
    stored = run(["a@x.test"], b"just text: no header\n\nmore\n").message()
    assert stored.body.endswith(
        f"Message-ID: <{stored.envelope.queue_id}@{HOST}>\r\n\r\n".encode()
        + b"just text: no header\r\n\r\nmore\r\n"
    )


def test_empty_message_gets_a_header_and_an_empty_body(run: RunFn) -> None:
    stored = run(["a@x.test"], b"").message()
    assert stored.body.endswith(b">\r\n\r\n")
    assert b"\r\nFrom: alice@host.test\r\n" in stored.body


def test_header_only_message_is_kept(run: RunFn) -> None:
    stored = run(["a@x.test"], b"Subject: only a header\n").message()
    assert b"Subject: only a header\r\nFrom: " in stored.body
    assert stored.body.endswith(b">\r\n")


# -- -t -----------------------------------------------------------------------------------------


def test_t_takes_to_cc_and_bcc_and_removes_bcc(run: RunFn) -> None:
    message = (
        b"To: One <one@x.test>, two@x.test\n"
        b"Cc: three@x.test\n"
        b"Bcc: hidden@x.test,\n"
        b"\tfolded@x.test\n"
        b"Subject: hi\n"
        b"\n"
        b"Bcc: in the body stays\n"
    )
    stored = run(["-t", "-i", "cmdline@x.test"], message).message()
    assert stored.envelope.recipients == (
        "cmdline@x.test",
        "one@x.test",
        "two@x.test",
        "three@x.test",
        "hidden@x.test",
        "folded@x.test",
    )
    assert b"hidden" not in stored.body and b"folded" not in stored.body
    assert b"To: One <one@x.test>, two@x.test\r\nCc: three@x.test\r\nSubject: hi\r\n" in stored.body
    assert stored.body.endswith(b"\r\n\r\nBcc: in the body stays\r\n")


def test_t_unfolds_folded_to_and_reads_groups(run: RunFn) -> None:
    message = b"To: a@x.test,\n b@x.test\nCc: team: c@x.test, d;\nTo: undisclosed:;\n\nx\n"
    stored = run(["-t"], message).message()
    assert stored.envelope.recipients == ("a@x.test", "b@x.test", "c@x.test", "d@host.test")


def test_recipients_are_deduplicated_in_order(run: RunFn) -> None:
    stored = run(["-t", "b@x.test", "a@x.test"], b"To: a@x.test, b@x.test, c@x.test\n\nx\n")
    assert stored.message().envelope.recipients == ("b@x.test", "a@x.test", "c@x.test")


def test_bcc_is_removed_without_t_too(run: RunFn) -> None:
    stored = run(["a@x.test"], b"Bcc: secret@x.test\nSubject: x\n\nbody\n").message()
    assert b"secret" not in stored.body
    assert stored.envelope.recipients == ("a@x.test",)


def test_t_with_a_non_ascii_address_exits_65(run: RunFn) -> None:
    result = run(["-t"], "To: jörg@x.test\n\nx\n".encode())
    assert result.code == 65 and "non-ASCII address" in result.err
    assert result.messages() == []


# -- the input ----------------------------------------------------------------------------------


def test_dot_line_ends_input_without_i(run: RunFn) -> None:
    stored = run(["a@x.test"], b"Subject: x\n\nbefore\n.\nafter\n").message()
    assert stored.body.endswith(b"\r\nbefore\r\n")


def test_dot_line_in_cr_only_input_ends_it(run: RunFn) -> None:
    stored = run(["a@x.test"], b"Subject: x\r\rbefore\r.\rafter\r").message()
    assert stored.body.endswith(b"\r\nbefore\r\n")


def test_dot_first_line_gives_an_empty_message(run: RunFn) -> None:
    stored = run(["a@x.test"], b".\nSubject: x\n").message()
    assert b"Subject" not in stored.body


@pytest.mark.parametrize("flag", ["-i", "-oi"])
def test_dot_line_does_not_end_input_with_i(run: RunFn, flag: str) -> None:
    stored = run([flag, "a@x.test"], b"Subject: x\n\nbefore\n.\nafter\n").message()
    assert stored.body.endswith(b"\r\nbefore\r\n.\r\nafter\r\n")


def test_dot_inside_a_line_does_not_end_input(run: RunFn) -> None:
    stored = run(["a@x.test"], b"Subject: x\n\n.leading\n..\nend.\n").message()
    assert stored.body.endswith(b"\r\n\r\n.leading\r\n..\r\nend.\r\n")


@pytest.mark.parametrize(
    "sent",
    [
        b"Subject: x\n\none\ntwo",
        b"Subject: x\r\rone\rtwo\r",
        b"Subject: x\r\n\r\none\r\ntwo\r\n",
        b"Subject: x\n\r\none\rtwo\n",
    ],
    ids=["lf-no-final-eol", "cr-only", "crlf", "mixed"],
)
def test_line_endings_become_crlf(run: RunFn, sent: bytes) -> None:
    stored = run(["-i", "a@x.test"], sent).message()
    assert stored.body.count(b"\r") == stored.body.count(b"\n") == stored.body.count(b"\r\n")
    assert b"\r\nSubject: x\r\n" in stored.body
    assert stored.body.endswith(b"\r\n\r\none\r\ntwo\r\n")


def test_oversized_message_exits_65(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spool").mkdir()
    config = write_config(tmp_path, "max_message_size = 1024")
    code = main(["-i", "a@x.test"], str(config), io.BytesIO(b"x\n" * 600), environ={}, now=NOW)
    assert code == 65
    assert capsys.readouterr().err == "mailrelay-sendmail: message too big (limit 1024 bytes)\n"
    assert not (tmp_path / "spool" / MAILDROP).exists()


def test_message_growing_past_the_limit_with_our_header_exits_65(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "spool").mkdir()
    config = write_config(tmp_path, "max_message_size = 1024")
    code = main(["-i", "a@x.test"], str(config), io.BytesIO(b"y\n" * 500), environ={}, now=NOW)
    assert code == 65
    assert "message too big (limit 1024 bytes)" in capsys.readouterr().err


def test_long_line_exits_65_naming_the_line(run: RunFn) -> None:
    result = run(["a@x.test"], b"Subject: x\n\nok\n" + b"y" * 999 + b"\n")
    assert result.code == 65
    assert result.err == "mailrelay-sendmail: line 4 of the message is longer than 998 octets\n"
    assert result.messages() == []


def test_line_of_998_octets_is_fine(run: RunFn) -> None:
    assert run(["a@x.test"], b"Subject: x\n\n" + b"y" * 998 + b"\n").code == 0


def test_nul_byte_exits_65(run: RunFn) -> None:
    result = run(["a@x.test"], b"Subject: x\n\nnul \x00 here\n")
    assert (result.code, result.err) == (65, "mailrelay-sendmail: NUL byte in message\n")


# -- addresses ----------------------------------------------------------------------------------


def test_bare_local_parts_are_qualified_with_our_hostname(run: RunFn) -> None:
    stored = run(["-f", "cron", "root", "ops@x.test"]).message()
    assert stored.envelope.sender == "cron@host.test"
    assert stored.envelope.recipients == ("root@host.test", "ops@x.test")


def test_default_sender_is_the_login_name_at_our_hostname(run: RunFn) -> None:
    stored = run(["a@x.test"], login="www-data").message()
    assert stored.envelope.sender == "www-data@host.test"
    assert b"\r\nFrom: www-data@host.test\r\n" in stored.body


def test_null_sender_keeps_a_from_header_of_the_caller(run: RunFn) -> None:
    stored = run(["-f", "<>", "a@x.test"]).message()
    assert stored.envelope.sender == ""
    assert b"\r\nFrom: alice@host.test\r\n" in stored.body


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["bad@@x.test"], "'bad@@x.test'"),
        (["a@x.test", "two words@x.test"], "'two words@x.test'"),
        (["-f", "a..b@x.test", "a@x.test"], "'a..b@x.test'"),
        (["jörg@x.test"], "non-ASCII address 'jörg@x.test'"),
        (["a@x.test", ""], "'@host.test'"),
    ],
)
def test_invalid_address_exits_65_naming_it(run: RunFn, argv: list[str], named: str) -> None:
    result = run(argv)
    assert result.code == 65
    assert result.err.startswith("mailrelay-sendmail: ") and named in result.err
    assert result.err.count("\n") == 1
    assert result.messages() == []


def test_too_many_recipients_exits_65(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spool").mkdir()
    config = write_config(tmp_path, "max_recipients = 2")
    argv = ["a@x.test", "b@x.test", "c@x.test"]
    assert main(argv, str(config), io.BytesIO(b"x\n"), environ={}) == 65
    assert "too many recipients (3, limit 2)" in capsys.readouterr().err


# -- config and spool ---------------------------------------------------------------------------


def test_missing_spool_exits_75(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, spool=tmp_path / "nowhere")
    assert main(["a@x.test"], str(config), io.BytesIO(b"x\n"), environ={}) == 75
    assert capsys.readouterr().err == (
        f"mailrelay-sendmail: spool directory {tmp_path / 'nowhere'} does not exist"
        " (does the daemon use this config?)\n"
    )


def test_bad_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = 'many'\n")
    assert main(["a@x.test"], str(bad), io.BytesIO(b"x\n"), environ={}) == 78
    assert capsys.readouterr().err == (
        "mailrelay-sendmail: config error: smtp.max_recipients: must be an integer\n"
    )


def test_c_flag_wins_over_the_argument_and_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "spool").mkdir()
    good = write_config(tmp_path)
    env = {"MAILRELAY_CONFIG": str(tmp_path / "missing-env.toml")}
    argv = ["-C", str(good), "a@x.test"]
    assert main(argv, str(tmp_path / "missing-arg.toml"), io.BytesIO(b"x\n"), environ=env) == 0
    assert capsys.readouterr().err == ""


def test_environment_names_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"MAILRELAY_CONFIG": str(tmp_path / "from-env.toml")}
    assert main(["a@x.test"], None, io.BytesIO(b"x\n"), environ=env) == 78
    assert "from-env.toml: no such file" in capsys.readouterr().err


def test_deposit_failure_exits_75_and_leaves_nothing(
    run: RunFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", _failing_fsync)
    result = run(["a@x.test"])
    assert result.code == 75
    assert result.err.startswith("mailrelay-sendmail: cannot write to ")
    assert result.err.endswith(": Input/output error\n")
    assert list((result.spool / MAILDROP).iterdir()) == []


def test_unexpected_error_exits_70_in_one_line(run: RunFn, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(sendmail, "deposit", broken)
    result = run(["a@x.test"])
    assert (result.code, result.err) == (
        70,
        "mailrelay-sendmail: internal error: RuntimeError: boom second line\n",
    )


def test_success_nudges_a_running_daemon(run: RunFn, tmp_path: Path) -> None:
    with control_server(tmp_path / "spool" / "control.sock", b'{"ok": true}\n') as requests:
        assert run(["a@x.test"]).code == 0
    assert requests == [b'{"command": "pickup"}\n']


# -- validate -----------------------------------------------------------------------------------

GOOD_BODY = b"Subject: x\r\n\r\nbody\r\n"


def test_validate_accepts_a_good_message() -> None:
    validate(envelope(), GOOD_BODY, 1000, 10)
    validate(envelope(sender=""), GOOD_BODY, 1000, 10)  # the null sender
    validate(envelope(recipients=("Postmaster",)), GOOD_BODY, 1000, 10)  # as RCPT accepts it


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"queue_id": "../../etc/passwd"}, "bad queue ID '../../etc/passwd'"),
        ({"queue_id": "0000000000000100000001.tmp"}, "bad queue ID"),
        ({"sender": "not an address"}, "invalid address 'not an address'"),
        ({"sender": "no-domain"}, "invalid address 'no-domain'"),
        ({"sender": "a@b.test\r\nX: y"}, "Control characters"),
        ({"sender": "@hop.test:a@b.test"}, "not in canonical form"),
        ({"sender": "jörg@b.test"}, "non-ASCII address"),
        ({"recipients": ()}, "no recipients"),
        ({"recipients": ("a@b.test", "")}, "invalid address ''"),
        ({"recipients": ("a@b.test", "x@@b.test")}, "invalid address 'x@@b.test'"),
        ({"recipients": ("ü@b.test",)}, "non-ASCII address"),
        ({"recipients": tuple(f"r{i}@b.test" for i in range(11))}, "too many recipients (11, "),
    ],
)
def test_validate_refuses_the_envelope(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(MaildropError) as info:
        validate(envelope(**changes), GOOD_BODY, 1000, 10)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"x\r\n" * 1000 + b"\r\n", "message too big (limit 3000 bytes)"),
        (b"a\r\nb\nc\r\n", "bare CR or LF"),
        (b"a\r\nb\rc\r\n", "bare CR or LF"),
        (b"a\r\n\n\r\n", "bare CR or LF"),
        (b"a\r\n\r\r\n", "bare CR or LF"),
        (b"a\r\nno final line end", "does not end with CRLF"),
        (b"", "does not end with CRLF"),
        (b"a\x00b\r\n", "NUL byte"),
        (b"a\r\n" + b"y" * 999 + b"\r\n", "line 2 is longer than 998 octets"),
    ],
)
def test_validate_refuses_the_body(body: bytes, reason: str) -> None:
    with pytest.raises(MaildropError) as info:
        validate(envelope(), body, 3000, 10)
    assert reason in info.value.reason


def test_validate_is_fast_on_a_25_mb_body() -> None:
    body = b"short\r\n" * (25 * 1024 * 1024 // 7)
    started = time.perf_counter()
    validate(envelope(), body, 26_214_400, 10)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], None),
        ([0, 0], None),
        ([998], None),
        ([999], 1),
        ([5, 998, 999], 3),
        ([998] * 40 + [1500], 41),
        ([1] * 3000 + [999, 5], 3001),
    ],
)
def test_first_long_line(lines: list[int], expected: int | None) -> None:
    body = b"".join(b"x" * n + b"\r\n" for n in lines)
    assert first_long_line(body) == expected


def test_first_long_line_counts_an_unterminated_last_line() -> None:
    assert first_long_line(b"a\r\n" + b"z" * 999) == 2


# -- deposit ------------------------------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _failing_fsync(fd: int) -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_deposit_writes_the_file_named_by_its_queue_id(tmp_path: Path) -> None:
    with umask(0o077):
        deposit(tmp_path, envelope(), GOOD_BODY)
    area = tmp_path / MAILDROP
    assert [p.name for p in area.iterdir()] == [QID]
    assert decode_message((area / QID).read_bytes()) == StoredMessage(envelope(), GOOD_BODY)
    # Readable by the daemon whatever the sender's umask.
    assert stat.S_IMODE((area / QID).stat().st_mode) == 0o644


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_deposit_creates_the_maildrop_sticky_and_world_writable(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        deposit(tmp_path, envelope(), GOOD_BODY)
    assert stat.S_IMODE((tmp_path / MAILDROP).stat().st_mode) == 0o1733


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory away")
def test_maildrop_created_by_root_belongs_to_the_spool_owner(tmp_path: Path) -> None:
    os.chown(tmp_path, 65534, 65534)
    deposit(tmp_path, envelope(), GOOD_BODY)
    created = (tmp_path / MAILDROP).stat()
    assert (created.st_uid, created.st_gid) == (65534, 65534)
    assert stat.S_IMODE(created.st_mode) == 0o1733


def test_deposit_leaves_an_existing_maildrop_alone(tmp_path: Path) -> None:
    (tmp_path / MAILDROP).mkdir(mode=0o700)
    deposit(tmp_path, envelope(), GOOD_BODY)
    assert stat.S_IMODE((tmp_path / MAILDROP).stat().st_mode) == 0o700


def test_deposit_without_the_spool_root_raises_spool_missing(tmp_path: Path) -> None:
    with pytest.raises(SpoolMissing) as info:
        deposit(tmp_path / "absent", envelope(), GOOD_BODY)
    assert str(tmp_path / "absent") in info.value.reason
    assert not (tmp_path / "absent").exists()


def test_failed_fsync_removes_the_tmp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _failing_fsync)
    with pytest.raises(MaildropError) as info:
        deposit(tmp_path, envelope(), GOOD_BODY)
    assert info.value.reason.endswith("Input/output error")
    assert list((tmp_path / MAILDROP).iterdir()) == []


def test_failed_rename_removes_the_tmp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rename(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(MaildropError):
        deposit(tmp_path, envelope(), GOOD_BODY)
    assert list((tmp_path / MAILDROP).iterdir()) == []


def test_failed_directory_fsync_removes_the_renamed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller is told to try again, so nothing may be left for the daemon to send."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            _failing_fsync(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(MaildropError):
        deposit(tmp_path, envelope(), GOOD_BODY)
    assert list((tmp_path / MAILDROP).iterdir()) == []


def test_deposit_by_a_user_who_may_not_read_the_maildrop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode 1733 lets others create files but not open the directory to fsync it: the file
    is fsynced again after the rename instead, and the deposit succeeds."""
    real_open, real_fsync = os.open, os.fsync
    synced: list[str] = []

    def open_(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECTORY:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        synced.append("renamed" if (tmp_path / MAILDROP / QID).exists() else "tmp")
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    deposit(tmp_path, envelope(), GOOD_BODY)
    assert synced == ["tmp", "renamed"]
    assert [p.name for p in (tmp_path / MAILDROP).iterdir()] == [QID]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_deposit_as_another_user_into_a_root_owned_maildrop() -> None:
    """The real permissions: nobody writes into root's 1733 maildrop (root bypasses them)."""
    root = Path(tempfile.mkdtemp(prefix="mailrelay-maildrop-"))
    try:
        root.chmod(0o755)
        (root / MAILDROP).mkdir()
        (root / MAILDROP).chmod(0o1733)
        pid = os.fork()
        if pid == 0:  # the child: become nobody, deposit, report through the exit status
            status = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                deposit(root, envelope(), GOOD_BODY)
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        file = root / MAILDROP / QID
        assert file.stat().st_uid == 65534 and stat.S_IMODE(file.stat().st_mode) == 0o644
        assert decode_message(file.read_bytes()) == StoredMessage(envelope(), GOOD_BODY)
    finally:
        shutil.rmtree(root)


def test_deposit_refuses_a_queue_id_that_is_not_a_file_name(tmp_path: Path) -> None:
    with pytest.raises(MaildropError):
        deposit(tmp_path, envelope(queue_id="../escape"), GOOD_BODY)
    assert list(tmp_path.iterdir()) == []


def test_deposit_never_overwrites_a_leftover_tmp_file(tmp_path: Path) -> None:
    (tmp_path / MAILDROP).mkdir()
    (tmp_path / MAILDROP / f".{QID}.tmp").write_bytes(b"someone else's")
    with pytest.raises(MaildropError):
        deposit(tmp_path, envelope(), GOOD_BODY)
    assert (tmp_path / MAILDROP / f".{QID}.tmp").read_bytes() == b"someone else's"


# -- notify_daemon ------------------------------------------------------------------------------


@contextmanager
def control_server(path: Path, reply: bytes | None) -> Iterator[list[bytes]]:
    """A one-connection stand-in for the daemon's control socket; ``reply=None`` never answers.
    Yields the request lines it received."""
    requests: list[bytes] = []
    release = threading.Event()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(1024)
                if not chunk:
                    break
                data += chunk
            requests.append(data)
            if reply is None:
                release.wait(10)
            else:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        release.set()
        server.close()
        thread.join(10)


def test_notify_daemon_sends_pickup_and_reads_ok(tmp_path: Path) -> None:
    reply = json.dumps({"ok": True, "picked_up": 1}).encode() + b"\n"
    with control_server(tmp_path / "control.sock", reply) as requests:
        assert notify_daemon(tmp_path) is True
    assert requests == [b'{"command": "pickup"}\n']


@pytest.mark.parametrize(
    "reply",
    [b'{"ok": false, "error": "busy"}\n', b"not json\n", b'["ok"]\n', b'{"ok": "yes"}\n', b""],
    ids=["not-ok", "not-json", "not-an-object", "ok-not-true", "closed-without-reply"],
)
def test_notify_daemon_is_false_on_a_bad_reply(tmp_path: Path, reply: bytes) -> None:
    with control_server(tmp_path / "control.sock", reply):
        assert notify_daemon(tmp_path) is False


def test_notify_daemon_is_false_without_a_socket(tmp_path: Path) -> None:
    assert notify_daemon(tmp_path) is False
    assert notify_daemon(tmp_path / "no-such-spool") is False


def test_notify_daemon_is_false_when_nothing_listens(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()  # the file stays; connecting to it is refused, as after a daemon crash
    assert notify_daemon(tmp_path) is False


def test_notify_daemon_gives_up_at_its_timeout(tmp_path: Path) -> None:
    with control_server(tmp_path / "control.sock", None):
        started = time.monotonic()
        assert notify_daemon(tmp_path, timeout=0.2) is False
        assert time.monotonic() - started < 5


def test_maildrop_constant_names_the_area() -> None:
    assert maildrop.MAILDROP == "maildrop"
