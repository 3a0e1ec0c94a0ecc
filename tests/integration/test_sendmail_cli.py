"""The installed ``mailrelay-sendmail`` script, run as cron, PHP and mailx run sendmail:
a real process, real stdin, a real spool directory, exit codes as the caller sees them."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import threading
from pathlib import Path

import attrs
import pytest

from mailrelay.spool.format import StoredMessage, decode_message

pytestmark = pytest.mark.integration

SENDMAIL = Path(sys.executable).with_name("mailrelay-sendmail")
HOST = "relay.test"


@attrs.frozen
class Result:
    code: int
    out: bytes
    err: str


@attrs.frozen
class Setup:
    config: Path
    spool: Path

    def run(self, *args: str, stdin: bytes = b"Subject: x\n\nhello\n", **env: str) -> Result:
        assert SENDMAIL.exists(), "run: .venv/bin/pip install -e '.[test]'"
        environ = {**os.environ, "MAILRELAY_CONFIG": str(self.config), **env}
        proc = subprocess.run(
            [str(SENDMAIL), *args], input=stdin, capture_output=True, env=environ, timeout=60
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode())

    def maildrop(self) -> list[StoredMessage]:
        area = self.spool / "maildrop"
        return [decode_message(p.read_bytes()) for p in sorted(area.iterdir())]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[smtp]\nhostname = "{HOST}"\nmax_message_size = 4096\n'
        f'[spool]\npath = "{spool}"\nmin_free_space = 0\n'
    )
    return Setup(config, spool)


def test_cron_style_mail_is_deposited(setup: Setup) -> None:
    result = setup.run(
        "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=b"Subject: cron\n\nout\n"
    )
    assert result == Result(0, b"", "")  # silent on success, as sendmail is
    (stored,) = setup.maildrop()
    login = _login()
    assert stored.envelope.sender == f"{login}@{HOST}"
    assert stored.envelope.recipients == (f"root@{HOST}",)
    assert stored.envelope.client == f"sendmail uid={os.getuid()}"
    assert stored.body.startswith(f"Received: by {HOST} (mailrelay sendmail, uid ".encode())
    assert f"\r\nFrom: CronDaemon <{login}@{HOST}>\r\n".encode() in stored.body
    assert stored.body.endswith(b"\r\n\r\nout\r\n")
    assert (setup.spool / "maildrop" / stored.envelope.queue_id).is_file()


def test_php_style_mail_takes_recipients_from_the_header(setup: Setup) -> None:
    message = b"To: a@x.test\nBcc: b@x.test\nSubject: php\n\nbody\n"
    result = setup.run("-t", "-i", "-f", "app@x.test", stdin=message)
    assert result == Result(0, b"", "")
    (stored,) = setup.maildrop()
    assert stored.envelope.sender == "app@x.test"
    assert stored.envelope.recipients == ("a@x.test", "b@x.test")
    assert b"Bcc" not in stored.body


def test_config_flag_overrides_the_environment(setup: Setup) -> None:
    result = setup.run("-C", str(setup.config), "a@x.test", MAILRELAY_CONFIG="/nonexistent.toml")
    assert result.code == 0 and len(setup.maildrop()) == 1


def test_unknown_flag_exits_64(setup: Setup) -> None:
    result = setup.run("-bs")
    assert result == Result(64, b"", "mailrelay-sendmail: unsupported option -bs\n")


def test_bad_message_exits_65_and_deposits_nothing(setup: Setup) -> None:
    result = setup.run("-i", "a@x.test", stdin=b"x\n" * 3000)
    assert result == Result(65, b"", "mailrelay-sendmail: message too big (limit 4096 bytes)\n")
    assert not (setup.spool / "maildrop").exists()


def test_missing_spool_exits_75(setup: Setup) -> None:
    setup.spool.rmdir()
    result = setup.run("a@x.test")
    assert result.code == 75
    assert result.err == (
        f"mailrelay-sendmail: spool directory {setup.spool} does not exist"
        " (does the daemon use this config?)\n"
    )


def test_bad_config_exits_78(setup: Setup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool\n")
    result = setup.run("a@x.test", MAILRELAY_CONFIG=str(bad))
    assert result.code == 78
    assert result.err.startswith(f"mailrelay-sendmail: config error: {bad}: not valid TOML")
    assert result.err.count("\n") == 1


def test_a_running_daemon_is_told_to_pick_up(setup: Setup) -> None:
    with ControlSocket(setup.spool / "control.sock") as requests:
        assert setup.run("a@x.test").code == 0
    assert requests == [b'{"command": "pickup"}\n']
    assert len(setup.maildrop()) == 1


def _login() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


class ControlSocket:
    """A stand-in daemon control socket that answers one pickup request with ok."""

    def __init__(self, path: Path) -> None:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(30)
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            data = b""
            while not data.endswith(b"\n") and (chunk := conn.recv(1024)):
                data += chunk
            self.requests.append(data)
            conn.sendall(b'{"ok": true, "result": 1}\n')

    def __enter__(self) -> list[bytes]:
        self._thread.start()
        return self.requests

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        self._thread.join(30)


def test_script_is_installed_next_to_the_interpreter() -> None:
    assert SENDMAIL.exists()
    assert os.access(SENDMAIL, os.X_OK)
