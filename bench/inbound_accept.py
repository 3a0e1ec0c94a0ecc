#!/usr/bin/env python3
"""Inbound acceptance benchmark: mailrelay next to Postfix's smtpd, same client, same run.

A benchmark, not a test: see bench/README.md. Needs Postfix's ``smtp-source`` and, for the
Postfix side, the ``postfix`` command and root (a private instance is started and stopped).

Per run, alternating (mailrelay, Postfix, mailrelay, Postfix, ...), each server fresh:

  mailrelay  twistd with a temporary config; its only provider is an SMTP port nobody listens
             on, so accepted messages just wait in the spool.
  Postfix    a private instance (``postfix -c DIR start``) with its queue in the run
             directory, ``defer_transports = smtp``: mail is queued and deferred, never sent.

``smtp-source`` sends N messages of S payload bytes from C parallel sessions. Reported:
acceptance (messages that got 250 / wall seconds of smtp-source) and CPU ms per message:
utime+stime from /proc of the relay process (all its threads), and for Postfix of its smtpd and
cleanup processes (plus, for reference, of every process of the instance).

Then, once, the relay's resident memory while it receives one large message (--big-mb) over a
raw socket: VmRSS sampled from /proc every few milliseconds during the transfer, growth over
the value just after the 354.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as `python bench/inbound_accept.py`, so the repository root is not on sys.path yet.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.net import free_port, port_accepts  # noqa: E402
from tests.support.procfs import status_kib  # noqa: E402

HOST = "127.0.0.1"
MAIL_FROM = "a@example.com"
RCPT_TO = "b@example.com"
# twistd is installed next to the interpreter (the venv's bin/); do not resolve symlinks.
TWISTD = Path(sys.executable).parent / "twistd"
START_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
POSTFIX_COUNTED = ("smtpd", "cleanup")


class BenchError(Exception):
    """A failure that ends the benchmark with a message and a non-zero exit status."""


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


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


# --- smtp-source ----------------------------------------------------------------------------------


@dataclass
class Load:
    accepted: int
    seconds: float
    problem: str | None = None


def smtp_source_command(args: argparse.Namespace, port: int) -> list[str]:
    command = [args.smtp_source, "-c", "-l", str(args.size), "-m", str(args.messages)]
    command += ["-s", str(args.clients), "-f", MAIL_FROM, "-t", RCPT_TO]
    if args.reuse:
        command.append("-d")
    return [*command, f"{HOST}:{port}"]


def run_smtp_source(args: argparse.Namespace, port: int) -> Load:
    command = smtp_source_command(args, port)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, timeout=args.timeout)
    seconds = time.perf_counter() - started
    # -c prints the running count of completed DATA commands, each followed by a CR.
    counts = [c for c in proc.stdout.replace(b"\n", b"\r").split(b"\r") if c.strip().isdigit()]
    accepted = int(counts[-1]) if counts else 0
    problem = None
    if proc.returncode != 0 or accepted != args.messages:
        err = proc.stderr.decode(errors="replace").strip()[-300:]
        problem = f"smtp-source exited {proc.returncode}, {accepted} of {args.messages}: {err}"
    return Load(accepted, seconds, problem)


# --- mailrelay ------------------------------------------------------------------------------------


def relay_config(run_dir: Path, smtp_port: int, http_port: int, dead_port: int, big: int) -> str:
    def q(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return (
        "[smtp]\n"
        f"listen = [{q(f'tcp:{smtp_port}:interface={HOST}')}]\n"
        'hostname = "bench.localhost"\n'
        f"max_message_size = {max(26_214_400, big + 1024 * 1024)}\n"
        "[http]\n"
        f"listen = {q(f'tcp:{http_port}:interface={HOST}')}\n"
        "[spool]\n"
        f"path = {q(str(run_dir / 'spool'))}\n"
        "[[providers]]\n"
        'name = "nowhere"\n'
        'kind = "smtp"\n'
        f"host = {q(HOST)}\n"
        f"port = {dead_port}\n"
        'tls = "none"\n'
        "[routing]\n"
        'default = ["nowhere"]\n'
    )


@dataclass
class Relay:
    proc: subprocess.Popen[bytes]
    port: int
    command: list[str]
    run_dir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def relay_env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(src).resolve()), env.get("PYTHONPATH")) if p
        )
    return env


def start_relay(src: str | None, run_dir: Path, big: int) -> Relay:
    run_dir.mkdir(parents=True)
    ports: set[int] = set()
    while len(ports) < 3:  # two probes can be handed the same port
        ports.add(free_port(HOST))
    smtp_port, http_port, dead_port = sorted(ports)
    config = run_dir / "relay.toml"
    config.write_text(relay_config(run_dir, smtp_port, http_port, dead_port, big))
    log = run_dir / "twistd.log"
    command = [
        str(TWISTD), "-n", "--pidfile=", f"--logfile={log}",
        "mailrelay", "--config", str(config),
    ]  # fmt: skip
    console = run_dir / "twistd.console"
    with console.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, env=relay_env(src)
        )
    relay = Relay(proc, smtp_port, command, run_dir)
    deadline = time.monotonic() + START_TIMEOUT
    while not port_accepts(HOST, smtp_port):
        if proc.poll() is not None or time.monotonic() > deadline:
            relay.stop()
            raise BenchError(
                f"the relay did not start\ncommand: {shlex.join(command)}\n"
                f"--- {console} ---\n{_tail(console)}\n--- {log} ---\n{_tail(log)}"
            )
        time.sleep(0.05)
    return relay


def relay_module(src: str | None) -> str:
    probe = "import mailrelay.inbound.protocol as p; print(p.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=relay_env(src)
    )
    return out.stdout.strip() or out.stderr.strip()


# --- Postfix --------------------------------------------------------------------------------------

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_main_cf(root: Path, dead_port: int) -> str:
    return "\n".join(
        [
            "compatibility_level = 3.6",
            f"queue_directory = {root / 'queue'}",
            f"data_directory = {root / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "myhostname = bench.localhost",
            "mydomain = localhost",
            "mydestination =",
            f"relayhost = [{HOST}]:{dead_port}",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            # Mail only queues: the smtp transport is deferred without a delivery attempt.
            "defer_transports = smtp",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "smtpd_peername_lookup = no",
            "biff = no",
            # Keep every smtpd and cleanup alive for the whole run, so /proc still has the CPU
            # time of each one at the end (a process that exits takes its counters with it).
            "max_use = 1000000",
            "max_idle = 3600",
            # No syslog here: Postfix logs to a file (only allowed under these prefixes).
            f"maillog_file = {root / 'maillog'}",
            f"maillog_file_prefixes = {root}",
            "",
        ]
    )


@dataclass
class Postfix:
    root: Path
    port: int
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.root / "conf"

    def _postfix(self, *words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *words], capture_output=True, text=True, timeout=60
        )

    def setup(self, dead_port: int) -> None:
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir(parents=True)
        # Postfix's daemons run as mail_owner: they must reach the queue through every parent.
        for path in (self.root, *self.root.parents):
            if path == Path("/"):
                break
            if path.stat().st_uid == os.getuid() and not path.stat().st_mode & 0o001:
                path.chmod(path.stat().st_mode | 0o011)
        owner = pwd.getpwnam("postfix")
        os.chown(self.root / "data", owner.pw_uid, owner.pw_gid)
        (self.conf / "main.cf").write_text(postfix_main_cf(self.root, dead_port))
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"{HOST}:{self.port}"))
        check = self._postfix("check")
        if check.returncode != 0:
            raise BenchError(
                f"postfix check failed ({check.returncode}): {check.stderr.strip()}\n"
                f"{_tail(self.root / 'maillog')}"
            )

    def start(self) -> None:
        started = self._postfix("start")
        if started.returncode != 0:
            raise BenchError(
                f"postfix start failed ({started.returncode}): {started.stderr.strip()}\n"
                f"{_tail(self.root / 'maillog')}"
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not port_accepts(HOST, self.port):
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix not listening on {self.port}\n{self.maillog()}")
            time.sleep(0.05)

    def maillog(self) -> str:
        return _tail(self.root / "maillog")

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu(self) -> dict[int, tuple[str, int]]:
        """pid -> (name, CPU ticks) of the master and every process it started."""
        master = self.master_pid()
        if master is None:
            return {}
        out: dict[int, tuple[str, int]] = {}
        for pid, name in {master: "master", **children(master)}.items():
            ticks = cpu_ticks(pid)
            if ticks is not None:
                out[pid] = (name, ticks)
        return out

    def stop(self) -> None:
        master = self.master_pid()
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while master is not None and Path(f"/proc/{master}").exists():
            if time.monotonic() > deadline:
                os.kill(master, 9)
                break
            time.sleep(0.05)


def postfix_unavailable() -> str | None:
    """Why the Postfix side cannot run here, or None."""
    if _tool("postfix") is None:
        return "the postfix command is not installed"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root (its master runs as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user for mail_owner"
    return None


# --- one run per server ---------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    load: Load
    cpu_s: float  # counted processes (relay: the process; Postfix: smtpd + cleanup)
    cpu_all_s: float | None = None  # Postfix: every process of the instance
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.load.accepted / self.load.seconds if self.load.seconds else 0.0

    def ms_per_msg(self, seconds: float | None) -> float | None:
        if seconds is None or not self.load.accepted:
            return None
        return seconds * 1000 / self.load.accepted


def run_relay(args: argparse.Namespace, run_dir: Path, src: str | None, name: str) -> Result:
    relay = start_relay(src, run_dir, 0)
    pid = relay.proc.pid
    try:
        before = cpu_ticks(pid)
        load = run_smtp_source(args, relay.port)
        after = cpu_ticks(pid)
    finally:
        relay.stop()
    if before is None or after is None:
        raise BenchError(f"the relay exited during the run\n{_tail(run_dir / 'twistd.log')}")
    result = Result(name, load, (after - before) / CLK_TCK)
    if load.problem:
        result.notes.append(f"{load.problem}\n{_tail(run_dir / 'twistd.log', 10)}")
    return result


def run_postfix(args: argparse.Namespace, run_dir: Path) -> Result:
    ports: set[int] = set()
    while len(ports) < 2:
        ports.add(free_port(HOST))
    port, dead_port = sorted(ports)
    postfix = Postfix(run_dir, port)
    postfix.setup(dead_port)
    postfix.start()
    try:
        before = postfix.cpu()
        load = run_smtp_source(args, port)
        after = postfix.cpu()
    finally:
        postfix.stop()
    result = Result("postfix", load, 0.0, 0.0)
    counted = all_ticks = 0
    for pid, (name, ticks) in after.items():
        delta = ticks - before.get(pid, (name, 0))[1]
        all_ticks += delta
        if name in POSTFIX_COUNTED:
            counted += delta
    result.cpu_s = counted / CLK_TCK
    result.cpu_all_s = all_ticks / CLK_TCK
    gone = sorted(name for pid, (name, _) in before.items() if pid not in after)
    if gone:
        result.notes.append(f"processes exited during the run (CPU not counted): {gone}")
    if load.problem:
        result.notes.append(f"{load.problem}\n{postfix.maillog()}")
    return result


# --- RSS while receiving one large message --------------------------------------------------------


@dataclass
class BigResult:
    size: int
    seconds: float  # first body byte sent -> 250 received
    reply: str
    baseline_kib: int  # VmRSS just before the body
    receiving_peak_kib: int  # highest VmRSS sampled until the 250
    after_peak_kib: int  # highest VmRSS sampled in AFTER_250 seconds after it
    samples: int
    stored_bytes: int

    @property
    def growth_kib(self) -> int:
        return self.receiving_peak_kib - self.baseline_kib


AFTER_250 = 1.0  # seconds the sampling goes on after the 250 (what the queue does next)


def _expect(sock: socket.socket, code: bytes) -> str:
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


def big_body(size: int) -> tuple[bytes, int]:
    """A 1 MiB block of 76-character lines (every 16th dot-stuffed) and how often to send it."""
    lines = []
    for n in range(1024 * 1024 // 78):
        text = (b"%07d " % n + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2)[:76]
        lines.append((b".." + text[2:]) if n % 16 == 5 else text)
    block = b"\r\n".join(lines) + b"\r\n"
    return block, max(1, size // len(block))


def measure_big(args: argparse.Namespace, src: str | None, run_dir: Path) -> BigResult:
    size = args.big_mb * 1024 * 1024
    relay = start_relay(src, run_dir, size)
    pid = relay.proc.pid
    try:
        with socket.create_connection((HOST, relay.port), timeout=120) as sock:
            _expect(sock, b"220")
            for command, code in (
                (b"EHLO bench.localhost", b"250"),
                (b"MAIL FROM:<%s>" % MAIL_FROM.encode(), b"250"),
                (b"RCPT TO:<%s>" % RCPT_TO.encode(), b"250"),
                (b"DATA", b"354"),
            ):
                sock.sendall(command + b"\r\n")
                _expect(sock, code)
            block, repeat = big_body(size)
            time.sleep(0.2)
            baseline = status_kib(pid, "VmRSS") or 0
            samples: list[tuple[float, int]] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    rss = status_kib(pid, "VmRSS")
                    if rss is not None:
                        samples.append((time.perf_counter(), rss))
                    time.sleep(0.001)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            sock.sendall(b"Subject: big\r\n\r\n")
            for _ in range(repeat):
                sock.sendall(block)
            sock.sendall(b".\r\n")
            reply = _expect(sock, b"250")
            answered = time.perf_counter()
            time.sleep(AFTER_250)
            stop.set()
            sampler.join()
            sock.sendall(b"QUIT\r\n")
        stored = sum(p.stat().st_size for p in (run_dir / "spool" / "queue").iterdir())
    finally:
        relay.stop()
    receiving = [rss for at, rss in samples if at <= answered]
    after = [rss for at, rss in samples if at > answered]
    return BigResult(
        size=len(block) * repeat,
        seconds=answered - started,
        reply=reply,
        baseline_kib=baseline,
        receiving_peak_kib=max(receiving, default=baseline),
        after_peak_kib=max(after, default=baseline),
        samples=len(receiving),
        stored_bytes=stored,
    )


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run [2000]")
    parser.add_argument("--size", type=int, default=4096, help="smtp-source -l bytes [4096]")
    parser.add_argument("--clients", type=int, default=10, help="smtp-source -s sessions [10]")
    parser.add_argument("--runs", type=int, default=3, help="runs of each server [3]")
    parser.add_argument(
        "--reuse", action="store_true", help="smtp-source -d: many messages per connection"
    )
    parser.add_argument("--no-postfix", action="store_true", help="measure mailrelay only")
    parser.add_argument("--big-mb", type=int, default=50, help="large message, MiB [50; 0: skip]")
    parser.add_argument("--relay-src", help="a src/ directory first on the relay's PYTHONPATH")
    parser.add_argument(
        "--baseline-src",
        help="another src/ directory: measure that relay too, as 'baseline', in the same runs",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per smtp-source")
    args = parser.parse_args(argv)
    if min(args.messages, args.size, args.clients, args.runs) < 1 or args.big_mb < 0:
        parser.error("counts must be positive")
    args.smtp_source = _tool("smtp-source")
    return args


def _median(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.2f}" if known else "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    if args.smtp_source is None:
        print("error: smtp-source (Postfix) is not installed", file=sys.stderr)
        return 1
    if not TWISTD.exists():
        print(f"error: {TWISTD} not found: pip install -e '.[test]'", file=sys.stderr)
        return 1
    relays = [("mailrelay", args.relay_src)]
    if args.baseline_src:
        relays.append(("baseline", args.baseline_src))
    for name, src in relays:
        print(f"{name}: {relay_module(src)}")
    print(f"client: {shlex.join(smtp_source_command(args, 0)).replace(':0', ':PORT')}")
    skip_postfix = "--no-postfix" if args.no_postfix else postfix_unavailable()
    if skip_postfix:
        print(f"Postfix side skipped: {skip_postfix}")
    else:
        version = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"postfix: {version}, private instance, defer_transports = smtp")
    results: list[Result] = []
    problems = 0
    with tempfile.TemporaryDirectory(prefix="inbound-accept-") as tmp:
        root = Path(tmp)
        for run_no in range(1, args.runs + 1):
            for name in [name for name, _ in relays] + ([] if skip_postfix else ["postfix"]):
                run_dir = root / f"{name}{run_no}"
                try:
                    if name == "postfix":
                        result = run_postfix(args, run_dir)
                    else:
                        result = run_relay(args, run_dir, dict(relays)[name], name)
                except BenchError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
                results.append(result)
                ms = result.ms_per_msg(result.cpu_s)
                extra = ""
                if result.cpu_all_s is not None:
                    extra = f" (all Postfix processes {result.ms_per_msg(result.cpu_all_s):.2f})"
                print(
                    f"run {run_no} {name:9s} {result.load.accepted} in {result.load.seconds:.2f} s"
                    f" = {result.rate:7.1f} msg/s, CPU {result.cpu_s:.2f} s ="
                    f" {ms if ms is None else f'{ms:.2f}'} ms/msg{extra}",
                    flush=True,
                )
                for note in result.notes:
                    problems += 1
                    print(f"  PROBLEM: {note}", flush=True)
        print(f"\nmedian over {args.runs} runs ({args.messages} x {args.size} bytes, "
              f"{args.clients} sessions{', reused' if args.reuse else ''}):")  # fmt: skip
        print(f"  {'server':10s} {'msg/s':>8s} {'CPU ms/msg':>11s} {'(all procs)':>12s}")
        for name in ("mailrelay", "baseline", "postfix"):
            mine = [r for r in results if r.server == name]
            if not mine:
                continue
            rate = _median([r.rate for r in mine])
            cpu = _median([r.ms_per_msg(r.cpu_s) for r in mine])
            every = _median([r.ms_per_msg(r.cpu_all_s) for r in mine])
            print(f"  {name:10s} {rate:>8s} {cpu:>11s} {every if name == 'postfix' else '':>12s}")
        for name, src in relays if args.big_mb else []:
            try:
                big = measure_big(args, src, root / f"big-{name}")
            except BenchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(
                f"\n{name}, one {big.size / 1048576:.1f} MiB message: {big.reply[:40]} after"
                f" {big.seconds:.2f} s; spool file {big.stored_bytes / 1048576:.1f} MiB\n"
                f"  relay VmRSS {big.baseline_kib} KiB before the body, peak"
                f" {big.receiving_peak_kib} KiB until the 250 ({big.samples} samples):"
                f" growth while receiving {big.growth_kib / 1024:.1f} MiB\n"
                f"  peak in the {AFTER_250:.0f} s after the 250: {big.after_peak_kib} KiB"
                f" (+{(big.after_peak_kib - big.baseline_kib) / 1024:.1f} MiB)"
            )
    if problems:
        print("some runs had problems (see PROBLEM lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
