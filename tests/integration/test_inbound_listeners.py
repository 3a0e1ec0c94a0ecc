"""The inbound listeners of a real ``twistd`` relay: a UNIX socket with a file mode, a
``haproxy:`` listener fed PROXY v1 headers over raw sockets, and the connection limits under
200 connection attempts made at once (non-blocking sockets and a selector, no sleeps).

Every relay here captures into a Maildir in a temporary directory, listens on 127.0.0.1 only,
and reports its open sessions as ``mailrelay_smtp_open_connections`` at /metrics.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import shutil
import socket
import stat
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.support.net import free_port, wait_until
from tests.support.relay import RelayProcess, toml_value

pytestmark = pytest.mark.integration

HOSTNAME = "relay.test"
STORM = 200
DEADLINE = 8.0  # every connection of a storm is answered (or closed) within this


# -- the relay ---------------------------------------------------------------------------------


@attrs.define
class Relay:
    process: RelayProcess
    workdir: Path
    haproxy_port: int
    socket_path: Path

    @property
    def port(self) -> int:
        return self.process.smtp_port

    @property
    def maildir(self) -> Path:
        return self.workdir / "Maildir"

    def metric(self, name: str, missing: float | None = None) -> float:
        url = f"http://127.0.0.1:{self.process.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found and missing is not None:
            return missing
        assert found, f"no {name} in /metrics"
        return total

    def open_sessions(self) -> float:
        return self.metric("mailrelay_smtp_open_connections")

    def connections(self, result: str) -> float:
        """Counted so far (the start-up probe on the TCP port is one accepted connection)."""
        return self.metric(f'mailrelay_smtp_connections_total{{result="{result}"}}', 0.0)

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@pytest.fixture
def start_relay() -> Iterator[Callable[..., Relay]]:
    started: list[tuple[RelayProcess, Path]] = []

    def start(limits: dict[str, Any] | None = None, **smtp: Any) -> Relay:
        # A short directory: a UNIX socket's path must fit in 108 bytes.
        workdir = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
        smtp_port, http_port, haproxy_port = free_port(), free_port(), free_port()
        socket_path = workdir / "smtp.sock"
        smtp.setdefault("hostname", HOSTNAME)
        # backlog=256: with Twisted's default of 50, a burst of 200 overflows the kernel's
        # accept queue and the overflow waits for SYN-ACK retransmits (1 s, 3 s, 7 s...).
        smtp["listen"] = [
            f"tcp:{smtp_port}:interface=127.0.0.1:backlog=256",
            f"unix:{socket_path}:mode=660",
            f"haproxy:tcp:{haproxy_port}:interface=127.0.0.1:backlog=256",
        ]
        lines = ["[smtp]"] + [f"{k} = {_toml(v)}" for k, v in smtp.items()]
        lines += ["[limits]"] + [f"{k} = {_toml(v)}" for k, v in (limits or {}).items()]
        lines += [
            "[http]",
            f'listen = "tcp:{http_port}:interface=127.0.0.1"',
            "[spool]",
            f"path = {toml_value(str(workdir / 'spool'))}",
            "min_free_space = 0",
            "[[providers]]",
            'name = "local"',
            'kind = "maildir"',
            f"path = {toml_value(str(workdir / 'Maildir'))}",
        ]
        process = RelayProcess(workdir, "\n".join(lines) + "\n", smtp_port, http_port)
        started.append((process, workdir))
        process.start()
        return Relay(process, workdir, haproxy_port, socket_path)

    yield start
    for process, workdir in started:
        try:
            process.stop()
            log = process.log_path.read_text(errors="replace")
            assert "Traceback" not in log and "Unhandled" not in log, process.log_tail(80)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return toml_value(value)


# -- a small blocking SMTP client over any stream socket -----------------------------------------


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.buffer = b""

    @classmethod
    def tcp(cls, port: int, header: bytes = b"") -> Client:
        client = cls(socket.create_connection(("127.0.0.1", port), timeout=5))
        if header:
            client.sock.sendall(header)
        return client

    def line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(f"closed; have {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line.decode("ascii")

    def reply(self) -> list[str]:
        lines = [self.line()]
        while lines[-1][3:4] == "-":
            lines.append(self.line())
        return lines

    def command(self, text: str) -> list[str]:
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        return self.reply()

    def send_message(self, sender: str, recipient: str, body: str) -> list[str]:
        """EHLO to QUIT; returns every reply's last line."""
        codes = [self.command("EHLO app.example")[-1]]
        codes.append(self.command(f"MAIL FROM:<{sender}>")[-1])
        codes.append(self.command(f"RCPT TO:<{recipient}>")[-1])
        codes.append(self.command("DATA")[-1])
        codes.append(self.command(body.replace("\n", "\r\n") + "\r\n.")[-1])
        codes.append(self.command("QUIT")[-1])
        return codes

    def closed_silently(self) -> bool:
        """True when the server closes without sending anything (more)."""
        data = self.buffer + self.sock.recv(4096)
        assert data == b"", f"unexpected bytes: {data!r}"
        return True

    def close(self) -> None:
        self.sock.close()


def delivered(relay: Relay, count: int = 1) -> list[bytes]:
    new = relay.maildir / "new"
    wait_until(lambda: new.is_dir() and len(list(new.iterdir())) >= count, 10, what="delivery")
    return [p.read_bytes() for p in sorted(new.iterdir())]


def proxy_v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 2525\r\n".encode("ascii")


# -- UNIX socket ---------------------------------------------------------------------------------


def test_a_local_app_delivers_through_the_unix_socket(start_relay: Callable[..., Relay]) -> None:
    relay = start_relay()
    accepted = relay.connections("accepted")
    assert stat.S_ISSOCK(relay.socket_path.stat().st_mode)
    assert stat.S_IMODE(relay.socket_path.stat().st_mode) == 0o660
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(relay.socket_path))
    client = Client(sock)
    try:
        assert client.reply() == [f"220 {HOSTNAME} ESMTP mailrelay"]
        codes = client.send_message(
            "app@example.com", "you@example.org", "Subject: over unix\n\nhello\n"
        )
    finally:
        client.close()
    assert [c[:3] for c in codes] == ["250", "250", "250", "354", "250", "221"], codes
    [message] = delivered(relay)
    assert b"Subject: over unix\r\n" in message
    assert b"\r\nhello\r\n" in message
    assert relay.connections("accepted") == accepted + 1
    wait_until(lambda: relay.open_sessions() == 0, 5, what="session count back to 0")


# -- haproxy: -----------------------------------------------------------------------------------


def test_haproxy_listener_checks_the_client_in_the_header(
    start_relay: Callable[..., Relay],
) -> None:
    relay = start_relay(allow_networks=["10.0.0.0/8"])
    # A client in allow_networks, behind HAProxy on loopback: its address is the session's.
    client = Client.tcp(relay.haproxy_port, proxy_v1("10.1.2.3"))
    try:
        assert client.reply() == [f"220 {HOSTNAME} ESMTP mailrelay"]
        ehlo = client.command("EHLO app.example")
        assert ehlo[0] == f"250-{HOSTNAME} Hello app.example [10.1.2.3]", ehlo
        codes = client.send_message("app@example.com", "you@example.org", "Subject: px\n\nhi\n")
    finally:
        client.close()
    assert codes[-2].startswith("250 2.0.0"), codes
    [message] = delivered(relay)
    assert re.search(rb"Received: from app\.example \(\[10\.1\.2\.3\]\)", message), message[:300]

    # A client outside allow_networks, no header, a garbage header: closed, no banner.
    for header in (proxy_v1("192.0.2.1"), b"EHLO direct\r\n", b"PROXY TCP4 nonsense\r\n"):
        client = Client.tcp(relay.haproxy_port, header)
        try:
            assert client.closed_silently()
        finally:
            client.close()
    assert relay.connections("refused_nonlocal") == 1
    assert relay.connections("refused_proxy_header") == 2
    # From loopback, as HAProxy on this machine would say for a local client.
    client = Client.tcp(relay.haproxy_port, proxy_v1("127.0.0.1"))
    try:
        assert client.reply() == [f"220 {HOSTNAME} ESMTP mailrelay"]
    finally:
        client.close()
    wait_until(lambda: relay.open_sessions() == 0, 5, what="session count back to 0")


# -- 200 connection attempts at once --------------------------------------------------------------


@attrs.define(eq=False)
class Attempt:
    sock: socket.socket
    header: bytes
    connected: bool = False
    data: bytes = b""
    eof: bool = False

    @property
    def first_line(self) -> str:
        return self.data.split(b"\r\n", 1)[0].decode("ascii", "replace")

    @property
    def settled(self) -> bool:
        """A 220 (the session stays open), or a refusal read to its close."""
        if b"\r\n" in self.data and self.data.startswith(b"220 "):
            return True
        return self.eof


def storm(port: int, headers: list[bytes]) -> list[Attempt]:
    """One connection per header, all started before any is answered; each is read until it
    has its banner, or has been closed. The 220 ones are left open (the caller closes them)."""
    selector = selectors.DefaultSelector()
    attempts: list[Attempt] = []
    try:
        for header in headers:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(("127.0.0.1", port))
            assert err in (0, errno.EINPROGRESS), os.strerror(err)
            attempt = Attempt(sock, header)
            attempts.append(attempt)
            selector.register(sock, selectors.EVENT_WRITE, attempt)
        deadline = time.monotonic() + DEADLINE
        pending = len(attempts)
        while pending:
            remaining = deadline - time.monotonic()
            unsettled = [a.first_line or "(nothing)" for a in attempts if not a.settled]
            assert remaining > 0, f"{pending} unsettled, e.g. {unsettled[:5]}"
            for key, events in selector.select(remaining):
                attempt = key.data
                if events & selectors.EVENT_WRITE and not attempt.connected:
                    err = attempt.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert err == 0, os.strerror(err)
                    attempt.connected = True
                    if attempt.header:
                        attempt.sock.send(attempt.header)  # a few bytes: never blocks
                    selector.modify(attempt.sock, selectors.EVENT_READ, attempt)
                    continue
                try:
                    chunk = attempt.sock.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    attempt.data += chunk
                else:
                    attempt.eof = True
                if attempt.settled:
                    selector.unregister(attempt.sock)
                    pending -= 1
    except BaseException:
        for attempt in attempts:
            attempt.sock.close()
        raise
    finally:
        selector.close()
    return attempts


def close_all(attempts: list[Attempt]) -> None:
    for attempt in attempts:
        attempt.sock.close()


def check_recovery(relay: Relay, port: int, header: bytes = b"") -> None:
    """Every session closed: the count is back to 0 and a new client gets its banner."""
    wait_until(lambda: relay.open_sessions() == 0, 5, what="open sessions back to 0")
    client = Client.tcp(port, header)
    try:
        assert client.reply() == [f"220 {HOSTNAME} ESMTP mailrelay"]
        assert client.command("QUIT")[0].startswith("221")
    finally:
        client.close()


def test_max_connections_holds_under_200_attempts(start_relay: Callable[..., Relay]) -> None:
    """Clients behind HAProxy, 10 connections from each of 20 addresses: no client is over
    limits.connections_per_peer, so only smtp.max_connections refuses, and exactly 50 are in."""
    relay = start_relay(
        {"connections_per_peer": 10}, max_connections=50, allow_networks=["10.0.0.0/8"]
    )
    headers = [proxy_v1(f"10.0.0.{1 + i % 20}", 20000 + i) for i in range(STORM)]
    accepted = relay.connections("accepted")
    attempts = storm(relay.haproxy_port, headers)
    try:
        lines = [a.first_line for a in attempts]
        admitted = [a for a in attempts if a.first_line.startswith("220 ")]
        refused = [a for a in attempts if a not in admitted]
        assert len(admitted) == 50, sorted(set(lines))
        assert {a.first_line for a in refused} == {
            f"421 4.7.0 {HOSTNAME} Too many connections, try again later"
        }
        assert all(a.eof for a in refused)
        assert relay.open_sessions() == 50
        assert relay.connections("refused_limit") == STORM - 50
        assert relay.connections("accepted") == accepted + 50
    finally:
        close_all(attempts)
    check_recovery(relay, relay.haproxy_port, proxy_v1("10.0.0.99"))
    assert relay.process._proc is not None and relay.process._proc.poll() is None


def test_connections_per_peer_holds_under_200_attempts(start_relay: Callable[..., Relay]) -> None:
    """All from 127.0.0.1, one client: limits.connections_per_peer (20) refuses before
    smtp.max_connections (50) would."""
    relay = start_relay({"connections_per_peer": 20}, max_connections=50)
    attempts = storm(relay.port, [b""] * STORM)
    try:
        admitted = [a for a in attempts if a.first_line.startswith("220 ")]
        refused = [a for a in attempts if a not in admitted]
        assert len(admitted) == 20, sorted({a.first_line for a in attempts})
        assert {a.first_line for a in refused} == {
            f"421 4.7.0 {HOSTNAME} Too many connections from your address, try again later"
        }
        assert all(a.eof for a in refused)
        assert relay.open_sessions() == 20
        assert relay.connections("refused_peer_limit") == STORM - 20
    finally:
        close_all(attempts)
    check_recovery(relay, relay.port)


def test_max_connections_holds_for_one_local_client(start_relay: Callable[..., Relay]) -> None:
    """connections_per_peer off: 200 at once on plain TCP, exactly max_connections get in."""
    relay = start_relay({"connections_per_peer": 0}, max_connections=50)
    attempts = storm(relay.port, [b""] * STORM)
    try:
        admitted = [a for a in attempts if a.first_line.startswith("220 ")]
        assert len(admitted) == 50, sorted({a.first_line for a in attempts})
        assert all(
            a.first_line == f"421 4.7.0 {HOSTNAME} Too many connections, try again later" and a.eof
            for a in attempts
            if a not in admitted
        )
        assert relay.open_sessions() == 50
    finally:
        close_all(attempts)
    check_recovery(relay, relay.port)
