"""A small TCP proxy that injects faults between an SMTP client and a real upstream.

It runs in a thread of its own with plain non-blocking sockets and a selector, so it never
touches the Twisted reactor of the test that drives the client. Loopback only.

    with FaultProxy(upstream.port, mode="reset", at="final-dot") as proxy:
        ... connect the client to ("127.0.0.1", proxy.port) ...
        proxy.connection_count        # TCP connections accepted so far
        proxy.records()               # what each connection carried (ConnectionRecord)

Modes:

    "pass"                   forward both ways, untouched
    "reset"                  at the trigger `at`, send the client a TCP RST (SO_LINGER 0)
    "stall"                  at the trigger `at`, stop forwarding both ways; keep both sockets
                             open, reading and discarding, until the client goes away
    "inject_after_starttls"  when the server answers STARTTLS with 220, send `inject` right
                             after that line in the same write (same TCP segment)
    "strip_starttls"         remove STARTTLS from the server's EHLO reply

Triggers (`at`, for "reset" and "stall"), each fired at most once per connection:

    "connect"          as soon as the connection is accepted, before anything is forwarded
                       (the upstream is not even connected: a stall here is a silent greeting)
    "server:<prefix>"  after forwarding the first server line starting with <prefix>
                       ("server:220" is the greeting, "server:354" the go-ahead for DATA)
    "client:<prefix>"  after forwarding the first client command line starting with <prefix>
                       (case-insensitive, e.g. "client:MAIL")
    "bytes:<N>"        after forwarding exactly N bytes from the client
    "final-dot"        after forwarding the client's end of data (the line ".")
    "starttls"         after forwarding the server's 220 reply to STARTTLS

After a reset the upstream side is kept until the upstream's next reply (so a final dot
that reached it is processed and answered, as when a reply is lost on the way back), then
closed. Lines are parsed only before TLS starts; after STARTTLS every byte passes raw.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import struct
import threading
from typing import Literal, Self

import attrs

from tests.support.process import ServerHandle

Mode = Literal["pass", "reset", "stall", "inject_after_starttls", "strip_starttls"]
MODES: tuple[Mode, ...] = ("pass", "reset", "stall", "inject_after_starttls", "strip_starttls")
DEFAULT_INJECT = b"250 injected\r\n"
LOOPBACK = ("127.0.0.1", "::1")

_TRIGGER = re.compile(rb"^(connect|final-dot|starttls|server:.+|client:.+|bytes:\d+)$")
_STARTTLS_EXTENSION = re.compile(rb"^250[- ]STARTTLS\s*$", re.IGNORECASE)


@attrs.frozen
class ConnectionRecord:
    """What one proxied connection carried, as the proxy saw it."""

    serial: int  # 1-based, in accept order
    client_bytes: bytes  # everything the client sent (after STARTTLS: TLS records)
    client_plaintext: bytes  # what the client sent before TLS started (all of it without TLS)
    server_bytes: bytes  # what the proxy sent to the client (after stripping / injection)
    triggered: bool  # the fault fired on this connection
    tls_started: bool  # the server answered STARTTLS with 220
    open: bool  # the client side is still connected

    def client_lines(self) -> list[bytes]:
        """The client's plaintext split into lines (CRLF removed)."""
        return self.client_plaintext.split(b"\r\n")


class _Side:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.closed = False
        self.close_after_flush = False


class _Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, serial: int) -> None:
        self.proxy = proxy
        self.serial = serial
        self.client = _Side(client)
        self.server: _Side | None = None
        self.client_in = bytearray()  # client bytes not yet forwarded (partial line)
        self.server_in = bytearray()  # server bytes not yet forwarded (partial line)
        self.client_log = bytearray()
        self.client_plain = bytearray()
        self.server_log = bytearray()
        self.forwarded_client_bytes = 0
        self.tls = False
        self.expect_starttls_reply = False
        self.in_data = False
        self.held_continuation: bytes | None = None  # strip_starttls: a "250-" line held back
        self.triggered = False
        self.stalled = False
        self.reset_done = False  # client reset; the server side is draining
        self.lock = threading.Lock()

    # -- bookkeeping ------------------------------------------------------------------------

    def record(self) -> ConnectionRecord:
        with self.lock:
            return ConnectionRecord(
                serial=self.serial,
                client_bytes=bytes(self.client_log),
                client_plaintext=bytes(self.client_plain),
                server_bytes=bytes(self.server_log),
                triggered=self.triggered,
                tls_started=self.tls,
                open=not self.client.closed,
            )

    @property
    def finished(self) -> bool:
        return self.client.closed and (self.server is None or self.server.closed)


class FaultProxy(ServerHandle):
    """See the module docstring. Start with start() or a with block; stop() is idempotent."""

    def __init__(
        self,
        target_port: int,
        *,
        mode: Mode = "pass",
        at: str | None = None,
        inject: bytes = DEFAULT_INJECT,
        target_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        if host not in LOOPBACK or target_host not in LOOPBACK:
            raise ValueError("the fault proxy only listens on and connects to loopback")
        if mode in ("reset", "stall"):
            if at is None or not _TRIGGER.match(at.encode()):
                raise ValueError(f"mode {mode!r} needs a trigger `at`, got {at!r}")
        elif at is not None:
            raise ValueError(f"mode {mode!r} takes no trigger")
        self.mode = mode
        self.at = at
        self.inject = inject
        self.target = (target_host, target_port)
        self.host = host
        self._connect_timeout = connect_timeout
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []  # unexpected exceptions in the proxy thread

    # -- public API -----------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def open_connections(self) -> int:
        """Connections whose client side is still open."""
        with self._lock:
            return sum(1 for c in self._connections if not c.client.closed)

    def records(self) -> list[ConnectionRecord]:
        with self._lock:
            connections = list(self._connections)
        return [c.record() for c in connections]

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection (politely: FIN, not RST) and join the
        thread."""
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("fault proxy thread did not stop")
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the proxy thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(timeout=1.0):
                    if key.data == "wake":
                        continue
                    if key.data == "accept":
                        self._accept()
                        continue
                    conn, which = key.data
                    try:
                        self._service(conn, which, events)
                    except Exception as e:  # keep serving the others; tests check .errors
                        self.errors.append(f"connection {conn.serial}: {e!r}")
                        self._close_all(conn)
        finally:
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                self._close_all(conn)
            if self._listener is not None:
                self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = _Connection(self, client, len(self._connections) + 1)
                self._connections.append(conn)
            if self.at == "connect":
                self._fire(conn)
                if self.mode == "reset":
                    continue
            else:
                try:
                    upstream = socket.create_connection(self.target, timeout=self._connect_timeout)
                except OSError as e:
                    self.errors.append(f"connection {conn.serial}: upstream: {e!r}")
                    conn.client.closed = True
                    client.close()
                    continue
                upstream.setblocking(False)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.server = _Side(upstream)
                self._selector.register(upstream, selectors.EVENT_READ, (conn, "server"))
            self._selector.register(client, selectors.EVENT_READ, (conn, "client"))

    def _service(self, conn: _Connection, which: str, events: int) -> None:
        side = conn.client if which == "client" else conn.server
        assert side is not None
        if side.closed:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(conn, side)
        if side.closed or not events & selectors.EVENT_READ:
            return
        try:
            data = side.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_all(conn)
            return
        if which == "client":
            with conn.lock:
                conn.client_log += data
                if not conn.tls:
                    conn.client_plain += data
            if conn.stalled or conn.reset_done:
                return
            self._from_client(conn, data)
        else:
            if conn.reset_done:
                # The reply to what reached the upstream before the reset: now it may go.
                if data.endswith(b"\n"):
                    self._close_side(conn, side)
                return
            if conn.stalled:
                return
            self._from_server(conn, data)

    # -- client to server -----------------------------------------------------------------------

    def _from_client(self, conn: _Connection, data: bytes) -> None:
        assert conn.server is not None
        if conn.tls:
            self._send(conn, conn.server, data)
            return
        conn.client_in += data
        while not conn.stalled and not conn.reset_done:
            end = conn.client_in.find(b"\n")
            if end < 0:
                return
            line = bytes(conn.client_in[: end + 1])
            del conn.client_in[: end + 1]
            fire = False
            if self.at is not None and self.at.startswith("bytes:"):
                limit = int(self.at[6:])
                room = limit - conn.forwarded_client_bytes
                if 0 <= room <= len(line) and not conn.triggered:
                    line, fire = line[:room], True
            if conn.in_data:
                if line == b".\r\n":
                    conn.in_data = False
                    fire = fire or self.at == "final-dot"
            else:
                upper = line.upper()
                if upper.startswith(b"STARTTLS"):
                    conn.expect_starttls_reply = True
                if self.at is not None and self.at.startswith("client:"):
                    fire = fire or upper.startswith(self.at[7:].upper().encode())
            conn.forwarded_client_bytes += len(line)
            self._send(conn, conn.server, line)
            if fire:
                self._fire(conn)

    # -- server to client -----------------------------------------------------------------------

    def _from_server(self, conn: _Connection, data: bytes) -> None:
        if conn.tls:
            self._send(conn, conn.client, data)
            return
        conn.server_in += data
        while not conn.stalled and not conn.reset_done and not conn.tls:
            end = conn.server_in.find(b"\n")
            if end < 0:
                return
            line = bytes(conn.server_in[: end + 1])
            del conn.server_in[: end + 1]
            self._server_line(conn, line)
        if conn.tls and conn.server_in:
            rest, conn.server_in = bytes(conn.server_in), bytearray()
            self._send(conn, conn.client, rest)

    def _server_line(self, conn: _Connection, line: bytes) -> None:
        fire = False
        out = line
        if self.mode == "strip_starttls":
            if _STARTTLS_EXTENSION.match(line):
                if line[3:4] == b" " and conn.held_continuation is not None:
                    # STARTTLS was the last line: the held one becomes the last.
                    last = b"250 " + conn.held_continuation[4:]
                    conn.held_continuation = None
                    self._send(conn, conn.client, last)
                return
            if conn.held_continuation is not None:
                self._send(conn, conn.client, conn.held_continuation)
                conn.held_continuation = None
            if line.startswith(b"250-"):
                conn.held_continuation = line
                return
        if conn.expect_starttls_reply and line[:3].isdigit():
            conn.expect_starttls_reply = False
            if line.startswith(b"220"):
                if self.mode == "inject_after_starttls":
                    out = line + self.inject
                with conn.lock:
                    conn.tls = True
                fire = self.at == "starttls"
        elif line.startswith(b"354"):
            conn.in_data = True
        if self.at is not None and self.at.startswith("server:"):
            fire = fire or line.startswith(self.at[7:].encode())
        self._send(conn, conn.client, out)
        if fire:
            self._fire(conn)

    # -- faults ---------------------------------------------------------------------------------

    def _fire(self, conn: _Connection) -> None:
        if conn.triggered:
            return
        with conn.lock:
            conn.triggered = True
        if self.mode == "stall":
            conn.stalled = True
            return
        if self.mode == "reset":
            self._reset_client(conn)

    def _reset_client(self, conn: _Connection) -> None:
        side = conn.client
        self._flush(conn, side)
        if not side.closed:
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            with contextlib.suppress(OSError):
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._close_side(conn, side)
        conn.reset_done = True
        if conn.server is not None and not conn.server.closed:
            self._flush(conn, conn.server)

    # -- socket plumbing ------------------------------------------------------------------------

    def _send(self, conn: _Connection, side: _Side, data: bytes) -> None:
        if side.closed or not data:
            return
        if side is conn.client:
            with conn.lock:
                conn.server_log += data
        side.out += data
        self._flush(conn, side)

    def _flush(self, conn: _Connection, side: _Side) -> None:
        while side.out and not side.closed:
            try:
                sent = side.sock.send(side.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close_all(conn)
                return
            del side.out[:sent]
        if side.closed:
            return
        which = "client" if side is conn.client else "server"
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if side.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(side.sock, events, (conn, which))

    def _close_side(self, conn: _Connection, side: _Side) -> None:
        if side.closed:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(side.sock)
        with conn.lock:
            side.closed = True
        side.sock.close()

    def _close_all(self, conn: _Connection) -> None:
        for side in (conn.client, conn.server):
            if side is not None and not side.closed:
                if side.out:
                    # Best effort: what was already forwarded should still arrive.
                    with contextlib.suppress(OSError):
                        side.sock.send(side.out)
                self._close_side(conn, side)
