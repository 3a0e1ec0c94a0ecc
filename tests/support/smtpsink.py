"""Postfix's ``smtp-sink`` as a fault-injecting upstream, one process per upstream.

    with SmtpSink(disconnect_421=["DATA"]) as sink:      # -Q DATA
        ... deliver to ("127.0.0.1", sink.port) ...
        sink.messages()        # transactions that reached the final dot (captured with -d)
        sink.counters()        # {"sess": .., "quit": .., "mesg": ..} from -c

Options map one to one onto smtp-sink's flags (see ``man smtp-sink``):

    disconnect_421=[CMD]   -Q   reply 421 and disconnect after CMD
    disconnect=[CMD]       -q   disconnect without a reply after CMD
    soft_reject=[CMD]      -r   4xx to CMD (implies -p: no PIPELINING)
    hard_reject=[CMD]      -f   5xx to CMD (implies -p)
    data_delay=SECS        -w   wait before answering DATA (whole seconds)
    read_delay=SECS        -H   delay the first read after DATA (whole seconds)
    command_delays={CMD: SECS} -W CMD:SECS
    extra_args=[...]       anything else, verbatim

CMD is a command name (CONNECT, EHLO, MAIL, RCPT, DATA, ".", RSET, QUIT...). Every sink
captures each transaction (-d) and keeps running counters (-c). Note what smtp-sink counts:
a transaction is captured, and counted in "mesg", once its final dot arrives, *whatever the
reply to it was* (also with -f . or -Q .).

The binary is /usr/sbin/smtp-sink from the Debian package ``postfix`` (CI installs it with
debconf "No configuration"). A missing binary is an error, not a skip: a CI image without it
must fail loudly. smtp-sink refuses to run as root without -u, so as root it runs as
``nobody`` and its capture directory is made writable for that user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import attrs

from tests.support.net import free_port, wait_until
from tests.support.process import ServerProcess

SMTP_SINK = Path(os.environ.get("MAILRELAY_SMTP_SINK", "/usr/sbin/smtp-sink"))
BACKLOG = 64
_UNPRIVILEGED_USER = "nobody"


@attrs.frozen
class CapturedMessage:
    mail_from: str  # the MAIL FROM address, without <>
    rcpt_tos: tuple[str, ...]  # RCPT TO addresses, without <>, in order
    helo: str | None
    body: bytes  # header and body as received, with LF line ends (smtp-sink's dump format)
    path: Path


def _listening(host: str, port: int) -> bool:
    """True if a socket is in LISTEN state on (host, port), read from /proc/net/tcp{,6}.

    Unlike a probe connection, this is invisible to the server (no session, no counter).
    """
    if ":" in host:
        table = Path("/proc/net/tcp6")
        packed = socket.inet_pton(socket.AF_INET6, host)
        # /proc prints each 32-bit word of the address in host byte order.
        words = [packed[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4)]
        local = "".join(words) + f":{port:04X}"
    else:
        table = Path("/proc/net/tcp")
        local = socket.inet_aton(host)[::-1].hex().upper() + f":{port:04X}"
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # 0A = LISTEN
            return True
    return False


def parse_capture(data: bytes, path: Path) -> CapturedMessage:
    """One smtp-sink dump file: X-* records, a 3-line Received header, the message, a blank
    line."""
    lines = data.split(b"\n")
    mail_from = ""
    rcpts: list[str] = []
    helo: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.startswith(b"X-Mail-Args: "):
            mail_from = line[13:].split(b" ", 1)[0].decode().strip("<>")
        elif line.startswith(b"X-Rcpt-Args: "):
            rcpts.append(line[13:].split(b" ", 1)[0].decode().strip("<>"))
        elif line.startswith(b"X-Helo-Args: "):
            helo = line[13:].decode()
        elif line.startswith(b"Received: "):
            index += 2  # "\tby host (smtp-sink) ..." and the date line
            break
    body = b"\n".join(lines[index:])
    if body.endswith(b"\n\n"):
        body = body[:-1]  # the blank line smtp-sink appends
    return CapturedMessage(mail_from, tuple(rcpts), helo, body, path)


class SmtpSink(ServerProcess):
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        disconnect_421: Sequence[str] = (),
        disconnect: Sequence[str] = (),
        soft_reject: Sequence[str] = (),
        hard_reject: Sequence[str] = (),
        data_delay: int | None = None,
        read_delay: int | None = None,
        command_delays: Mapping[str, int] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        if host not in ("127.0.0.1", "::1"):
            raise ValueError("only loopback (127.0.0.1 or ::1) is allowed")
        self.host = host
        self._args: list[str] = []
        for flag, commands in (
            ("-Q", disconnect_421),
            ("-q", disconnect),
            ("-r", soft_reject),
            ("-f", hard_reject),
        ):
            if commands:
                self._args += [flag, ",".join(commands)]
        if data_delay is not None:
            self._args += ["-w", str(int(data_delay))]
        if read_delay is not None:
            self._args += ["-H", str(int(read_delay))]
        for command, delay in (command_delays or {}).items():
            self._args += ["-W", f"{command}:{int(delay)}"]
        self._args += list(extra_args)
        self._startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        self.capture_dir = self.dir / "capture"
        self.log_path = self.dir / "smtp-sink.log"

    def command(self, port: int) -> list[str]:
        cmd = [str(SMTP_SINK), "-c", "-d", f"{self.capture_dir}/msg.", *self._args]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", _UNPRIVILEGED_USER]
        address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        return [*cmd, address, str(BACKLOG)]

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("SmtpSink already started")
        if not os.access(SMTP_SINK, os.X_OK):
            raise FileNotFoundError(
                f"{SMTP_SINK} not found: install Debian's postfix package (debconf"
                ' "No configuration"), see shared/reliability.md'
            )
        self.capture_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Runs as nobody: let it reach and write the capture directory.
            self.dir.chmod(0o755)
            self.capture_dir.chmod(0o777)
        # The port is picked here, so another process may take it first: then smtp-sink
        # exits at once (bind failure) and we try another.
        for _ in range(5):
            port = free_port(self.host)
            with self.log_path.open("ab") as log:
                proc = subprocess.Popen(
                    self.command(port), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
                )
            try:
                wait_until(
                    lambda: proc.poll() is not None or _listening(self.host, port),  # noqa: B023
                    timeout=self._startup_timeout,
                    what=f"smtp-sink to listen on {self.host}:{port}",
                )
            except AssertionError:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"smtp-sink did not start:\n{self.log_tail()}") from None
            if proc.poll() is None:
                self._proc, self._port = proc, port
                return self
            if b"Address already in use" not in self.log_path.read_bytes():
                break
        raise RuntimeError(f"smtp-sink exited with {proc.returncode}:\n{self.log_tail()}")

    # stop() (from ServerProcess): SIGTERM; smtp-sink exits at once, closing its connections.

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _complete_captures(self) -> list[Path]:
        # A capture is complete once it ends with the blank line smtp-sink appends.
        paths = []
        for path in sorted(self.capture_dir.glob("msg.*"), key=lambda p: p.stat().st_mtime_ns):
            if path.read_bytes().endswith(b"\n\n"):
                paths.append(path)
        return paths

    def message_count(self) -> int:
        """Transactions whose final dot arrived (whatever smtp-sink answered to it)."""
        return len(self._complete_captures())

    def messages(self) -> list[CapturedMessage]:
        return [parse_capture(p.read_bytes(), p) for p in self._complete_captures()]

    def counters(self) -> dict[str, int]:
        """The last "-c" report: sess (sessions ended), quit (QUITs), mesg (final dots).

        smtp-sink prints it when a session ends, on QUIT and on each final dot; before the
        first such event every counter is 0.
        """
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        reports = [r for r in text.replace("\n", "\r").split("\r") if r.startswith("sess=")]
        if not reports:
            return {"sess": 0, "quit": 0, "mesg": 0}
        return {k: int(v) for k, v in (item.split("=") for item in reports[-1].split())}

    def wait_for_counter(self, name: str, value: int, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.counters()[name] >= value,
            timeout=timeout,
            what=f"smtp-sink {name} >= {value}",
        )
