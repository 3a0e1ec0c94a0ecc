"""A real upstream SMTP server (aiosmtpd) for tests and benchmarks, run as its own process.

Run it from the repository root, either way:

    python -m tests.support.upstream --host 127.0.0.1 --port 0 --out DIR
    python tests/support/upstream.py --host 127.0.0.1 --port 0 --out DIR

Optional faults: ``--reply-rcpt-4xx-prefix S`` answers "451 4.3.0 try later" to every
recipient whose address starts with S; ``--reply-data-4xx-every N`` answers the same to every
Nth DATA (1-based over the life of the process) and does not store that message.

TLS: ``--tls-cert``/``--tls-key`` offer STARTTLS (and require it before MAIL); add
``--implicit-tls`` to speak TLS from the first byte instead (port 465 style: the listening
socket is wrapped, no STARTTLS is offered, AUTH is allowed since the whole session is TLS).
``--tls-client-ca PEM`` requires a client certificate signed by that CA (mutual TLS).

Scripted faults (each applies to every connection):

    --greeting "421 4.3.2 busy"   greet with this instead of 220: a 4xx closes at once; a 5xx
                                  answers 503 to everything until QUIT (RFC 5321 3.1)
    --reply MAIL="451 4.3.0 x"    answer MAIL with this (repeatable; keys MAIL, RCPT,
    --reply RCPT:bad-="550 5.1.1 x"   RCPT:<address prefix>, DATA = the DATA command itself,
    --reply DOT="554 5.6.0 x"     DOT = after the final dot, the message is then not stored)
                                  A reply starting with 421 closes the connection after it.
    --hang-at POINT               greeting: never greet; data-command: never answer DATA;
                                  data: send 354, then never read the body; final: store the
                                  message but never answer the final dot
    --reject-auth                 every AUTH gets 535 (with or without --auth)
    --auth-in-clear               offer and accept AUTH before TLS (STARTTLS, if configured,
                                  becomes optional): a bait for a client that must not

What it leaves in DIR:

    ready                 written atomically once the socket listens; holds the bound port
    connections           one line "<serial> <peer>" per accepted TCP connection (flushed)
    messages/<seq>.eml    the DATA content exactly as received, after dot-unstuffing
    messages/<seq>.json   {"mail_from", "rcpt_tos", "connection", "size"}, written last
    auth                  one line "<connection> <tls|clear> <MECHANISM>" per AUTH command
                          received (never its arguments)
    upstream.log          stdout/stderr, when started through UpstreamProcess

Both message files appear via write-to-temp + rename, the .json after the .eml, so a reader
that sees <seq>.json can always read a complete <seq>.eml. The 250 reply to DATA is sent only
after both files exist, so a client that got 250 can look for the files at once.

The server half of this module imports only the standard library and aiosmtpd, so that the
script form works even where the `tests` package is not importable. The client half
(UpstreamProcess) comes after the `__main__` guard, which the script form never gets past, and
may import from tests.support.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, Self

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

TRY_LATER = "451 4.3.0 try later"

# aiosmtpd counts DATA bytes as they arrive on the wire (dot-stuffed, CRLF included) against
# this limit, so leave headroom above the 60 MB messages the tests need.
DATA_SIZE_LIMIT = 100 * 1024 * 1024

# Passed explicitly: aiosmtpd otherwise calls socket.getfqdn() for every connection, which can
# stall on a machine with slow or broken DNS.
SERVER_HOSTNAME = "upstream.localhost"

REPO_ROOT = Path(__file__).resolve().parents[2]

REPLY_KEYS = ("MAIL", "RCPT", "DATA", "DOT")
HANG_POINTS = ("greeting", "data-command", "data", "final")


class Faults(NamedTuple):
    """Scripted misbehaviour; the default is none."""

    greeting: str | None = None
    # (key, reply): key is MAIL, RCPT, RCPT:<prefix>, DATA or DOT (see the module docstring).
    replies: tuple[tuple[str, str], ...] = ()
    hang_at: str | None = None
    reject_auth: bool = False

    def reply(self, key: str) -> str | None:
        for k, reply in self.replies:
            if k == key:
                return reply
        return None

    def rcpt_reply(self, address: str) -> str | None:
        """The most specific configured reply for this recipient (longest prefix wins)."""
        best: tuple[int, str] | None = None
        for k, reply in self.replies:
            matches = k.startswith("RCPT:") and address.startswith(k[5:])
            if matches and (best is None or len(k) > best[0]):
                best = (len(k), reply)
        return best[1] if best is not None else self.reply("RCPT")


def parse_reply_option(text: str) -> tuple[str, str]:
    """ "MAIL=451 4.3.0 later" -> ("MAIL", "451 4.3.0 later"); checks the key and the code."""
    key, sep, reply = text.partition("=")
    base, colon, prefix = key.partition(":")
    base = base.upper()
    if not sep or base not in REPLY_KEYS or (colon and base != "RCPT"):
        raise ValueError(
            f"bad --reply {text!r}: want KEY=REPLY, KEY one of {REPLY_KEYS} or RCPT:<prefix>"
        )
    if not (len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "2345"):
        raise ValueError(f"bad --reply {text!r}: the reply must start with a 3-digit code")
    return (f"RCPT:{prefix}" if colon else base), reply


async def _forever() -> None:
    """Wait until cancelled (aiosmtpd cancels the session's task when the client leaves)."""
    await asyncio.get_running_loop().create_future()


def _atomic_write(path: Path, data: bytes) -> None:
    # The temporary name starts with a dot and does not end in .eml/.json, so readers that
    # glob for finished files never see a half-written one.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Recorder:
    """aiosmtpd handler that records connections and messages into the output directory.

    aiosmtpd finds the hooks by name (handle_EHLO, handle_RCPT, handle_DATA). Everything runs
    on the single event-loop thread, so the counters need no locking.
    """

    def __init__(
        self,
        out: Path,
        rcpt_4xx_prefix: str | None,
        data_4xx_every: int | None,
        faults: Faults | None = None,
    ):
        self.faults = faults or Faults()
        self.messages_dir = out / "messages"
        self.messages_dir.mkdir(parents=True, exist_ok=True)
        self._rcpt_4xx_prefix = rcpt_4xx_prefix
        self._data_4xx_every = data_4xx_every
        self._data_commands = 0
        # Continue the numbering if the directory is reused, so a restart never overwrites.
        self._seq = max((int(p.stem) for p in self.messages_dir.glob("*.json")), default=0)
        connections_path = out / "connections"
        existing = connections_path.read_bytes() if connections_path.exists() else b""
        self._connection_serial = existing.count(b"\n")
        self._connections = connections_path.open("a", encoding="utf-8")
        self._auth = (out / "auth").open("a", encoding="utf-8")

    def close(self) -> None:
        self._connections.close()
        self._auth.close()

    def auth_received(self, connection: int, tls: bool, mechanism: str) -> None:
        """Record one AUTH command: its connection, whether it came over TLS, the mechanism."""
        word = mechanism if mechanism.isalnum() or "-" in mechanism else "?"
        self._auth.write(f"{connection} {'tls' if tls else 'clear'} {word[:20].upper()}\n")
        self._auth.flush()

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> Any:
        # MISSING lets aiosmtpd do its own bookkeeping and answer 250.
        return self.faults.reply("MAIL") or MISSING

    def connection_opened(self, peer: object) -> int:
        """Record a new TCP connection and return its serial number (1-based)."""
        self._connection_serial += 1
        self._connections.write(f"{self._connection_serial} {peer}\n")
        self._connections.flush()
        return self._connection_serial

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd 1.4 handles pipelined commands but does not advertise PIPELINING; add it
        # before the final "250 HELP" line.
        # With this 5-argument hook aiosmtpd no longer records the client name itself, and
        # would then answer MAIL with "503 Error: send HELO first".
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._rcpt_4xx_prefix and address.startswith(self._rcpt_4xx_prefix):
            return TRY_LATER
        scripted = self.faults.rcpt_reply(address)
        if scripted is not None and not scripted.startswith("2"):
            return scripted
        # A RCPT hook replaces aiosmtpd's default bookkeeping, so record the recipient here.
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._data_commands += 1
        if self._data_4xx_every and self._data_commands % self._data_4xx_every == 0:
            return TRY_LATER
        scripted = self.faults.reply("DOT")
        if scripted is not None:
            return scripted
        # original_content is the dot-unstuffed DATA with line endings untouched (we run with
        # decode_data=False; `content` would be the same bytes here).
        content = envelope.original_content
        assert content is not None
        assert isinstance(server, CountingSMTP)
        self._seq += 1
        name = f"{self._seq:06d}"
        # Synchronous writes block the loop briefly; fine for a test server, and it keeps the
        # "250 means the files exist" guarantee trivially true.
        _atomic_write(self.messages_dir / f"{name}.eml", content)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "connection": server.connection_serial,
            "size": len(content),
        }
        _atomic_write(self.messages_dir / f"{name}.json", json.dumps(meta).encode())
        if self.faults.hang_at == "final":
            # Stored, never acknowledged: the reply to the final dot is lost.
            await _forever()
        return "250 OK"


class CountingSMTP(SMTP):
    """aiosmtpd's SMTP protocol, numbering each TCP connection it serves."""

    def __init__(self, recorder: Recorder, implicit_tls: bool = False, **kwargs: Any) -> None:
        super().__init__(recorder, **kwargs)
        self.recorder = recorder
        self.connection_serial = 0
        self._implicit_tls = implicit_tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS on the same TCP connection (same protocol
        # object): count only the first call.
        if self.connection_serial == 0:
            peer = transport.get_extra_info("peername")
            self.connection_serial = self.recorder.connection_opened(peer)
        super().connection_made(transport)

    # The overrides below only act when a fault is configured.

    async def _handle_client(self) -> None:
        faults = self.recorder.faults
        if faults.hang_at == "greeting":
            await _forever()
            return
        if faults.greeting is None:
            await super()._handle_client()
            return
        await self.push(faults.greeting)
        if faults.greeting.startswith("4"):
            return  # push() has closed the connection
        # 5xx: "MUST still wait for the client to send a QUIT" and answer 503 meanwhile.
        while self.transport is not None:
            line = await self._reader.readuntil()
            if line.strip().upper() == b"QUIT":
                await self.push("221 Bye")
                self.transport.close()
                return
            await self.push("503 5.5.1 Error: no service")

    async def push(self, status: Any) -> None:
        await super().push(status)
        text = status.decode() if isinstance(status, bytes) else status
        faults = self.recorder.faults
        closing = text.startswith("421") or (
            faults.greeting is not None
            and faults.greeting.startswith("4")
            and text == faults.greeting
        )
        if closing and self.transport is not None:
            self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        faults = self.recorder.faults
        scripted = faults.reply("DATA")
        envelope = self.envelope
        if envelope is not None and envelope.rcpt_tos and not arg:
            if scripted is not None:
                await self.push(scripted)
                return
            if faults.hang_at == "data-command":
                await _forever()
                return
            if faults.hang_at == "data":
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                await _forever()  # never read the body, never answer
                return
        await super().smtp_DATA(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        mechanism = (arg or "").split(" ", 1)[0]
        tls = self._implicit_tls or self._tls_protocol is not None
        self.recorder.auth_received(self.connection_serial, tls, mechanism)
        await super().smtp_AUTH(arg)


class _Credentials:
    """aiosmtpd authenticator accepting exactly one user name and password."""

    def __init__(self, user: str, password: str, reject_all: bool = False) -> None:
        self._user = user.encode()
        self._password = password.encode()
        self._reject_all = reject_all

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        ok = (
            not self._reject_all
            and isinstance(data, LoginPassword)
            and data.login == self._user
            and data.password == self._password
        )
        return AuthResult(success=ok, handled=False)


async def serve(
    host: str,
    port: int,
    out: Path,
    rcpt_4xx_prefix: str | None = None,
    data_4xx_every: int | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    auth: tuple[str, str] | None = None,
    implicit_tls: bool = False,
    faults: Faults | None = None,
    auth_in_clear: bool = False,
    tls_client_ca: Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    faults = faults or Faults()
    recorder = Recorder(out, rcpt_4xx_prefix, data_4xx_every, faults)
    options: dict[str, Any] = {}
    server_ssl: ssl.SSLContext | None = None
    if tls_cert is not None and tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)
        if tls_client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(tls_client_ca))
        if implicit_tls:
            # TLS is the listening socket's business; aiosmtpd must not offer STARTTLS.
            server_ssl = context
        else:
            options.update(tls_context=context, require_starttls=not auth_in_clear)
    if auth is not None or faults.reject_auth:
        # AUTH is offered only after STARTTLS when STARTTLS is configured (aiosmtpd's
        # default). With implicit TLS aiosmtpd does not know the session is TLS (it only
        # tracks its own STARTTLS), but every byte of it is: allow AUTH.
        user, password = auth or ("", "")
        options.update(
            authenticator=_Credentials(user, password, reject_all=faults.reject_auth),
            auth_require_tls=tls_cert is not None and not implicit_tls and not auth_in_clear,
        )
    elif auth_in_clear:
        options.update(auth_require_tls=False)

    def factory() -> SMTP:
        return CountingSMTP(
            recorder,
            implicit_tls=implicit_tls,
            data_size_limit=DATA_SIZE_LIMIT,
            decode_data=False,
            hostname=SERVER_HOSTNAME,
            loop=loop,
            **options,
        )

    server = await loop.create_server(factory, host=host, port=port, ssl=server_ssl)
    bound_port: int = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _atomic_write(out / "ready", f"{bound_port}\n".encode())
    print(f"upstream listening on {host}:{bound_port}, writing to {out}", flush=True)
    await stop.wait()
    server.close()
    recorder.close()
    # asyncio.run() cancels the per-connection tasks that are still running; a message whose
    # DATA was not complete is neither stored nor acknowledged.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 or ::1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (see DIR/ready)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--reply-rcpt-4xx-prefix", metavar="S", default=None)
    parser.add_argument("--reply-data-4xx-every", metavar="N", type=_positive_int, default=None)
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM chain: offer STARTTLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM key for --tls-cert")
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=None, help="require AUTH")
    parser.add_argument(
        "--implicit-tls",
        action="store_true",
        help="TLS from the first byte (with --tls-cert/--tls-key), no STARTTLS",
    )
    parser.add_argument(
        "--tls-client-ca", type=Path, default=None, help="require a client cert from this CA"
    )
    parser.add_argument("--greeting", default=None, help='e.g. "421 4.3.2 busy" (4xx/5xx)')
    parser.add_argument(
        "--reply",
        metavar="KEY=REPLY",
        action="append",
        default=[],
        help="KEY: MAIL, RCPT, RCPT:<prefix>, DATA or DOT (repeatable)",
    )
    parser.add_argument("--hang-at", choices=HANG_POINTS, default=None)
    parser.add_argument("--reject-auth", action="store_true", help="535 to every AUTH")
    parser.add_argument(
        "--auth-in-clear", action="store_true", help="offer and accept AUTH before TLS"
    )
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1"):
        parser.error("only loopback (127.0.0.1 or ::1) is allowed")
    if args.implicit_tls and (args.tls_cert is None or args.tls_key is None):
        parser.error("--implicit-tls needs --tls-cert and --tls-key")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.greeting is not None and not (args.greeting[:3].isdigit() and args.greeting[0] in "45"):
        parser.error("--greeting must be a 4xx or 5xx reply")
    try:
        replies = tuple(parse_reply_option(text) for text in args.reply)
    except ValueError as e:
        parser.error(str(e))
    faults = Faults(args.greeting, replies, args.hang_at, args.reject_auth)
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(
        serve(
            args.host,
            args.port,
            args.out,
            args.reply_rcpt_4xx_prefix,
            args.reply_data_4xx_every,
            args.tls_cert,
            args.tls_key,
            tuple(args.auth.split(":", 1)) if args.auth else None,
            args.implicit_tls,
            faults,
            args.auth_in_clear,
            args.tls_client_ca,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

# -- the client half: never reached by the script form (sys.exit above) ------------------------

from tests.support.net import wait_until  # noqa: E402
from tests.support.process import ServerProcess  # noqa: E402


def run_script(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the script form, `python tests/support/upstream.py ARGS` from the repository root
    (`tests` is then not on sys.path), to completion; its output is captured."""
    return subprocess.run(
        [sys.executable, "tests/support/upstream.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
    )


class UpstreamProcess(ServerProcess):
    """Runs the server above in a subprocess; a context manager for tests and benchmarks.

    With port=0 (the default) the child binds a free port itself and reports it in DIR/ready,
    which avoids the race of picking a port here and binding it there. Readiness is that file,
    not a probe connection, because a probe would show up in connection_count().
    """

    def __init__(
        self,
        out: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rcpt_4xx_prefix: str | None = None,
        data_4xx_every: int | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        auth: tuple[str, str] | None = None,
        implicit_tls: bool = False,
        startup_timeout: float = 10.0,
        greeting: str | None = None,
        replies: dict[str, str] | None = None,
        hang_at: str | None = None,
        reject_auth: bool = False,
        auth_in_clear: bool = False,
        tls_client_ca: Path | None = None,
    ) -> None:
        self._tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        if implicit_tls and self._tls is None:
            raise ValueError("implicit_tls needs tls_cert and tls_key")
        if hang_at is not None and hang_at not in HANG_POINTS:
            raise ValueError(f"hang_at must be one of {HANG_POINTS}")
        self._greeting = greeting
        self._replies = dict(replies or {})
        self._hang_at = hang_at
        self._reject_auth = reject_auth
        self._auth_in_clear = auth_in_clear
        self._tls_client_ca = tls_client_ca
        self._implicit_tls = implicit_tls
        self._auth = auth
        self.host = host
        self._requested_port = port
        self._rcpt_4xx_prefix = rcpt_4xx_prefix
        self._data_4xx_every = data_4xx_every
        self._startup_timeout = startup_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="upstream-")
            out = self._tmp.name
        self.out = Path(out)
        self.messages_dir = self.out / "messages"
        self.log_path = self.out / "upstream.log"

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("UpstreamProcess already started")
        self.out.mkdir(parents=True, exist_ok=True)
        ready = self.out / "ready"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tests.support.upstream",
            "--host",
            self.host,
            "--port",
            str(self._requested_port),
            "--out",
            str(self.out),
        ]
        if self._rcpt_4xx_prefix is not None:
            cmd += ["--reply-rcpt-4xx-prefix", self._rcpt_4xx_prefix]
        if self._data_4xx_every is not None:
            cmd += ["--reply-data-4xx-every", str(self._data_4xx_every)]
        if self._tls is not None:
            cmd += ["--tls-cert", str(self._tls[0]), "--tls-key", str(self._tls[1])]
            if self._implicit_tls:
                cmd.append("--implicit-tls")
        if self._auth is not None:
            cmd += ["--auth", ":".join(self._auth)]
        if self._tls_client_ca is not None:
            cmd += ["--tls-client-ca", str(self._tls_client_ca)]
        if self._greeting is not None:
            cmd += ["--greeting", self._greeting]
        for key, reply in self._replies.items():
            cmd += ["--reply", f"{key}={reply}"]
        if self._hang_at is not None:
            cmd += ["--hang-at", self._hang_at]
        if self._reject_auth:
            cmd.append("--reject-auth")
        if self._auth_in_clear:
            cmd.append("--auth-in-clear")
        # Output goes to a file, not a pipe: nobody reads a pipe while the tests run, and a
        # full pipe would block the server.
        with self.log_path.open("ab") as log:
            # cwd=REPO_ROOT makes `-m tests.support.upstream` importable from anywhere.
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self._proc = proc
        try:
            wait_until(
                lambda: ready.exists() or proc.poll() is not None,
                timeout=self._startup_timeout,
                what=f"upstream to write {ready}",
            )
        except AssertionError:
            self.stop()
            raise TimeoutError(f"upstream did not start:\n{self.log_tail()}") from None
        if proc.poll() is not None:
            raise RuntimeError(f"upstream exited with {proc.returncode}:\n{self.log_tail()}")
        self._port = int(ready.read_text())
        return self

    def cleanup(self) -> None:
        """stop(), then remove the output directory if it is a temporary one of ours."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _json_paths(self) -> list[Path]:
        if not self.messages_dir.exists():
            return []
        return sorted(self.messages_dir.glob("*.json"), key=lambda p: int(p.stem))

    def message_count(self) -> int:
        """Number of stored messages; cheap enough to poll (no sorting, no reading)."""
        try:
            with os.scandir(self.messages_dir) as entries:
                return sum(1 for entry in entries if entry.name.endswith(".json"))
        except FileNotFoundError:
            return 0

    def messages(self) -> list[dict[str, Any]]:
        """Stored messages in arrival order: the .json fields plus "seq" and "body" (bytes)."""
        result: list[dict[str, Any]] = []
        for path in self._json_paths():
            meta: dict[str, Any] = json.loads(path.read_bytes())
            meta["seq"] = int(path.stem)
            meta["body"] = path.with_suffix(".eml").read_bytes()
            result.append(meta)
        return result

    def connection_count(self) -> int:
        """Number of TCP connections the server has accepted (complete lines only)."""
        try:
            return (self.out / "connections").read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def auth_attempts(self) -> list[tuple[int, bool, str]]:
        """Every AUTH command received: (connection serial, over TLS?, mechanism)."""
        try:
            text = (self.out / "auth").read_text()
        except FileNotFoundError:
            return []
        attempts = []
        for line in text.splitlines():
            serial, tls, mechanism = line.split(" ", 2)
            attempts.append((int(serial), tls == "tls", mechanism))
        return attempts

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll until at least n messages are stored, then return messages()."""
        wait_until(
            lambda: self.message_count() >= n,
            timeout=timeout,
            what=f"{n} messages in {self.messages_dir}",
        )
        return self.messages()
