"""A raw-socket SMTP client for byte-exact tests against a real relay process.

smtplib fixes up what it sends (line endings, dot-stuffing) and hides what it receives; here the
test writes exactly the bytes it means and reads the replies line by line. Every read waits with
a socket timeout, never a sleep. Also: a relay config with [smtp] limits, and a process's RSS.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any, Self

from tests.support.net import free_port
from tests.support.procfs import status_kib
from tests.support.relay import RelayProcess, relay_config

REPLY_TIMEOUT = 10.0


class Closed(Exception):
    """The server closed the connection (EOF or reset) before a complete reply line."""


class InboundRelay(RelayProcess):
    """A RelayProcess with [smtp] limits of the test's choosing, and its pid."""

    @classmethod
    def configured(
        cls,
        workdir: Path,
        upstream_port: int,
        smtp: dict[str, Any] | None = None,
        spool_options: dict[str, Any] | None = None,
    ) -> InboundRelay:
        workdir.mkdir(parents=True, exist_ok=True)
        smtp_port, http_port = free_port(), free_port()
        text = relay_config(
            workdir / "spool", smtp_port, http_port, upstream_port, smtp, **(spool_options or {})
        )
        return cls(workdir, text, smtp_port, http_port)

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


def rss_kib(pid: int) -> int:
    """VmRSS of a running process in KiB."""
    rss = status_kib(pid)
    assert rss is not None, f"no VmRSS for pid {pid}"
    return rss


class RawSMTP:
    """One TCP connection to 127.0.0.1:port; bytes go out exactly as given."""

    def __init__(self, port: int, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._buffer = b""
        self.eof = False

    # -- sending ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_lenient(self, data: bytes) -> bool:
        """Send, tolerating a server that closes meanwhile; False if it did."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    # -- receiving ----------------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        """Read once more; False on EOF or reset. socket.timeout propagates."""
        if self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buffer += chunk
        return True

    def line(self, timeout: float | None = None) -> bytes:
        """One reply line without its CRLF; Closed at EOF, TimeoutError when nothing comes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\r\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply line; have {self._buffer!r}")
            try:
                if not self._fill(remaining):
                    raise Closed(f"closed; unterminated rest {self._buffer!r}")
            except TimeoutError:
                raise TimeoutError(f"no complete reply line; have {self._buffer!r}") from None
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def reply(self, timeout: float | None = None) -> list[str]:
        """One reply: its lines (a multi-line reply continues while the 4th octet is '-')."""
        lines = []
        while True:
            raw = self.line(timeout)
            text = raw.decode("ascii")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def last(self, timeout: float | None = None) -> str:
        """The last line of the next reply (the one that carries the final code)."""
        return self.reply(timeout)[-1]

    def code(self, timeout: float | None = None) -> str:
        """'250 2.1.0' or '354': the code and, if present, the enhanced status code."""
        parts = self.last(timeout).split(" ")
        if len(parts) > 1 and parts[1][:1].isdigit() and parts[1].count(".") == 2:
            return f"{parts[0]} {parts[1]}"
        return parts[0]

    def codes(self, n: int, timeout: float | None = None) -> list[str]:
        return [self.code(timeout) for _ in range(n)]

    def closed(self, timeout: float = REPLY_TIMEOUT) -> bool:
        """True if the server closes the connection within ``timeout`` without saying anything
        more (if it does say something, AssertionError); False if it stays open that long."""
        deadline = time.monotonic() + timeout
        while True:
            if self._buffer:  # fail as soon as anything arrives, not at the deadline
                raise AssertionError(f"unexpected bytes from the server: {self._buffer!r}")
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                return self.eof
            try:
                self._fill(remaining)
            except TimeoutError:
                return False

    # -- convenience --------------------------------------------------------------------------

    def greet(self, name: bytes = b"tester") -> None:
        """Banner, then EHLO, both checked."""
        banner = self.last()
        assert banner.startswith("220 "), banner
        self.send(b"EHLO " + name + b"\r\n")
        assert self.last().startswith("250 "), "EHLO refused"

    def start_data(self, sender: bytes, recipients: list[bytes]) -> None:
        """MAIL, RCPTs and DATA in one write; each answered as expected."""
        lines = [b"MAIL FROM:<" + sender + b">"]
        lines += [b"RCPT TO:<" + r + b">" for r in recipients]
        self.send(b"".join(line + b"\r\n" for line in lines) + b"DATA\r\n")
        got = self.codes(len(lines) + 1)
        assert got == ["250 2.1.0"] + ["250 2.1.5"] * len(recipients) + ["354"], got

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stuff(body: bytes) -> bytes:
    """CRLF lines of ``body`` (which must end in CRLF) dot-stuffed and terminated for DATA."""
    assert body == b"" or body.endswith(b"\r\n")
    lines = body.split(b"\r\n")[:-1] if body else []
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
    ) + (b".\r\n")
