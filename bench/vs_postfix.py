#!/usr/bin/env python3
"""mailrelay next to Postfix as a relay: same client, same upstream, same run.

A benchmark, not a test: see bench/README.md ("vs_postfix.py"). Run as root (a private Postfix
instance is configured, started and stopped in a temporary directory; the system's instance is
never touched). Needs Debian's postfix package: postfix, smtp-source, smtp-sink.

For every case (message size x recipients) and concurrency, in every run, each relay in turn
(mailrelay, Postfix, mailrelay, Postfix, ...), each fresh with a fresh ``smtp-sink`` as its
upstream: ``smtp-source`` sends N messages, one connection per message, while a latency probe
sends a few more over its own connections. Reported per relay: acceptance and end-to-end
(counted at the sink) messages per second, CPU ms per message, acceptance latency p50/p99 and
peak RSS; medians over the runs, and the ratio mailrelay/Postfix against the targets.

Extras: one large message (memory while receiving and until delivered), a backlog of deferred
messages in the spool (start-up time, throughput ratio) and the cost curve of throughput
against backlog size.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Run as `python bench/vs_postfix.py`, so the repository root is not on sys.path yet.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    CLK_TCK,
    HOST,
    TWISTD,
    BenchError,
    CountingSink,
    Relay,
    SmtpSource,
    TreeMemory,
    expect_reply,
    free_ports,
    open_transaction,
    preload_spool,
    relay_python,
    send_big_message,
    smtp_source_command,
    start_relay,
    tail,
    toml_str,
    tool,
    tree_cpu_ticks,
)
from bench.postfix_peer import PostfixPeer, postfix_unavailable, postfix_version  # noqa: E402

MAIL_FROM = "a@example.com"
RCPT_TO = "b@example.com"
# Backlog mail: deferred, and routed to a dead upstream should it ever become due (mailrelay
# routes by sender domain, Postfix by recipient domain).
BACKLOG_DOMAIN = "backlog.example"
BACKLOG_FROM = f"old@{BACKLOG_DOMAIN}"
BACKLOG_SIZE = 1024
POSTFIX_SEED = 200  # backlog messages Postfix queues itself; the rest are copies of them
# Recipients per upstream transaction, the same for both (Postfix's default): with at most 50
# recipients a message is one transaction at the sink.
RCPTS_PER_TRANSACTION = 50
# Latency probes run side by side: one for every this many of smtp-source's sessions.
PROBE_SESSIONS = 10
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    size: int  # smtp-source -l: payload bytes, headers not included
    recipients: int


CASES = {c.name: c for c in (Case("4k1", 4096, 1), Case("4k20", 4096, 20), Case("50k1", 51200, 1))}
CONCURRENCY = (1, 10, 50)
EXTRAS = ("big", "backlog", "curve")
CURVE = (0, 1000, 10_000, 100_000)
BACKLOG_CASE, BACKLOG_CONCURRENCY = CASES["4k1"], 10
# e2e mailrelay/Postfix targets: (case, concurrency) -> ratio; every other standard case 1.0.
TARGETS = {("4k1", 10): 1.5}


def recipients_of(case: Case) -> list[str]:
    """What smtp-source -r R sends: RCPT_TO, then 2RCPT_TO ... R RCPT_TO."""
    return [RCPT_TO] + [f"{n}{RCPT_TO}" for n in range(2, case.recipients + 1)]


# --- the two relays -------------------------------------------------------------------------------


class Server:
    """A relay under test: started fresh in its run directory, delivering to one sink."""

    name = ""
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def root_pid(self) -> int | None:
        """The process whose tree is measured (the relay; Postfix's master)."""
        raise NotImplementedError

    def log_tail(self) -> str:
        raise NotImplementedError

    def prepare_backlog(self, count: int) -> None:
        """Put ``count`` deferred messages in the (stopped) relay's queue."""
        raise NotImplementedError

    def cpu_ticks(self) -> int | None:
        pid = self.root_pid()
        return None if pid is None else tree_cpu_ticks(pid)

    def memory(self) -> TreeMemory:
        pid = self.root_pid()
        if pid is None:
            raise BenchError(f"{self.name} is not running\n{self.log_tail()}")
        return TreeMemory(pid)


class Mailrelay(Server):
    name = "mailrelay"

    def __init__(
        self, run_dir: Path, sink_port: int, src: str | None, max_size: int, processes: int
    ) -> None:
        self.run_dir = run_dir
        self.src = src
        self.port, self.http_port, dead_port = free_ports(3)
        self.config = mailrelay_config(
            run_dir, self.port, self.http_port, sink_port, dead_port, max_size, processes
        )
        self.relay: Relay | None = None

    def start(self) -> None:
        self.relay = start_relay(self.run_dir, self.config, self.port, self.src)
        deadline = time.monotonic() + 30
        while not self.health_answers():
            if time.monotonic() > deadline:
                raise BenchError(f"mailrelay's /health did not answer\n{self.log_tail()}")
            time.sleep(0.02)

    def health_answers(self) -> bool:
        url = f"http://{HOST}:{self.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # 503 (starting, a provider down) is an answer too
        except OSError:
            return False

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()

    def root_pid(self) -> int | None:
        return None if self.relay is None or self.relay.proc.poll() is not None else self.relay.pid

    def log_tail(self) -> str:
        return tail(self.run_dir / "twistd.log", 15)

    def prepare_backlog(self, count: int) -> None:
        if count:
            preload_spool(
                self.run_dir / "spool",
                count,
                backlog_message(),
                sender=BACKLOG_FROM,
                recipient_domain=BACKLOG_DOMAIN,
            )

    def indexed_seconds(self) -> float | None:
        """The start-up scan's own figure, from the log line "indexed N message(s) ... in X s"."""
        try:
            text = (self.run_dir / "twistd.log").read_text(errors="replace")
        except FileNotFoundError:
            return None
        found = re.search(r"indexed \d+ message\(s\) from the spool in ([\d.]+)s", text)
        return None if found is None else float(found.group(1))


def mailrelay_config(
    run_dir: Path,
    port: int,
    http_port: int,
    sink_port: int,
    dead_port: int,
    max_size: int,
    processes: int,
) -> str:
    return f"""\
[smtp]
listen = [{toml_str(f"tcp:{port}:interface={HOST}:backlog=512")}]
processes = {processes}
hostname = "bench.localhost"
max_message_size = {max_size}
max_connections = 1000
[limits]
connections_per_peer = 0
[http]
listen = {toml_str(f"tcp:{http_port}:interface={HOST}")}
[spool]
path = {toml_str(str(run_dir / "spool"))}
[[providers]]
name = "sink"
kind = "smtp"
host = "{HOST}"
port = {sink_port}
tls = "none"
batch_size = {RCPTS_PER_TRANSACTION}
[[providers]]
name = "nowhere"
kind = "smtp"
host = "{HOST}"
port = {dead_port}
tls = "none"
[routing]
default = ["sink"]
[routing.sender_domains]
"{BACKLOG_DOMAIN}" = ["nowhere"]
"""


class Postfix(Server):
    name = "postfix"

    def __init__(self, run_dir: Path, sink_port: int, max_size: int, backlog: bool) -> None:
        self.port, dead_port = free_ports(2)
        settings = {
            "relayhost": f"[{HOST}]:{sink_port}",
            "smtp_tls_security_level": "none",
            # 50 sessions (and the probe) each need an smtpd; the default is 100.
            "default_process_limit": "200",
            "smtp_connection_cache_on_demand": "yes",
            "default_destination_recipient_limit": str(RCPTS_PER_TRANSACTION),
            "message_size_limit": str(max_size),
        }
        services = ""
        if backlog:
            # Backlog mail goes to a transport that is deferred without a delivery attempt.
            settings["transport_maps"] = f"inline:{{{BACKLOG_DOMAIN}=backlog:[{HOST}]:{dead_port}}}"
            settings["defer_transports"] = "backlog"
            services = "backlog   unix  - - n -  - smtp\n"
        self.peer = PostfixPeer(run_dir, self.port, settings, services)
        self._set_up = False

    def _setup(self) -> None:
        if not self._set_up:
            self.peer.setup()
            self._set_up = True

    def start(self) -> None:
        self._setup()
        self.peer.start()

    def stop(self) -> None:
        self.peer.stop()

    def root_pid(self) -> int | None:
        pid = self.peer.master_pid()
        return pid if pid is not None and Path(f"/proc/{pid}").exists() else None

    def log_tail(self) -> str:
        return self.peer.maillog(15)

    def prepare_backlog(self, count: int) -> None:
        """Postfix queues POSTFIX_SEED messages itself (deferred by ``defer_transports``); the
        rest are copies of those queue files, renamed by ``postsuper -s`` (what it does for a
        queue restored from a backup)."""
        self._setup()
        if not count:
            return
        seed = min(count, POSTFIX_SEED)
        self.peer.start()
        try:
            self._queue_seed(seed)
        finally:
            self.peer.stop()
        seeds = self.peer.queue_files("deferred")
        owner = pwd.getpwnam("postfix")
        later = time.time() + 86400
        for n in range(count - len(seeds)):
            source = seeds[n % len(seeds)]
            copy = source.parent / f"{n:012X}"
            shutil.copyfile(source, copy)
            os.chown(copy, owner.pw_uid, owner.pw_gid)
            os.chmod(copy, 0o700)  # Postfix's mark of a complete queue file
        for path in self.peer.queue_files("deferred"):
            os.utime(path, (later, later))  # not due for a day: never tried during the run
        renamed = self.peer.postfix("-s", command="postsuper")
        if renamed.returncode != 0:
            raise BenchError(f"postsuper -s failed: {renamed.stderr.strip()}")
        queued = len(self.peer.queue_files("deferred"))
        if queued != count:
            raise BenchError(f"Postfix's deferred queue has {queued} files, not {count}")

    def _queue_seed(self, seed: int) -> None:
        command = smtp_source_command(
            tool_path("smtp-source"),
            self.port,
            size=BACKLOG_SIZE,
            messages=seed,
            sessions=4,
            mail_from=BACKLOG_FROM,
            rcpt_to=f"r@{BACKLOG_DOMAIN}",
            reuse=True,
        )
        load = SmtpSource(command, seed).start().wait(120)
        if load.problem:
            raise BenchError(f"queueing Postfix's backlog: {load.problem}")
        deadline = time.monotonic() + 120
        while len(self.peer.queue_files("deferred")) < seed or self._in_flight():
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix did not defer its seed messages\n{self.log_tail()}")
            time.sleep(0.05)

    def _in_flight(self) -> int:
        return sum(len(self.peer.queue_files(q)) for q in ("incoming", "active", "maildrop"))


def backlog_message() -> bytes:
    head = f"From: <{BACKLOG_FROM}>\r\nTo: <r@{BACKLOG_DOMAIN}>\r\nSubject: backlog\r\n\r\n"
    line = b"X" * 78 + b"\r\n"
    return head.encode() + line * (BACKLOG_SIZE // len(line))


# --- acceptance latency ---------------------------------------------------------------------------


class LatencyProbe(threading.Thread):
    """Sends one message at a time over its own connection while smtp-source runs: the n-th
    of ``limit`` probe messages once smtp-source has completed n * ``every``, taking every
    ``step``-th n from ``first`` (several probes share the numbers); each latency is from
    sending the final "." to receiving the 250."""

    def __init__(
        self,
        port: int,
        case: Case,
        source: SmtpSource,
        every: int,
        limit: int,
        first: int = 1,
        step: int = 1,
    ) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.recipients = recipients_of(case)
        self.text = probe_text(case.size)
        self.source = source
        self.every = every
        self.limit = limit
        self.first = first
        self.step = step
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        for n in range(self.first, self.limit + 1, self.step):
            if not self.source.wait_count(n * self.every):
                return  # smtp-source has finished
            try:
                self.latencies.append(self.send_one())
            except (OSError, BenchError) as exc:
                self.errors.append(f"latency probe: {exc}")

    def send_one(self) -> float:
        return send_timed(self.port, self.recipients, self.text)


def send_timed(port: int, recipients: list[str], text: bytes) -> float:
    """One message over a new connection; seconds from sending its final "." to the 250."""
    with socket.create_connection((HOST, port), timeout=60) as sock:
        # The final dot goes alone: without NODELAY it could wait for the body's ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        open_transaction(sock, MAIL_FROM, recipients)
        sock.sendall(text)
        sent = time.perf_counter()
        sock.sendall(b".\r\n")
        expect_reply(sock, b"250")
        latency = time.perf_counter() - sent
        sock.sendall(b"QUIT\r\n")
        expect_reply(sock, b"221")
    return latency


def probe_text(size: int) -> bytes:
    """Headers like smtp-source's and ``size`` payload bytes of 80-byte lines (no dots)."""
    head = f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\nSubject: latency probe\r\n\r\n".encode()
    line = b"X" * 78 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest > 2:
        body += b"X" * (rest - 2) + b"\r\n"
    return head + body


def percentile(values: list[float], pct: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


# --- one measurement ------------------------------------------------------------------------------


@dataclass
class Sample:
    """One load (smtp-source plus the probe) through one fresh relay."""

    relay: str
    case: str
    concurrency: int
    sent: int = 0  # smtp-source's messages that got a 250
    probed: int = 0  # the probe's messages that got a 250
    source_s: float = 0.0  # smtp-source's wall time
    e2e_s: float | None = None  # smtp-source start -> the sink has counted every message
    cpu_s: float | None = None
    peak_rss_kib: int | None = None
    pss_kib: int | None = None  # Pss summed over the processes, after the load
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def messages(self) -> int:
        return self.sent + self.probed

    @property
    def accept_rate(self) -> float | None:
        return self.messages / self.source_s if self.source_s else None

    @property
    def e2e_rate(self) -> float | None:
        return self.messages / self.e2e_s if self.e2e_s else None

    @property
    def cpu_ms(self) -> float | None:
        return (
            None if self.cpu_s is None or not self.messages else self.cpu_s * 1000 / self.messages
        )

    def latency_ms(self, pct: int) -> float | None:
        value = percentile(self.latencies, pct)
        return None if value is None else value * 1000

    @property
    def peak_rss_mib(self) -> float | None:
        return None if self.peak_rss_kib is None else self.peak_rss_kib / 1024

    @property
    def pss_mib(self) -> float | None:
        return None if self.pss_kib is None else self.pss_kib / 1024


def tool_path(name: str) -> str:
    path = tool(name)
    if path is None:
        raise BenchError(f"{name} is not installed (Debian: apt-get install postfix)")
    return path


def measure_load(
    server: Server,
    sink: CountingSink,
    case: Case,
    concurrency: int,
    args: argparse.Namespace,
) -> Sample:
    """smtp-source (N messages, one connection each) and the latency probe against a running
    relay; waits until the sink has counted all of them."""
    sample = Sample(server.name, case.name, concurrency)
    command = smtp_source_command(
        tool_path("smtp-source"),
        server.port,
        size=case.size,
        messages=args.messages,
        sessions=concurrency,
        mail_from=MAIL_FROM,
        rcpt_to=RCPT_TO,
        recipients=case.recipients,
    )
    limit = min(args.probes, args.messages // 10)
    before_sink, before_cpu = sink.transactions(), server.cpu_ticks()
    source = SmtpSource(command, args.messages).start()
    try:
        every = max(1, args.messages // max(1, limit))
        # One probe per PROBE_SESSIONS of smtp-source's sessions: a lone probe waits its turn
        # among 50 sessions at every step of its transaction and got ~45 messages through at
        # c=50, so its "p99" was its maximum.
        count = max(1, concurrency // PROBE_SESSIONS)
        probes = [
            LatencyProbe(server.port, case, source, every, limit, first=i + 1, step=count)
            for i in range(count)
        ]
        for probe in probes:
            probe.start()
        load = source.wait(args.timeout)
        for probe in probes:
            probe.join(120)
    finally:
        source.kill()  # only if still running (interrupted)
    latencies = [latency for probe in probes for latency in probe.latencies]
    sample.sent, sample.source_s, sample.latencies = load.accepted, load.seconds, latencies
    sample.probed = len(latencies)
    per_message = math.ceil(case.recipients / RCPTS_PER_TRANSACTION)
    done = sink.wait_transactions(before_sink + sample.messages * per_message, args.timeout)
    after_cpu = server.cpu_ticks()
    if done is not None:
        sample.e2e_s = done - source.started
    if before_cpu is not None and after_cpu is not None:
        sample.cpu_s = (after_cpu - before_cpu) / CLK_TCK
    memory = server.memory()
    sample.peak_rss_kib, sample.pss_kib = memory.kib("VmHWM"), memory.kib("Pss")
    sample.problems += [error for probe in probes for error in probe.errors][:3]
    if load.problem:
        sample.problems.append(load.problem)
    if done is None:
        got = sink.transactions() - before_sink
        sample.problems.append(
            f"the sink counted {got} of {sample.messages * per_message} transactions"
            f" after {args.timeout:.0f}s"
        )
    if sample.problems:
        sample.problems.append(f"log tail:\n{server.log_tail()}")
    return sample


def make_server(
    name: str, run_dir: Path, sink_port: int, args: argparse.Namespace, backlog: bool = False
) -> Server:
    max_size = args.big_mb * MIB + 10 * MIB
    if name == "mailrelay":
        return Mailrelay(run_dir, sink_port, args.relay_src, max_size, args.processes)
    return Postfix(run_dir, sink_port, max_size, backlog)


@contextmanager
def fresh_pair(
    name: str, run_dir: Path, args: argparse.Namespace, backlog: int | None = None
) -> Iterator[tuple[Server, CountingSink]]:
    """A fresh sink and a fresh relay delivering to it (with ``backlog`` deferred messages
    queued before it starts, if given); both stopped and the run directory removed after."""
    run_dir.mkdir(parents=True)
    sink = CountingSink()
    server: Server | None = None
    try:
        sink.start()
        server = make_server(name, run_dir, sink.port, args, backlog is not None)
        if backlog is not None:
            server.prepare_backlog(backlog)
        yield server, sink
    finally:
        if server is not None:
            server.stop()
        sink.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


def run_standard(
    name: str, case: Case, concurrency: int, run_dir: Path, args: argparse.Namespace
) -> Sample:
    with fresh_pair(name, run_dir, args) as (server, sink):
        server.start()
        return measure_load(server, sink, case, concurrency, args)


# --- extras ---------------------------------------------------------------------------------------


@dataclass
class BigSample:
    relay: str
    seconds_250: float
    seconds_delivered: float | None
    before_mib: float
    receiving_peak_mib: float
    delivered_peak_mib: float


def run_big(name: str, run_dir: Path, args: argparse.Namespace) -> BigSample:
    """One large message; memory (relay: VmRSS; Postfix: VmRSS summed over the instance's
    processes) sampled from just before the body until the sink has counted it."""
    with fresh_pair(name, run_dir, args) as (server, sink):
        server.start()
        memory = server.memory()
        delivered: list[float] = []

        def done_after(elapsed: float) -> bool:
            if sink.transactions() >= 1:
                delivered.append(elapsed)
                return True
            return elapsed > timeout

        timeout: float = args.timeout
        big = send_big_message(
            server.port,
            args.big_mb * MIB,
            memory.kib,
            done_after,
            mail_from=MAIL_FROM,
            rcpt_to=RCPT_TO,
            interval=0.002 if name == "mailrelay" else 0.01,
        )
    return BigSample(
        name,
        big.seconds,
        big.seconds + delivered[0] if delivered else None,
        big.baseline_kib / 1024,
        big.receiving_peak_kib / 1024,
        max(big.receiving_peak_kib, big.after_peak_kib) / 1024,
    )


@dataclass
class BacklogSample:
    relay: str
    backlog: int
    prepare_s: float
    port_s: float  # start -> the SMTP port accepts connections
    first_250_s: float  # start -> a first message got its 250
    settled_s: float | None  # start -> the relay's CPU use fell below 5% (start-up work done)
    indexed_s: float | None  # mailrelay's own "indexed ... in X s"
    load: Sample


def wait_settled(server: Server, timeout: float, window: float = 0.5) -> bool:
    """Poll until the relay used less than 5% of a CPU over ``window`` seconds."""
    deadline = time.monotonic() + timeout
    last = server.cpu_ticks()
    while time.monotonic() < deadline:
        time.sleep(window)
        now = server.cpu_ticks()
        if last is not None and now is not None and (now - last) / CLK_TCK < 0.05 * window:
            return True
        last = now
    return False


def run_backlog(name: str, count: int, run_dir: Path, args: argparse.Namespace) -> BacklogSample:
    """``count`` deferred messages queued, then start-up times and the BACKLOG_CASE load."""
    prepared = time.perf_counter()
    with fresh_pair(name, run_dir, args, backlog=count) as (server, sink):
        started = time.perf_counter()
        prepare_s = started - prepared
        server.start()
        port_s = time.perf_counter() - started
        send_timed(server.port, recipients_of(BACKLOG_CASE), probe_text(BACKLOG_CASE.size))
        first_250_s = time.perf_counter() - started
        settled = wait_settled(server, args.timeout)
        settled_s = time.perf_counter() - started if settled else None
        indexed = server.indexed_seconds() if isinstance(server, Mailrelay) else None
        load = measure_load(server, sink, BACKLOG_CASE, BACKLOG_CONCURRENCY, args)
    return BacklogSample(name, count, prepare_s, port_s, first_250_s, settled_s, indexed, load)


# --- output ---------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def sample_line(run_no: int, s: Sample) -> str:
    return (
        f"run {run_no} {s.case:5s} c={s.concurrency:<3d} {s.relay:9s} {s.messages} msgs"
        f" ({s.sent} + {s.probed} probe): accept {fmt(s.accept_rate)}/s in {s.source_s:.2f} s,"
        f" e2e {fmt(s.e2e_rate)}/s, CPU {fmt(s.cpu_ms, 2)} ms/msg,"
        f" p50/p99 {fmt(s.latency_ms(50))}/{fmt(s.latency_ms(99))} ms,"
        f" peak RSS {fmt(s.peak_rss_mib)} MiB, Pss {fmt(s.pss_mib)} MiB"
    )


@dataclass
class Summary:
    accept: float | None
    e2e: float | None
    cpu_ms: float | None
    p50: float | None
    p99: float | None
    rss_mib: float | None
    pss_mib: float | None


def summarise(samples: list[Sample]) -> Summary:
    return Summary(
        median([s.accept_rate for s in samples]),
        median([s.e2e_rate for s in samples]),
        median([s.cpu_ms for s in samples]),
        median([s.latency_ms(50) for s in samples]),
        median([s.latency_ms(99) for s in samples]),
        median([s.peak_rss_mib for s in samples]),
        median([s.pss_mib for s in samples]),
    )


TABLE_HEAD = (
    f"{'case':5s} {'conc':>4s}  {'relay':9s} {'accept msg/s':>12s} {'e2e msg/s':>10s}"
    f" {'CPU ms/msg':>10s} {'p50 ms':>7s} {'p99 ms':>7s} {'peak RSS MiB':>12s} {'Pss MiB':>7s}"
)


def table_row(case: str, concurrency: int, relay: str, m: Summary) -> str:
    return (
        f"{case:5s} {concurrency:>4d}  {relay:9s} {fmt(m.accept):>12s} {fmt(m.e2e):>10s}"
        f" {fmt(m.cpu_ms, 2):>10s} {fmt(m.p50):>7s} {fmt(m.p99):>7s} {fmt(m.rss_mib):>12s}"
        f" {fmt(m.pss_mib):>7s}"
    )


def verdict_line(case: str, concurrency: int, ours: Summary, theirs: Summary) -> str:
    target = TARGETS.get((case, concurrency), 1.0)
    if ours.e2e is None or not theirs.e2e:
        e2e = "e2e ratio n/a"
    else:
        ratio = ours.e2e / theirs.e2e
        e2e = f"e2e {ratio:.2f}x (>= {target:.1f}x) {'PASS' if ratio >= target else 'FAIL'}"
    if ours.p99 is None or theirs.p99 is None:
        p99 = "p99 n/a"
    else:
        ok = ours.p99 <= theirs.p99
        p99 = f"p99 {ours.p99:.1f} vs {theirs.p99:.1f} ms (<=) {'PASS' if ok else 'FAIL'}"
    return f"  {case} c={concurrency}: mailrelay/postfix {e2e}; {p99}"


def print_standard(samples: list[Sample], args: argparse.Namespace) -> None:
    print(f"\nmedians over {args.runs} run(s), {args.messages} messages per run and relay:")
    print(TABLE_HEAD)
    verdicts = []
    for case in args.cases:
        for concurrency in args.concurrency:
            medians = {}
            for relay in ("mailrelay", "postfix"):
                mine = [
                    s
                    for s in samples
                    if (s.case, s.concurrency, s.relay) == (case, concurrency, relay)
                ]
                if mine:
                    medians[relay] = summarise(mine)
                    print(table_row(case, concurrency, relay, medians[relay]))
            if len(medians) == 2:
                verdicts.append(
                    verdict_line(case, concurrency, medians["mailrelay"], medians["postfix"])
                )
    print(
        "peak RSS: mailrelay's VmHWM; Postfix: VmHWM summed over the instance's processes\n"
        "(shared pages once per process: an upper bound). Pss: proportional set size summed\n"
        "over the processes after the load (each shared page divided among its sharers)."
    )
    print("targets: e2e >= 1.5x Postfix for 4k1 at c=10 and >= 1.0x in every other case;")
    print("         acceptance p99 no worse than Postfix's")
    print("\n".join(verdicts))


def print_big(results: list[BigSample], size_mb: int) -> None:
    print(f"\none {size_mb} MiB message (memory sampled from just before the body):")
    print(
        f"{'relay':9s} {'250 after s':>11s} {'delivered after s':>17s} {'before MiB':>10s}"
        f" {'peak to 250':>11s} {'peak to delivered':>17s}"
    )
    for b in results:
        print(
            f"{b.relay:9s} {b.seconds_250:>11.2f} {fmt(b.seconds_delivered, 2):>17s}"
            f" {b.before_mib:>10.1f} {b.receiving_peak_mib:>11.1f} {b.delivered_peak_mib:>17.1f}"
        )
    print("  mailrelay: VmRSS of its process; postfix: VmRSS summed over the instance's processes")


def print_backlog(results: list[BacklogSample]) -> None:
    case = f"{BACKLOG_CASE.name} at c={BACKLOG_CONCURRENCY}"
    print(f"\ndeferred backlog: start-up and new mail ({case}) with the backlog in the queue:")
    print(
        f"{'backlog':>7s} {'relay':9s} {'prepare s':>9s} {'port s':>6s} {'1st 250 s':>9s}"
        f" {'settled s':>9s} {'indexed s':>9s} {'accept/s':>8s} {'e2e/s':>7s} {'CPU ms':>6s}"
        f" {'p99 ms':>6s} {'e2e vs 0':>8s}"
    )
    base = {r.relay: r.load.e2e_rate for r in results if r.backlog == 0}
    for r in results:
        zero = base.get(r.relay)
        ratio = r.load.e2e_rate / zero if zero and r.load.e2e_rate else None
        print(
            f"{r.backlog:>7d} {r.relay:9s} {r.prepare_s:>9.1f} {r.port_s:>6.2f}"
            f" {r.first_250_s:>9.2f} {fmt(r.settled_s, 2):>9s} {fmt(r.indexed_s, 2):>9s}"
            f" {fmt(r.load.accept_rate):>8s} {fmt(r.load.e2e_rate):>7s}"
            f" {fmt(r.load.cpu_ms, 2):>6s} {fmt(r.load.latency_ms(99)):>6s}"
            f" {fmt(ratio, 2) + 'x' if ratio else 'n/a':>8s}"
        )
    print(
        "  port/1st 250/settled: seconds from the start command to the SMTP port accepting, to\n"
        "  a first message's 250, and to the relay's CPU use falling below 5% (start-up work\n"
        "  done; the load starts then). indexed: mailrelay's own start-up scan time (its log)."
    )


def print_backlog_summary(results: list[BacklogSample], size: int) -> None:
    """The issue's figures for the big backlog: throughput ratio and start-up time."""
    for relay in ("mailrelay", "postfix"):
        rows = {r.backlog: r for r in results if r.relay == relay}
        if size not in rows or 0 not in rows:
            continue
        big, none = rows[size], rows[0]
        ratio = (
            big.load.e2e_rate / none.load.e2e_rate
            if big.load.e2e_rate and none.load.e2e_rate
            else None
        )
        indexed = "" if big.indexed_s is None else f", spool indexed in {big.indexed_s:.2f} s"
        print(
            f"  {relay} with {size} deferred: e2e {fmt(ratio, 2)}x of its rate with none;"
            f" first 250 {big.first_250_s:.2f} s after start (none: {none.first_250_s:.2f} s)"
            f"{indexed}"
        )


def print_preamble(args: argparse.Namespace) -> None:
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    version = relay_python(
        args.relay_src, "import mailrelay as m; print(m.__version__, m.__file__)"
    )
    print(f"mailrelay: {version}; python {platform.python_version()}")
    print(
        f"mailrelay: smtp.processes = {args.processes} (the relay process and"
        f" {args.processes - 1} acceptor process(es)); CPU and memory are summed over them"
    )
    print(f"postfix: {postfix_version()}, private instance (postfix -c DIR), relayhost = sink")
    usage = shutil.disk_usage(tempfile.gettempdir())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), load {load},"
        f" {platform.platform()}; {usage.free / 2**30:.0f} GiB free in {tempfile.gettempdir()}"
    )
    sync = relay_python(
        args.relay_src,
        "import tempfile\n"
        "try:\n"
        "    from mailrelay.spool.filesystems import acceptance_sync\n"
        "except ImportError:\n"
        "    print('the spool file, renames it, then fsyncs queue/ (an older version)')\n"
        "else:\n"
        "    d = acceptance_sync(tempfile.gettempdir(), 'auto')\n"
        "    print(('the spool file, renames it, then fsyncs queue/' if d.directory_fsync"
        " else 'the spool file once, after its rename') + f' ({d.reason})')",
    )
    print(
        f"durability: both at their defaults: before every 250 mailrelay fsyncs {sync}"
        " (spool.directory_fsync = auto), Postfix's cleanup fsyncs the queue file before"
        " smtpd's 250; nothing disabled, no eatmydata"
    )
    print(
        f"load: smtp-source -c -l SIZE -m {args.messages} -s CONC -r RCPTS -f {MAIL_FROM}"
        f" -t {RCPT_TO} (one connection per message); upstream: smtp-sink -c, one per relay run"
    )


# --- main -----------------------------------------------------------------------------------------


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help="smtp-source messages per run [2000]")
    parser.add_argument("--runs", type=int, help="runs; medians are reported [3]")
    parser.add_argument("--cases", help=f"comma-separated, of {','.join(CASES)}, or none [all]")
    parser.add_argument("--concurrency", help="smtp-source -s values [1,10,50]")
    parser.add_argument("--extras", help=f"of {','.join(EXTRAS)}, or none [all]")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="preset: --messages 500 --runs 1 --cases 4k1 --concurrency 10 --extras none",
    )
    parser.add_argument("--big-mb", type=int, default=50, help="the large message, MiB [50]")
    parser.add_argument("--backlog", type=int, default=100_000, help="deferred backlog [100000]")
    parser.add_argument(
        "--curve", default=",".join(map(str, CURVE)), help="backlog sizes of the cost curve"
    )
    parser.add_argument("--probes", type=int, default=200, help="latency probes per run [200]")
    parser.add_argument("--relay-src", help="a src/ directory first on the relay's PYTHONPATH")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--processes",
        type=int,
        default=cores,
        help=f"mailrelay's smtp.processes [{cores}: the CPUs this machine lets us use]",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per wait [600]")
    args = parser.parse_args(argv)
    preset = {"messages": 500, "runs": 1, "cases": "4k1", "concurrency": "10", "extras": "none"}
    full = {"messages": 2000, "runs": 3, "cases": ",".join(CASES), "extras": ",".join(EXTRAS)}
    full["concurrency"] = ",".join(map(str, CONCURRENCY))
    for key, value in (preset if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.cases = [] if args.cases == "none" else csv_list(args.cases)
        args.concurrency = [int(c) for c in csv_list(args.concurrency)]
        args.extras = [] if args.extras == "none" else csv_list(args.extras)
        args.curve = sorted({int(n) for n in csv_list(args.curve)})
    except ValueError as exc:
        parser.error(str(exc))
    if unknown := set(args.cases) - set(CASES):
        parser.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASES)}")
    if unknown := set(args.extras) - set(EXTRAS):
        parser.error(f"unknown extra(s) {sorted(unknown)}; known: {', '.join(EXTRAS)}")
    if min(args.messages, args.runs, *args.concurrency) < 1 or min(args.probes, args.big_mb) < 0:
        parser.error("counts must be positive")
    return args


def backlog_sizes(args: argparse.Namespace) -> list[int]:
    sizes: set[int] = set()
    if "backlog" in args.extras:
        sizes |= {0, args.backlog}
    if "curve" in args.extras:
        sizes |= set(args.curve)
    return sorted(sizes)


def check_tools() -> None:
    for name in ("smtp-source", "smtp-sink", "postsuper"):
        tool_path(name)
    if not TWISTD.exists():
        raise BenchError(f"{TWISTD} not found: pip install -e '.[test]'")
    if reason := postfix_unavailable():
        raise BenchError(f"the Postfix side cannot run: {reason}")


class Problems:
    def __init__(self) -> None:
        self.count = 0

    def report(self, problems: list[str]) -> None:
        for problem in problems:
            self.count += 1
            print(f"  PROBLEM: {problem}", flush=True)


def run_all(args: argparse.Namespace, root: Path, problems: Problems) -> None:
    samples: list[Sample] = []
    relays = ("mailrelay", "postfix")
    for run_no in range(1, args.runs + 1):
        for case in args.cases:
            for concurrency in args.concurrency:
                for relay in relays:
                    run_dir = root / f"r{run_no}-{case}-c{concurrency}-{relay}"
                    s = run_standard(relay, CASES[case], concurrency, run_dir, args)
                    samples.append(s)
                    print(sample_line(run_no, s), flush=True)
                    problems.report(s.problems)
    if samples:
        print_standard(samples, args)
    if "big" in args.extras and args.big_mb:
        bigs = [run_big(relay, root / f"big-{relay}", args) for relay in relays]
        print_big(bigs, args.big_mb)
    backlog_results: list[BacklogSample] = []
    for size in backlog_sizes(args):
        for relay in relays:
            result = run_backlog(relay, size, root / f"backlog{size}-{relay}", args)
            print(f"backlog {size:>6d}: {sample_line(1, result.load)}", flush=True)
            problems.report(result.load.problems)
            backlog_results.append(result)
    if backlog_results:
        print_backlog(backlog_results)
        print_backlog_summary(backlog_results, args.backlog)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that every finally block stops what it started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    began = time.perf_counter()
    problems = Problems()
    try:
        check_tools()
        print_preamble(args)
        with tempfile.TemporaryDirectory(prefix="vs-postfix-") as tmp:
            run_all(args, Path(tmp), problems)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"\nwall time: {time.perf_counter() - began:.0f} s")
    if problems.count:
        print("some runs had problems (see PROBLEM lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
