"""Plumbing the benchmarks share: the relay as twistd, /proc CPU and memory readers,
``smtp-source`` runs, a counting ``smtp-sink``, and one large message over a raw socket.

Imported by the scripts in bench/ as ``bench.common``; each script puts the repository root on
``sys.path`` first (they are run as ``python bench/<name>.py``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port, port_accepts
from tests.support.procfs import status_kib
from tests.support.smtpsink import SmtpSink

HOST = "127.0.0.1"
# twistd is installed next to the interpreter (the venv's bin/); do not resolve symlinks.
TWISTD = Path(sys.executable).parent / "twistd"
START_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A failure that ends the benchmark with a message and a non-zero exit status."""


def tool(name: str) -> str | None:
    """Path of a command, also looked up in the sbin directories (Postfix's tools live there)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def toml_str(value: str) -> str:
    # A JSON string (ASCII-escaped) is also a valid TOML basic string.
    return json.dumps(value)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (two probes can get the same)."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port(HOST))
    return sorted(ports)


# --- /proc ----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is field 3, the state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


def reaped_ticks(pid: int) -> int | None:
    """cutime + cstime: CPU of the children this process has waited for (that have exited)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[13]) + int(fields[14])


def children(ppid: int) -> dict[int, str]:
    """pid -> command name of the processes whose parent is ``ppid``."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if int(text[text.rindex(")") + 2 :].split()[1]) == ppid:
            out[int(entry)] = name
    return out


def tree_cpu_ticks(root: int) -> int | None:
    """CPU of a process, its live children and its exited (reaped) children, in ticks; None
    when the root is gone. A child that exits between two readings keeps counting (its time
    moves to the root's cutime/cstime when it is reaped)."""
    own, reaped = cpu_ticks(root), reaped_ticks(root)
    if own is None or reaped is None:
        return None
    return own + reaped + sum(cpu_ticks(pid) or 0 for pid in children(root))


def pss_kib(pid: int) -> int | None:
    """Proportional set size: resident pages, each shared page divided among its sharers (so a
    sum over processes counts shared libraries once), from /proc/<pid>/smaps_rollup."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class TreeMemory:
    """Sums a /proc/<pid>/status field (VmRSS, VmHWM) over a process and its children.

    The list of children is read again at most every ``refresh`` seconds, so sampling every
    few milliseconds does not scan all of /proc each time."""

    def __init__(self, root: int, refresh: float = 0.2) -> None:
        self.root = root
        self._refresh = refresh
        self._pids: list[int] = []
        self._listed = 0.0

    def pids(self) -> list[int]:
        now = time.monotonic()
        if now - self._listed > self._refresh:
            self._pids = [self.root, *children(self.root)]
            self._listed = now
        return self._pids

    def kib(self, field_name: str = "VmRSS") -> int | None:
        """The sum of a status field, or of ``Pss`` (smaps_rollup) for ``field_name="Pss"``."""
        if field_name == "Pss":
            values = [pss_kib(pid) for pid in self.pids()]
        else:
            values = [status_kib(pid, field_name) for pid in self.pids()]
        known = [v for v in values if v is not None]
        return sum(known) if known else None


# --- the relay as twistd --------------------------------------------------------------------------


def relay_env(src: str | None) -> dict[str, str]:
    """The environment for the relay, with ``src`` (another checkout's src/) first on its path."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(src).resolve()), env.get("PYTHONPATH")) if p
        )
    return env


def relay_python(src: str | None, code: str) -> str:
    """What ``code`` prints when run by the relay's interpreter with the relay's path."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=relay_env(src)
    )
    return out.stdout.strip() or out.stderr.strip()


def relay_module(src: str | None) -> str:
    """Which file the relay would import its SMTP protocol from (what is being measured)."""
    return relay_python(src, "import mailrelay.inbound.protocol as m; print(m.__file__)")


@dataclass
class Relay:
    proc: subprocess.Popen[bytes]
    port: int
    command: list[str]
    run_dir: Path
    started: float  # perf_counter() just before the process was started

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.run_dir / "twistd.log"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_relay(run_dir: Path, config_text: str, port: int, src: str | None = None) -> Relay:
    """Write ``relay.toml`` into ``run_dir`` and start ``twistd -n mailrelay`` there; returns
    once its SMTP ``port`` accepts connections."""
    if not TWISTD.exists():
        raise BenchError(f"{TWISTD} not found; install the project: pip install -e '.[test]'")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "relay.toml"
    config.write_text(config_text)
    log = run_dir / "twistd.log"
    command = [
        str(TWISTD), "-n", "--pidfile=", f"--logfile={log}",
        "mailrelay", "--config", str(config),
    ]  # fmt: skip
    # twistd writes its log to twistd.log; stdout/stderr only carry what happens before the
    # log is set up (bad options, unknown plugin, import errors).
    console = run_dir / "twistd.console"
    started = time.perf_counter()
    with console.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, env=relay_env(src)
        )
    relay = Relay(proc, port, command, run_dir, started)
    deadline = time.monotonic() + START_TIMEOUT
    while not port_accepts(HOST, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            state = (
                f"exited with status {proc.returncode}"
                if proc.poll() is not None
                else f"not listening on {HOST}:{port} after {START_TIMEOUT:.0f}s"
            )
            relay.stop()
            raise BenchError(
                f"the relay did not start: {state}\n"
                f"command: {shlex.join(command)}\n"
                f"--- tail of {console} ---\n{tail(console)}\n"
                f"--- tail of {log} ---\n{tail(log)}"
            )
        time.sleep(0.05)
    return relay


def preload_spool(
    spool: Path,
    count: int,
    body: bytes,
    sender: str = "old@example.test",
    recipient_domain: str = "example.test",
) -> float:
    """Write ``count`` messages deferred for a week into spool/queue/, as the relay would have
    left them (framed, next attempt in the mtime), without fsync. Returns the seconds it took."""
    # Imported here: comparing another version of the relay (PYTHONPATH=<its src>) must not
    # need these in it.
    from mailrelay.spool.format import Envelope, encode_message
    from mailrelay.spool.store import new_queue_id

    started = time.perf_counter()
    queue = spool / "queue"
    queue.mkdir(parents=True)
    later = time.time() + 7 * 86400
    received = time.time() - 3600
    for n in range(count):
        queue_id = new_queue_id(received + n * 1e-6)
        envelope = Envelope(
            queue_id, sender, (f"r{n}@{recipient_domain}",), received, "127.0.0.1", "old"
        )
        path = queue / queue_id
        path.write_bytes(encode_message(envelope, body))
        os.utime(path, (later, later))
    return time.perf_counter() - started


# --- smtp-source ----------------------------------------------------------------------------------


def smtp_source_command(
    executable: str,
    port: int,
    *,
    size: int,
    messages: int,
    sessions: int,
    mail_from: str,
    rcpt_to: str,
    recipients: int = 1,
    reuse: bool = False,
) -> list[str]:
    """``smtp-source -c``: one connection per message unless ``reuse`` (-d). With -r R the
    recipients are ``rcpt_to``, then ``2<rcpt_to>`` ... ``R<rcpt_to>``."""
    command = [executable, "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions)]
    if recipients != 1:
        command += ["-r", str(recipients)]
    command += ["-f", mail_from, "-t", rcpt_to]
    if reuse:
        command.append("-d")
    return [*command, f"{HOST}:{port}"]


@dataclass
class Load:
    accepted: int
    seconds: float
    problem: str | None = None


class SmtpSource:
    """One ``smtp-source -c`` run in the background, its running counter read as it goes.

    ``-c`` prints the count of completed DATA commands, each followed by a CR; smtp-source
    stops at the first reply that is not 2xx/3xx (reported as the run's problem)."""

    def __init__(self, command: list[str], expected: int) -> None:
        self.command = command
        self.expected = expected
        self.count = 0
        self.done = threading.Event()
        self._changed = threading.Condition()
        self._stderr = bytearray()
        self._proc: subprocess.Popen[bytes] | None = None
        self.started = self.ended = 0.0

    def start(self) -> SmtpSource:
        self.started = time.perf_counter()
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := os.read(self._proc.stderr.fileno(), 4096):
            self._stderr += chunk

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        pending = b""
        while chunk := os.read(self._proc.stdout.fileno(), 4096):
            *tokens, pending = (pending + chunk).replace(b"\n", b"\r").split(b"\r")
            counts = [int(t) for t in tokens if t.strip().isdigit()]
            if counts:
                with self._changed:
                    self.count = counts[-1]
                    self._changed.notify_all()
        self._proc.wait()
        self.ended = time.perf_counter()
        self._stderr_reader.join(5)
        with self._changed:
            self.done.set()
            self._changed.notify_all()

    def wait_count(self, target: int) -> bool:
        """Block until the counter reaches ``target`` (True) or smtp-source has exited."""
        with self._changed:
            while self.count < target and not self.done.is_set():
                self._changed.wait()
            return self.count >= target and not self.done.is_set()

    def wait(self, timeout: float) -> Load:
        if not self.done.wait(timeout):
            self.kill()
            self.done.wait(10)
            return Load(self.count, timeout, f"smtp-source did not finish within {timeout:.0f}s")
        assert self._proc is not None
        problem = None
        if self._proc.returncode != 0 or self.count != self.expected:
            err = bytes(self._stderr).decode(errors="replace").strip()[-300:]
            problem = (
                f"smtp-source exited {self._proc.returncode},"
                f" {self.count} of {self.expected}: {err}"
            )
        return Load(self.count, self.ended - self.started, problem)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


def run_smtp_source(command: list[str], expected: int, timeout: float) -> Load:
    return SmtpSource(command, expected).start().wait(timeout)


# --- smtp-sink as a counting upstream -------------------------------------------------------------


class CountingSink(SmtpSink):
    """``smtp-sink -c`` that stores nothing (no ``-d``: a capture file per message would make
    the sink, not the relay, the bottleneck); ``transactions()`` reads its counter."""

    def command(self, port: int) -> list[str]:
        command = super().command(port)
        at = command.index("-d")
        del command[at : at + 2]
        return command

    def transactions(self) -> int:
        """Final dots received so far: the last ``mesg=`` report, read from the log's tail."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 256))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return 0
        # The sink rewrites its report line in place; the last one may be half written
        # (read while it was printing): the newest complete report counts.
        for report in reversed(text.replace("\n", "\r").split("\r")):
            fields = dict(item.partition("=")[::2] for item in report.split())
            if report.startswith("sess=") and fields.get("mesg", "").isdigit():
                return int(fields["mesg"])
        return 0

    def wait_transactions(self, expected: int, timeout: float, poll: float = 0.005) -> float | None:
        """Poll until the sink counted ``expected`` transactions: perf_counter() when seen, or
        None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.transactions() < expected:
            if time.monotonic() > deadline:
                return None
            time.sleep(poll)
        return time.perf_counter()


# --- one large message over a raw socket ----------------------------------------------------------


def expect_reply(sock: socket.socket, code: bytes) -> str:
    """Read one (possibly multi-line) reply; BenchError unless it starts with ``code``."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise BenchError(f"connection closed waiting for {code.decode()}: {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        last = [line for line in lines[:-1] if line[3:4] == b" "]
        if last:
            reply = last[-1].decode(errors="replace")
            if not last[-1].startswith(code):
                raise BenchError(f"expected {code.decode()}, got {reply}")
            return reply


def open_transaction(
    sock: socket.socket, mail_from: str, rcpt_to: list[str], helo: str = "bench.localhost"
) -> None:
    """Banner, EHLO, MAIL, RCPT (each), DATA: the socket is then ready for the message text."""
    expect_reply(sock, b"220")
    commands = [(f"EHLO {helo}", b"250"), (f"MAIL FROM:<{mail_from}>", b"250")]
    commands += [(f"RCPT TO:<{rcpt}>", b"250") for rcpt in rcpt_to]
    for command, code in [*commands, ("DATA", b"354")]:
        sock.sendall(command.encode() + b"\r\n")
        expect_reply(sock, code)


def big_body(size: int) -> tuple[bytes, int]:
    """A 1 MiB block of 76-character lines (every 16th dot-stuffed) and how often to send it."""
    lines = []
    for n in range(1024 * 1024 // 78):
        text = (b"%07d " % n + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2)[:76]
        lines.append((b".." + text[2:]) if n % 16 == 5 else text)
    block = b"\r\n".join(lines) + b"\r\n"
    return block, max(1, size // len(block))


@dataclass
class BigResult:
    size: int
    seconds: float  # first body byte sent -> 250 received
    reply: str
    baseline_kib: int  # memory just before the body
    receiving_peak_kib: int  # highest sample until the 250
    after_peak_kib: int  # highest sample after the 250, until ``done_after`` said so
    after_seconds: float  # how long sampling went on after the 250
    samples: int

    @property
    def growth_kib(self) -> int:
        return self.receiving_peak_kib - self.baseline_kib


def send_big_message(
    port: int,
    size: int,
    memory: Callable[[], int | None],
    done_after: Callable[[float], bool],
    *,
    mail_from: str,
    rcpt_to: str,
    interval: float = 0.001,
) -> BigResult:
    """Send one message of about ``size`` bytes (1 MiB ``sendall``s) and sample ``memory()``
    (KiB) every ``interval`` seconds from just before the body until ``done_after(seconds
    since the 250)`` is true."""
    with socket.create_connection((HOST, port), timeout=120) as sock:
        open_transaction(sock, mail_from, [rcpt_to])
        block, repeat = big_body(size)
        time.sleep(0.2)  # let the server settle after the 354 before the baseline sample
        baseline = memory() or 0
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                kib = memory()
                if kib is not None:
                    samples.append((time.perf_counter(), kib))
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            started = time.perf_counter()
            sock.sendall(b"Subject: big\r\n\r\n")
            for _ in range(repeat):
                sock.sendall(block)
            sock.sendall(b".\r\n")
            reply = expect_reply(sock, b"250")
            answered = time.perf_counter()
            while not done_after(time.perf_counter() - answered):
                time.sleep(interval)
        finally:
            stop.set()
            sampler.join()
        sock.sendall(b"QUIT\r\n")
    receiving = [kib for at, kib in samples if at <= answered]
    after = [kib for at, kib in samples if at > answered]
    return BigResult(
        size=len(block) * repeat,
        seconds=answered - started,
        reply=reply,
        baseline_kib=baseline,
        receiving_peak_kib=max(receiving, default=baseline),
        after_peak_kib=max(after, default=baseline),
        after_seconds=time.perf_counter() - answered,
        samples=len(receiving),
    )
