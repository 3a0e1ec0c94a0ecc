#!/usr/bin/env python3
"""Outbound throughput: our SMTP pool vs Twisted's stock ESMTPSenderFactory. See bench/README.md.

A benchmark, not a test. One process runs the Twisted reactor and both senders; the upstream
is the real test server (tests/support/upstream.py, aiosmtpd) in its own process, on 127.0.0.1.

  pool   mailrelay.outbound.pool.SMTPProvider(ProviderConfig(connections=K)).deliver(), with C
         messages in flight (the pool queues what it cannot send yet); persistent connections.
  stock  twisted.mail.smtp.ESMTPSenderFactory, one TCP connection per message (EHLO, [STARTTLS,
         EHLO, AUTH], MAIL, RCPT, DATA, RSET, QUIT), at most C connections at once: a slot is
         freed when its connection is closed, not at the 250.

Modes: "plain" (tls = "none") and "starttls" (STARTTLS verified against a trustme test CA, then
AUTH PLAIN). Each run, for each mode, starts a fresh upstream and sends N identical-size
messages (1 recipient) through the pool, then N through the stock sender, against that same
upstream process. The upstream's `connections` file gives the connections each sender opened.
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

# Run as `python bench/outbound_pool.py`, so the repository root is not on sys.path yet. It is
# put first, but holds no `mailrelay` package (that is under src/), so
# PYTHONPATH=<another checkout>/src still selects which pool is measured.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.upstream import UpstreamProcess  # noqa: E402

HOST = "127.0.0.1"
HELO = "bench.localhost"
MAIL_FROM = "bench@example.test"
RCPT_TO = "sink@example.test"
AUTH_USER = "bench"
AUTH_SECRET = "bench-secret-not-for-production"
MODES = ("plain", "starttls")
SENDERS = ("pool", "stock")
LINE_CHARS = 76
FILLER = b"abcdefghijklmnopqrstuvwxyz0123456789" * 4
BENCH_ID_RE = re.compile(rb"^X-Bench-Id: (\S+)\r$", re.MULTILINE)


# Set when the reactor starts shutting down before the benchmark is over (Ctrl-C, SIGTERM).
SHUTTING_DOWN: list[bool] = []
# Problems of the untimed warm-up phases (they are not in the results, but fail the run).
WARMUP_PROBLEMS: list[str] = []


class BenchError(Exception):
    """A failure that ends the benchmark with a message and a non-zero exit status."""


# --- the message --------------------------------------------------------------------------


def make_message(tag: str, size: int) -> bytes:
    """Exactly ``size`` bytes, CRLF lines: fixed headers with a unique X-Bench-Id, then
    76-character lines, a few starting with "." (one a lone "."), so both senders dot-stuff."""
    head = (
        f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\nSubject: outbound bench {tag}\r\n"
        f"Message-ID: <{tag}@bench.example.test>\r\nX-Bench-Id: {tag}\r\n\r\n"
    ).encode()
    n = size - len(head)
    if n < 2:
        raise ValueError(f"--size must be at least {len(head) + 2}")
    body = bytearray()
    line_no = 0
    while len(body) < n:
        if line_no == 5:
            text = b"."
        elif line_no % 10 == 3:
            text = b"." + FILLER[line_no % 36 : line_no % 36 + LINE_CHARS - 1]
        else:
            text = FILLER[line_no % 36 : line_no % 36 + LINE_CHARS]
        room = n - len(body) - 2
        text = text[:room]
        if room - len(text) == 1:
            text = text[:-1]  # leave exactly an empty line for the last 2 bytes
        body += text + b"\r\n"
        line_no += 1
    return head + bytes(body)


def tag_for(run_no: int, mode: str, sender: str, msg_no: int) -> str:
    # Fixed width, so every message has the same headers length and the same size.
    return f"r{run_no:03d}-{mode[0]}{sender[0]}-m{msg_no:07d}"


# --- upstream and TLS material ------------------------------------------------------------


@dataclass
class TLSFiles:
    ca: Path  # the test CA's certificate (the trust root of both senders)
    chain: Path  # the upstream's certificate chain, for 127.0.0.1 and localhost
    key: Path
    password: Path  # the AUTH secret, for the pool's password_file


def make_tls_files(base: Path) -> TLSFiles:
    import trustme  # from the `test` extra, like aiosmtpd

    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "localhost")
    files = TLSFiles(base / "ca.pem", base / "chain.pem", base / "key.pem", base / "password")
    ca.cert_pem.write_to_path(str(files.ca))
    cert.private_key_and_cert_chain_pem.write_to_path(str(files.chain))
    cert.private_key_pem.write_to_path(str(files.key))
    files.password.write_text(AUTH_SECRET + "\n")
    files.password.chmod(0o600)
    return files


class Upstreams:
    """Every upstream process started, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self._all: list[UpstreamProcess] = []

    def start(self, out: Path, mode: str, tls: TLSFiles) -> UpstreamProcess:
        options: dict[str, Any] = {}
        if mode == "starttls":
            options = {"tls_cert": tls.chain, "tls_key": tls.key, "auth": (AUTH_USER, AUTH_SECRET)}
        upstream = UpstreamProcess(out, host=HOST, **options)
        self._all.append(upstream)  # before start(): it may be interrupted half-way
        try:
            return upstream.start()
        except (TimeoutError, RuntimeError) as exc:
            raise BenchError(f"the upstream did not start: {exc}") from exc

    def stop_all(self) -> None:
        for upstream in self._all:
            try:
                upstream.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping an upstream failed: {exc!r}", file=sys.stderr)
        self._all.clear()


def check_and_clear(
    upstream: UpstreamProcess, prefix: str, expected: dict[str, bytes]
) -> list[str]:
    """Compare what the upstream stored with what was acknowledged, then delete it, so that
    the next phase starts with an empty messages/ directory. Returns problems."""
    problems: list[str] = []
    seen: Counter[str] = Counter()
    damaged = stray = 0
    for stored in upstream.messages():
        match = BENCH_ID_RE.search(stored["body"])
        tag = match.group(1).decode() if match else ""
        if not tag.startswith(prefix):
            stray += 1
            continue
        seen[tag] += 1
        if (
            stored["body"] != expected.get(tag)
            or stored["mail_from"] != MAIL_FROM
            or stored["rcpt_tos"] != [RCPT_TO]
        ):
            damaged += 1
    missing = sum(1 for tag in expected if tag not in seen)
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    unacknowledged = sum(1 for tag in seen if tag not in expected)
    for count, what in (
        (missing, "acknowledged messages missing at the upstream"),
        (duplicates, "duplicate deliveries"),
        (damaged, "messages stored with a different body or envelope"),
        (unacknowledged, "messages stored but not acknowledged"),
        (stray, "messages from another phase"),
    ):
        if count:
            problems.append(f"{count} {what}")
    for path in upstream.messages_dir.iterdir():
        path.unlink()
    return problems


# --- the two senders ----------------------------------------------------------------------


@dataclass
class Phase:
    mode: str
    sender: str
    delivered: int = 0
    seconds: float = 0.0
    connections: int = 0
    bench_cpu: float = 0.0  # CPU seconds of this process (both senders run in it)
    upstream_cpu: float | None = None  # CPU seconds of the upstream process
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return self.delivered / self.seconds if self.seconds and self.delivered else None


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, from /proc (None where unavailable)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def upstream_cpu(upstream: UpstreamProcess) -> float | None:
    proc = getattr(upstream, "_proc", None)  # UpstreamProcess does not expose its pid
    return None if proc is None else process_cpu(proc.pid)


# One message: returns None when the upstream acknowledged it, else a description.
SendOne = Callable[[bytes], Awaitable[str | None]]


async def drive(
    reactor: Any,
    send: SendOne,
    messages: list[bytes],
    concurrency: int,
    timeout: float,
    state: Callable[[], str] = lambda: "",
) -> tuple[int, float, list[str]]:
    """Send every message with at most ``concurrency`` in flight. Returns (acknowledged,
    seconds from the first send to the last result, failure descriptions)."""
    from twisted.internet import defer

    pending = iter(messages)
    failures: list[str] = []
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for data in pending:  # one iterator shared by all workers
            error = await send(data)
            if error is None:
                ok += 1
            else:
                failures.append(error)

    t0 = time.perf_counter()
    workers = [defer.ensureDeferred(worker()) for _ in range(min(concurrency, len(messages)))]
    all_done = defer.gatherResults(workers, consumeErrors=True)
    expired: list[str] = []

    def expire() -> None:
        expired.append(state())
        all_done.cancel()

    timer = reactor.callLater(timeout, expire)
    try:
        await all_done
    except Exception as exc:
        if expired:
            raise BenchError(
                f"gave up after {timeout:g} s: {ok} acknowledged, {len(failures)} failed"
                f"{'; ' + expired[0] if expired[0] else ''}"
            ) from None
        if isinstance(exc, defer.FirstError):
            exc.subFailure.raiseException()
        raise
    finally:
        if timer.active():
            timer.cancel()
    return ok, time.perf_counter() - t0, failures


async def pool_phase(
    reactor: Any, mode: str, port: int, tls: TLSFiles, connections: int,
    messages: list[bytes], concurrency: int, timeout: float,
) -> tuple[int, float, list[str]]:  # fmt: skip
    # Imported here, after PYTHONPATH has picked the mailrelay to measure.
    from mailrelay.config import ProviderConfig
    from mailrelay.metrics import Metrics
    from mailrelay.outbound.pool import SMTPProvider
    from mailrelay.outbound.results import Kind, OutboundMessage

    options: dict[str, Any] = {"tls": "none"}
    if mode == "starttls":
        options = {
            "tls": "starttls",
            "ca_file": str(tls.ca),
            "username": AUTH_USER,
            "password_file": str(tls.password),
        }
    config = ProviderConfig(
        name=f"bench-{mode}", kind="smtp", host=HOST, port=port, helo=HELO,
        connections=connections, connect_timeout=10, **options,
    )  # fmt: skip
    provider = SMTPProvider(config, reactor, Metrics())
    counter = iter(range(1, len(messages) + 1))

    async def send(data: bytes) -> str | None:
        message = OutboundMessage(f"B{next(counter):07d}", MAIL_FROM, (RCPT_TO,), data)
        results = await provider.deliver(message)
        bad = [r for r in results if r.kind is not Kind.DELIVERED]
        return None if not bad else "; ".join(f"{r.kind.value}: {r.reply}" for r in bad)

    def state() -> str:
        waiting = getattr(provider, "_waiting", None)
        return (
            f"pool has {getattr(provider, 'open_connections', '?')} open connections, "
            f"{'?' if waiting is None else len(waiting)} messages waiting"
        )

    try:
        return await drive(reactor, send, messages, concurrency, timeout, state)
    finally:
        # QUIT the pool's connections (outside the timed window; the stock sender's QUITs are
        # inside it, see the README) so that its connection count is final.
        await provider.close()


def stock_classes(nodelay: bool) -> tuple[type, type]:
    """ESMTPSenderFactory and ESMTPSender with the few changes this benchmark needs."""
    from twisted.internet import defer
    from twisted.mail import smtp

    class Sender(smtp.ESMTPSender):  # type: ignore[misc]
        def _registerAuthenticators(self) -> None:
            # ESMTPSender registers CRAM-MD5, LOGIN and PLAIN, and uses the first the server
            # offers: LOGIN from aiosmtpd, one more round trip. Only PLAIN, like our pool.
            self.registerAuthenticator(smtp.PLAINAuthenticator(self.username))

        def connectionMade(self) -> None:
            if nodelay:  # --stock-nodelay; the stock sender leaves Nagle on
                self.transport.setTcpNoDelay(True)
            super().connectionMade()

    class Factory(smtp.ESMTPSenderFactory):  # type: ignore[misc]
        """The stock factory, plus a Deferred that fires when its connection is gone."""

        protocol = Sender
        domain = HELO.encode()  # the EHLO name: instead of socket.getfqdn(), like the pool's

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.gone: defer.Deferred[None] = defer.Deferred()

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            try:
                super().clientConnectionFailed(connector, reason)
            finally:
                self.gone.callback(None)

        def clientConnectionLost(self, connector: Any, reason: Any) -> None:
            try:
                super().clientConnectionLost(connector, reason)
            finally:
                self.gone.callback(None)

    return Factory, Sender


async def stock_phase(
    reactor: Any, mode: str, port: int, tls: TLSFiles,
    messages: list[bytes], concurrency: int, timeout: float, nodelay: bool = False,
) -> tuple[int, float, list[str]]:  # fmt: skip
    from twisted.internet import defer
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    factory_class, _ = stock_classes(nodelay)
    if mode == "starttls":
        # Verified TLS: chain to the test CA and the name (an IP address SAN here).
        context = optionsForClientTLS(HOST, trustRoot=Certificate.loadPEM(tls.ca.read_bytes()))
        credentials: tuple[bytes | None, bytes | None] = (AUTH_USER.encode(), AUTH_SECRET.encode())
    else:
        context = None
        credentials = (None, None)
    secure = mode == "starttls"

    async def send(data: bytes) -> str | None:
        result: defer.Deferred[Any] = defer.Deferred()
        factory = factory_class(
            credentials[0], credentials[1], MAIL_FROM, [RCPT_TO],
            # The stock sender reads local line endings and turns "\n" into CRLF itself.
            BytesIO(data.replace(b"\r\n", b"\n")), result,
            retries=0, timeout=60, contextFactory=context, heloFallback=False,
            requireAuthentication=secure, requireTransportSecurity=secure,
        )  # fmt: skip
        connector = reactor.connectTCP(HOST, port, factory, timeout=10)
        open_now[0] += 1
        error: str | None = None
        try:
            try:
                accepted, _ = await result
                if accepted != 1:
                    error = f"{accepted} recipients accepted"
            except defer.CancelledError:
                raise
            except Exception as exc:
                error = repr(exc)
            await factory.gone  # the slot is the connection: free once it is closed
        except defer.CancelledError:  # the phase timed out
            factory.sendFinished = True  # its result is gone: do not errback it again
            connector.disconnect()
            raise
        finally:
            open_now[0] -= 1
        return error

    open_now = [0]
    return await drive(
        reactor, send, messages, concurrency, timeout, lambda: f"{open_now[0]} connections open"
    )


# --- runs ---------------------------------------------------------------------------------


async def run_phase(
    reactor: Any, args: argparse.Namespace, upstream: UpstreamProcess, tls: TLSFiles,
    run_no: int, mode: str, sender: str, count: int, timed: bool,
) -> Phase:  # fmt: skip
    tags = [tag_for(run_no if timed else 0, mode, sender, n) for n in range(count)]
    messages = {tag: make_message(tag, args.size) for tag in tags}
    before = upstream.connection_count()
    cpu_before = time.process_time(), upstream_cpu(upstream)
    if sender == "pool":
        ok, seconds, failures = await pool_phase(
            reactor, mode, upstream.port, tls, args.pool_connections,
            list(messages.values()), args.concurrency, args.timeout,
        )  # fmt: skip
    else:
        ok, seconds, failures = await stock_phase(
            reactor, mode, upstream.port, tls, list(messages.values()), args.concurrency,
            args.timeout, args.stock_nodelay,
        )  # fmt: skip
    phase = Phase(mode, sender, ok, seconds, upstream.connection_count() - before)
    phase.bench_cpu = time.process_time() - cpu_before[0]
    cpu_after = upstream_cpu(upstream)
    if cpu_before[1] is not None and cpu_after is not None:
        phase.upstream_cpu = cpu_after - cpu_before[1]
    if failures:
        phase.problems.append(f"{len(failures)} messages not delivered, e.g. {failures[0]}")
    # Failed messages may or may not be stored: only check the acknowledged ones if all were.
    expected = messages if not failures else {}
    prefix = tags[0].rsplit("-m", 1)[0]
    problems = check_and_clear(upstream, prefix, expected)
    if not failures:
        phase.problems += problems
    return phase


async def bench(
    reactor: Any, args: argparse.Namespace, base: Path, upstreams: Upstreams
) -> list[list[Phase]]:
    tls = make_tls_files(base)
    runs: list[list[Phase]] = []
    for run_no in range(1, args.runs + 1):
        print(f"run {run_no}/{args.runs}:", flush=True)
        phases: list[Phase] = []
        for mode in args.modes:
            out = base / f"run{run_no}-{mode}"
            upstream = upstreams.start(out, mode, tls)
            try:
                if args.warmup:
                    # Untimed, unreported: first-use costs (imports, TLS contexts) in this
                    # process and in the fresh upstream.
                    for sender in SENDERS:
                        warmup = await run_phase(
                            reactor, args, upstream, tls, run_no, mode, sender, args.warmup, False
                        )
                        for problem in warmup.problems:
                            WARMUP_PROBLEMS.append(problem)
                            print(f"  PROBLEM: warm-up, {mode} {sender}: {problem}", flush=True)
                for sender in SENDERS:  # A B, every run and mode: ABAB... over the session
                    phase = await run_phase(
                        reactor, args, upstream, tls, run_no, mode, sender, args.messages, True
                    )
                    if SHUTTING_DOWN:
                        # Ctrl-C or SIGTERM: the phase ended because its connections were
                        # dropped. Print nothing about it.
                        return runs
                    phases.append(phase)
                    print(f"  {mode:<8} {sender:<5} {format_phase(phase)}", flush=True)
                    for problem in phase.problems:
                        print(f"  PROBLEM: {problem}", flush=True)
            finally:
                upstream.stop()
        runs.append(phases)
    return runs


# --- output -------------------------------------------------------------------------------


def format_phase(phase: Phase) -> str:
    rate = phase.rate
    return (
        f"{phase.delivered} in {phase.seconds:.3f} s = "
        f"{'n/a' if rate is None else f'{rate:.1f}'} msg/s, "
        f"{phase.connections} connections; CPU s: bench {phase.bench_cpu:.2f}, upstream "
        f"{'n/a' if phase.upstream_cpu is None else f'{phase.upstream_cpu:.2f}'}"
    )


def summary(args: argparse.Namespace, runs: list[list[Phase]]) -> str:
    def median_rate(mode: str, sender: str) -> float | None:
        rates = [p.rate for run in runs for p in run if (p.mode, p.sender) == (mode, sender)]
        known = [r for r in rates if r is not None]
        return statistics.median(known) if known else None

    def connections(mode: str, sender: str) -> str:
        counts = sorted(
            {p.connections for run in runs for p in run if (p.mode, p.sender) == (mode, sender)}
        )
        return "/".join(str(c) for c in counts)

    pool_head = f"pool K={args.pool_connections}"
    lines = [
        f"median over {len(runs)} runs, {args.messages} messages x {args.size} bytes, "
        f"{args.concurrency} in flight:",
        f"  {'mode':<9} {pool_head + ' msg/s':>18} {'stock msg/s':>12} {'pool/stock':>11}"
        f" {'connections pool':>17} {'stock':>6}",
    ]
    for mode in args.modes:
        pool, stock = median_rate(mode, "pool"), median_rate(mode, "stock")
        ratio = f"{pool / stock:.2f}x" if pool and stock else "n/a"
        lines.append(
            f"  {mode:<9} {'n/a' if pool is None else f'{pool:.1f}':>18}"
            f" {'n/a' if stock is None else f'{stock:.1f}':>12} {ratio:>11}"
            f" {connections(mode, 'pool'):>17} {connections(mode, 'stock'):>6}"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(MODES)}")
    return modes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=_positive_int, default=2000, help="per sender and run")
    parser.add_argument("--size", type=_positive_int, default=4096, help="bytes per message")
    parser.add_argument(
        "--concurrency", type=_positive_int, default=10,
        help="messages in flight, both senders (10); the stock sender's connections at once",
    )  # fmt: skip
    parser.add_argument(
        "--pool-connections", type=_positive_int, default=4,
        help="the pool's `connections` (4, the relay's default)",
    )  # fmt: skip
    parser.add_argument(
        "--stock-nodelay", action="store_true",
        help="set TCP_NODELAY on the stock sender's connections (not its default)",
    )  # fmt: skip
    parser.add_argument("--runs", type=_positive_int, default=3, help="runs (3)")
    parser.add_argument("--modes", type=_modes, default=MODES, help="plain,starttls (both)")
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=20,
        help="untimed messages per sender before each mode's timed phases (20; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per phase (300)"
    )
    args = parser.parse_args(argv)
    try:
        make_message(tag_for(0, "plain", "pool", 0), args.size)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import twisted

    import mailrelay.outbound.pool

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"pool: {mailrelay.outbound.pool.__file__}; twisted {twisted.__version__}")
    print(
        f"{args.messages} messages x {args.size} bytes, 1 recipient, {args.runs} runs, modes "
        f"{','.join(args.modes)}; {args.concurrency} messages in flight for both senders:\n"
        f"  pool:  SMTPProvider, connections={args.pool_connections}, persistent\n"
        f"  stock: ESMTPSenderFactory, one connection per message, at most "
        f"{args.concurrency} at once{', TCP_NODELAY' if args.stock_nodelay else ''}",
        flush=True,
    )
    upstreams = Upstreams()
    outcome: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="mailrelay-bench-pool-") as tmp:
            try:
                from twisted.internet import defer, reactor

                def finished(result: Any) -> None:
                    if SHUTTING_DOWN:
                        return  # interrupted: whatever the coroutine ended with is moot
                    outcome["result"] = result
                    reactor.stop()

                reactor.addSystemEventTrigger("before", "shutdown", SHUTTING_DOWN.append, True)

                def start() -> None:
                    d = defer.ensureDeferred(bench(reactor, args, Path(tmp), upstreams))
                    d.addBoth(finished)

                reactor.callWhenRunning(start)
                # SIGINT and SIGTERM stop the reactor (Twisted's handlers); the finally
                # below then stops the upstreams.
                reactor.run()
            finally:
                upstreams.stop_all()
    except KeyboardInterrupt:  # before the reactor runs
        print("interrupted", file=sys.stderr)
        return 130
    if "result" not in outcome:
        print("interrupted", file=sys.stderr)
        return 130
    result = outcome["result"]
    if not isinstance(result, list):  # a Failure
        if isinstance(result.value, BenchError):
            print(f"error: {result.value}", file=sys.stderr)
        else:
            print(f"error: {result.getTraceback()}", file=sys.stderr)
        return 1
    print(summary(args, result))
    if WARMUP_PROBLEMS or any(p.problems for run in result for p in run):
        print("some phases had problems (see PROBLEM lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
