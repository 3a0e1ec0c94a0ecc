#!/usr/bin/env python3
"""End-to-end throughput benchmark for mailrelay. A benchmark, not a test: see bench/README.md.

Each run starts a fresh upstream (tests/support/upstream.py) and a fresh relay under twistd
with an empty spool, then C smtplib clients (threads, one connection each) send N messages of
S bytes through the relay. Two rates are reported:

  acceptance   N / (first send -> last 250 from the relay)
  end-to-end   N / (first send -> upstream has stored all N)

--direct skips the relay and sends straight to the upstream: a baseline for what the client
side and the upstream can do on this machine.

--preload N fills the spool with N messages deferred for a week before the relay starts (the
issue's "100 000 messages already deferred"), and reports the time from starting the relay to
the first 250 and the relay's resident memory.
"""

from __future__ import annotations

import argparse
import re
import shlex
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# Run as `python bench/relay_throughput.py`, so the repository root is not on sys.path yet.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    HOST,
    BenchError,
    Relay,
    free_ports,
    preload_spool,
    start_relay,
    toml_str,
)
from tests.support.procfs import status_kib as rss_kib  # noqa: E402
from tests.support.upstream import UpstreamProcess  # noqa: E402

MAIL_FROM = "bench@example.test"
RCPT_TO = "sink@example.test"
LINE_CHARS = 76
FILLER = b"abcdefghijklmnopqrstuvwxyz0123456789" * 4  # any 76-byte window of it is a line
BENCH_ID_RE = re.compile(rb"^X-Bench-Id: (\S+)\r$", re.MULTILINE)


# --- messages -----------------------------------------------------------------------------


def _headers(run_no: int, msg_no: int) -> bytes:
    # Fixed-width numbers keep the header length constant, so every message has the same size.
    tag = f"r{run_no:03d}-m{msg_no:07d}"
    return (
        f"From: <{MAIL_FROM}>\r\n"
        f"To: <{RCPT_TO}>\r\n"
        f"Subject: mailrelay bench {tag}\r\n"
        f"Message-ID: <{tag}@bench.example.test>\r\n"
        f"X-Bench-Id: {tag}\r\n"
        "\r\n"
    ).encode()


HEADER_LEN = len(_headers(0, 0))


@lru_cache(maxsize=4)
def make_body(n: int) -> bytes:
    """Exactly n bytes (n >= 2) of CRLF-terminated lines, mostly 76 characters long.

    A few lines start with "." (one is a lone ".", which ends DATA if nobody stuffs it), so the
    benchmark also exercises dot-stuffing on both of the relay's sides.
    """
    if n < 2:
        raise ValueError("a body needs at least 2 bytes (one empty line)")
    out = bytearray()
    line_no = 0
    while len(out) < n:
        if line_no == 5:
            text = b"."
        elif line_no == 6:
            text = b".."
        elif line_no % 10 == 3:
            text = b"." + FILLER[line_no % 36 : line_no % 36 + LINE_CHARS - 1]
        else:
            text = FILLER[line_no % 36 : line_no % 36 + LINE_CHARS]
        room = n - len(out) - 2  # what is left for text once this line's CRLF is counted
        text = text[:room]
        if room - len(text) == 1:
            # One byte would be left over, too little for another line: shorten this one so
            # the remainder is exactly an empty line.
            text = text[:-1]
        out += text + b"\r\n"
        line_no += 1
    assert len(out) == n
    return bytes(out)


def make_message(run_no: int, msg_no: int, size: int) -> bytes:
    return _headers(run_no, msg_no) + make_body(size - HEADER_LEN)


# --- relay process ------------------------------------------------------------------------


def relay_config(
    run_dir: Path, smtp_port: int, http_port: int, upstream_port: int, connections: int
) -> str:
    return (
        "[smtp]\n"
        f"listen = [{toml_str(f'tcp:{smtp_port}:interface={HOST}')}]\n"
        "[http]\n"
        f"listen = {toml_str(f'tcp:{http_port}:interface={HOST}')}\n"
        "[spool]\n"
        f"path = {toml_str(str(run_dir / 'spool'))}\n"
        "[[providers]]\n"
        'name = "upstream"\n'
        'kind = "smtp"\n'
        f"host = {toml_str(HOST)}\n"
        f"port = {upstream_port}\n"
        'tls = "none"\n'
        f"connections = {connections}\n"
        "[routing]\n"
        'default = ["upstream"]\n'
    )


def start_forwarding_relay(run_dir: Path, upstream_port: int, connections: int) -> Relay:
    smtp_port, http_port = free_ports(2)
    config = relay_config(run_dir, smtp_port, http_port, upstream_port, connections)
    return start_relay(run_dir, config, smtp_port)


# --- clients ------------------------------------------------------------------------------


@dataclass
class ClientResult:
    accepted: int = 0
    rejected: int = 0
    last_250: float | None = None  # perf_counter() of this client's last accepted message
    first_250: float | None = None
    errors: list[str] = field(default_factory=list)


def _split(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _client_loop(
    client: smtplib.SMTP,
    run_no: int,
    msg_nos: range,
    size: int,
    go: threading.Event,
    result: ClientResult,
) -> None:
    go.wait()
    for msg_no in msg_nos:
        message = make_message(run_no, msg_no, size)
        try:
            client.sendmail(MAIL_FROM, [RCPT_TO], message)
        except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused) as exc:
            # A 4xx/5xx reply: count it and go on, the connection is still usable.
            result.rejected += 1
            if len(result.errors) < 3:
                result.errors.append(repr(exc))
            continue
        except (smtplib.SMTPException, OSError) as exc:
            result.errors.append(f"connection failed after {result.accepted} messages: {exc!r}")
            return
        result.accepted += 1
        result.last_250 = time.perf_counter()
        if result.first_250 is None:
            result.first_250 = result.last_250
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


@dataclass
class SendResult:
    t0: float
    accepted: int
    rejected: int
    acceptance_s: float | None
    errors: list[str]
    first_250: float | None = None


def send_all(port: int, run_no: int, messages: int, size: int, clients: int) -> SendResult:
    # Connect and EHLO every client before the clock starts: the benchmark measures message
    # throughput over established connections, not connection setup.
    connections: list[smtplib.SMTP] = []
    try:
        for _ in range(clients):
            # local_hostname avoids smtplib's socket.getfqdn() (a DNS lookup).
            client = smtplib.SMTP(HOST, port, local_hostname="bench.localhost", timeout=60)
            connections.append(client)
            client.ehlo()
    except (smtplib.SMTPException, OSError) as exc:
        for client in connections:
            client.close()
        raise BenchError(
            f"client {len(connections)} could not connect to port {port}: {exc!r}"
        ) from exc
    go = threading.Event()
    results = [ClientResult() for _ in range(clients)]
    threads = []
    first = 0
    for client, result, count in zip(connections, results, _split(messages, clients), strict=True):
        msg_nos = range(first, first + count)
        first += count
        thread = threading.Thread(
            target=_client_loop,
            args=(client, run_no, msg_nos, size, go, result),
            daemon=True,  # so that Ctrl-C is not held up by a client stuck in a read
        )
        thread.start()
        threads.append(thread)
    t0 = time.perf_counter()
    go.set()
    for thread in threads:
        thread.join()
    last = [r.last_250 for r in results if r.last_250 is not None]
    firsts = [r.first_250 for r in results if r.first_250 is not None]
    return SendResult(
        t0=t0,
        accepted=sum(r.accepted for r in results),
        rejected=sum(r.rejected for r in results),
        acceptance_s=max(last) - t0 if last else None,
        errors=[e for r in results for e in r.errors],
        first_250=min(firsts) if firsts else None,
    )


# --- one run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    accepted: int
    rejected: int
    delivered: int
    acceptance_s: float | None
    end_to_end_s: float | None
    upstream_connections: int
    problems: list[str]
    start_to_first_250_s: float | None = None
    rss_kib: int | None = None
    peak_rss_kib: int | None = None


def wait_delivered(upstream: UpstreamProcess, expected: int, timeout: float) -> float | None:
    """Poll until the upstream has `expected` messages; perf_counter() when seen, or None."""
    deadline = time.monotonic() + timeout
    while upstream.message_count() < expected:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)  # the polling resolution of the end-to-end time
    return time.perf_counter()


def verify(upstream: UpstreamProcess, run_no: int, accepted: int, size: int) -> list[str]:
    """Check what the upstream stored: every message once, bodies intact. Returns problems."""
    problems: list[str] = []
    body = make_body(size - HEADER_LEN)
    ids: Counter[bytes] = Counter()
    damaged = 0
    for message in upstream.messages():
        data: bytes = message["body"]
        match = BENCH_ID_RE.search(data)
        if match:
            ids[match.group(1)] += 1
        # Compare from the header/body separator on: a relay may add trace headers.
        if data.partition(b"\r\n\r\n")[2] != body:
            damaged += 1
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    if duplicates:
        problems.append(f"{duplicates} duplicate deliveries")
    if damaged:
        problems.append(f"{damaged} messages with a damaged body")
    if len(ids) != accepted:
        problems.append(f"{len(ids)} distinct messages at upstream, {accepted} accepted")
    if not all(tag.startswith(f"r{run_no:03d}-".encode()) for tag in ids):
        problems.append("messages from another run reached this run's upstream")
    return problems


def run_once(args: argparse.Namespace, run_no: int, base: Path) -> RunResult:
    run_dir = base / f"run{run_no}"
    run_dir.mkdir()
    with UpstreamProcess(run_dir / "upstream") as upstream:
        relay: Relay | None = None
        rss = peak = None
        try:
            if args.direct:
                port = upstream.port
            else:
                if args.preload:
                    took = preload_spool(run_dir / "spool", args.preload, make_message(0, 0, 1024))
                    print(f"  preloaded {args.preload} deferred messages in {took:.1f} s")
                relay = start_forwarding_relay(run_dir, upstream.port, args.connections)
                print(f"  relay: {shlex.join(relay.command)}", flush=True)
                port = relay.port
            sent = send_all(port, run_no, args.messages, args.size, args.clients)
            done = wait_delivered(upstream, sent.accepted, args.timeout)
            if relay is not None:
                rss = rss_kib(relay.proc.pid)
                peak = rss_kib(relay.proc.pid, "VmHWM")
        finally:
            if relay is not None:
                relay.stop()
        problems = list(sent.errors)
        if done is None:
            problems.append(f"timed out after {args.timeout:.0f}s waiting for delivery")
        problems += verify(upstream, run_no, sent.accepted, args.size)
        return RunResult(
            accepted=sent.accepted,
            rejected=sent.rejected,
            delivered=upstream.message_count(),
            acceptance_s=sent.acceptance_s,
            end_to_end_s=None if done is None else done - sent.t0,
            upstream_connections=upstream.connection_count(),
            problems=problems,
            start_to_first_250_s=(
                None if relay is None or sent.first_250 is None else sent.first_250 - relay.started
            ),
            rss_kib=rss,
            peak_rss_kib=peak,
        )


# --- main ---------------------------------------------------------------------------------


def _rate(count: int, seconds: float | None) -> float | None:
    return count / seconds if seconds else None


def _fmt_rate(count: int, seconds: float | None) -> str:
    rate = _rate(count, seconds)
    if seconds is None or rate is None:
        return "n/a"
    return f"{count} in {seconds:.3f} s = {rate:.1f} msg/s"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=_positive_int, default=2000, help="per run (2000)")
    parser.add_argument("--size", type=_positive_int, default=4096, help="bytes per message (4096)")
    parser.add_argument("--clients", type=_positive_int, default=10, help="concurrent clients (10)")
    parser.add_argument("--runs", type=_positive_int, default=3, help="fresh relay each run (3)")
    parser.add_argument(
        "--connections", type=_positive_int, default=4, help="relay's upstream pool size (4)"
    )
    parser.add_argument(
        "--direct", action="store_true", help="baseline: send straight to the upstream, no relay"
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        help="messages deferred for a week in the spool before the relay starts (0)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for delivery per run (300)"
    )
    args = parser.parse_args(argv)
    if args.size < HEADER_LEN + 2:
        parser.error(f"--size must be at least {HEADER_LEN + 2} (the headers take {HEADER_LEN})")
    if args.clients > args.messages:
        parser.error("--clients must not exceed --messages")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    if args.direct:
        mode = "direct to upstream (no relay)"
    else:
        mode = f"relay with {args.connections} upstream connections"
    print(
        f"{args.messages} messages x {args.size} bytes, {args.clients} clients, "
        f"{args.runs} runs, {mode}",
        flush=True,
    )
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="mailrelay-bench-") as tmp:
        for run_no in range(1, args.runs + 1):
            print(f"run {run_no}/{args.runs}:", flush=True)
            try:
                result = run_once(args, run_no, Path(tmp))
            except BenchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            results.append(result)
            print(
                f"  acceptance: {_fmt_rate(result.accepted, result.acceptance_s)}\n"
                f"  end-to-end: {_fmt_rate(result.accepted, result.end_to_end_s)}\n"
                f"  upstream: {result.delivered} messages over "
                f"{result.upstream_connections} connections; rejected replies: {result.rejected}",
                flush=True,
            )
            if result.start_to_first_250_s is not None:
                print(
                    f"  relay start to first 250: {result.start_to_first_250_s:.2f} s; "
                    f"RSS at the end {result.rss_kib} KiB (peak {result.peak_rss_kib} KiB)",
                    flush=True,
                )
            for problem in result.problems:
                print(f"  PROBLEM: {problem}", flush=True)

    def median(rates: list[float | None]) -> str:
        known = [r for r in rates if r is not None]
        return f"{statistics.median(known):.1f} msg/s" if known else "n/a"

    print(
        f"median over {len(results)} runs: "
        f"acceptance {median([_rate(r.accepted, r.acceptance_s) for r in results])}, "
        f"end-to-end {median([_rate(r.accepted, r.end_to_end_s) for r in results])}"
    )
    if any(r.problems for r in results):
        print("some runs had problems (see PROBLEM lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
