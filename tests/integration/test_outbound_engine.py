"""The outbound engine as a whole: SMTPProvider pools behind a Router, the real reactor, real
upstream processes on loopback: aiosmtpd (tests/support/upstream.py), and Postfix's smtp-sink
where the upstream must not be the bottleneck (thousands of messages a second).

What is checked here is what one component test cannot show: the circuit breaker moving
traffic between two live upstreams (and back), the rate limiter pacing a real pool, connection
reuse over many messages, and recipient batching as the upstream sees it.

Waiting is done on Deferreds or by polling with a deadline while the reactor keeps running
(``poll`` below); tests/support/net.py's ``wait_until`` sleeps in the reactor thread, so it is
used only where nothing of ours has to run meanwhile (starting an upstream).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress, ITCPTransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.config import ProviderConfig
from mailrelay.metrics import Metrics
from mailrelay.outbound.breaker import BreakerState
from mailrelay.outbound.pool import SMTPProvider
from mailrelay.outbound.results import Kind, OutboundMessage
from mailrelay.outbound.router import RoutedResult, Router
from tests.support.net import free_port
from tests.support.polling import poll
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.integration

BODY = b"Subject: engine\r\n\r\nhello\r\n"


def provider_config(port: int, name: str, **options: Any) -> ProviderConfig:
    settings: dict[str, Any] = {"tls": "none", "helo": "relay.test", "connect_timeout": 5.0}
    settings.update(options)
    return ProviderConfig(name=name, kind="smtp", host="127.0.0.1", port=port, **settings)


def outbound(queue_id: str, recipients: tuple[str, ...] = ("user@example.com",)) -> OutboundMessage:
    return OutboundMessage(
        queue_id=queue_id, sender="app@example.com", recipients=recipients, body=BODY
    )


async def pause(seconds: float) -> None:
    """Let the reactor run for ``seconds`` (pacing traffic, never waiting for an event)."""
    await task.deferLater(reactor, seconds)


def arrival_times(upstream: UpstreamProcess) -> list[float]:
    """When each stored message arrived: the mtime of its messages/<seq>.json, in seq order
    (the upstream writes it just before answering the final dot). File timestamps come from
    the kernel's coarse clock: a few milliseconds of granularity."""
    paths = sorted(upstream.messages_dir.glob("*.json"), key=lambda p: int(p.stem))
    return [os.stat(p).st_mtime for p in paths]


def connections_ok(metrics: Metrics, provider: str) -> float:
    value = metrics.registry.get_sample_value(
        "mailrelay_upstream_connections_total", {"provider": provider, "result": "ok"}
    )
    return value or 0.0


def record_breaker_gauge(metrics: Metrics, provider: str) -> list[int]:
    """Every value the mailrelay_upstream_breaker_state gauge of ``provider`` is set to, in
    order, starting with its current value (0 closed, 1 half-open, 2 open)."""
    child = metrics.upstream_breaker_state.labels(provider)
    values = [int(child._value.get())]
    original = child.set

    def recording_set(value: float) -> None:
        values.append(int(value))
        original(value)

    setattr(child, "set", recording_set)  # noqa: B010  (an instance attribute, on purpose)
    return values


def compress(values: list[int]) -> str:
    """The gauge's transitions: repeated values dropped, as a string ("0212..." )."""
    out: list[str] = []
    for v in values:
        if not out or out[-1] != str(v):
            out.append(str(v))
    return "".join(out)


class _Silent(Protocol):
    """Accepts the TCP connection and never says anything (no greeting)."""

    def __init__(self, listener: HangingListener) -> None:
        self.listener = listener

    def connectionMade(self) -> None:
        self.listener.accepted += 1
        self.listener.live.append(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self in self.listener.live:
            self.listener.live.remove(self)


class _SilentFactory(ServerFactory):
    def __init__(self, listener: HangingListener) -> None:
        self.listener = listener

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        protocol = _Silent(self.listener)
        protocol.factory = self
        return protocol


class HangingListener:
    """A listening socket on 127.0.0.1:port that accepts connections and never greets."""

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self.live: list[_Silent] = []
        self._port = reactor.listenTCP(port, _SilentFactory(self), interface="127.0.0.1")

    async def close(self) -> None:
        for protocol in list(self.live):
            cast(ITCPTransport, protocol.transport).abortConnection()
        await defer.maybeDeferred(self._port.stopListening)


async def reserve_port() -> int:
    """A loopback port that nothing listens on now (bound by us a moment ago, then closed)."""
    port = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
    number: int = cast(IPv4Address, port.getHost()).port
    await defer.maybeDeferred(port.stopListening)
    return number


SMTP_SINK = "/usr/sbin/smtp-sink"


class SmtpSink:
    """Postfix's smtp-sink as a fast upstream (thousands of messages a second, where aiosmtpd
    does a few hundred), counting sessions, QUITs and messages itself (its ``-c`` counters)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="smtp-sink-")
        self._output = Path(self._dir.name) / "counters"
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self) -> SmtpSink:
        self.port = free_port()
        # As root, smtp-sink insists on dropping privileges after binding.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        cmd = [SMTP_SINK, *user, "-c", f"127.0.0.1:{self.port}", "1000"]
        with self._output.open("wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        # Ready once the port listens; a probe connection would be counted as a session.
        await poll(
            lambda: self._listening() or self._proc is None or self._proc.poll() is not None,
            timeout=10,
            what=f"smtp-sink to listen on port {self.port}",
        )
        if self._proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited: {self._output.read_text(errors='replace')}")
        return self

    def _listening(self) -> bool:
        local = f"0100007F:{self.port:04X}"
        with open("/proc/net/tcp") as table:
            return any(
                fields[1] == local and fields[3] == "0A"  # 0A: LISTEN
                for fields in (line.split() for line in table)
            )

    def counters(self) -> dict[str, int]:
        """The latest counters: {"sess": sessions ended, "quit": QUITs, "mesg": messages}.
        smtp-sink rewrites one line ending in CR after each event."""
        records = self._output.read_bytes().decode(errors="replace").split("\r")
        complete = [r for r in records[:-1] if r.startswith("sess=")]
        if not complete:
            return {"sess": 0, "quit": 0, "mesg": 0}
        return {k: int(v) for k, v in (f.split("=") for f in complete[-1].split())}

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._dir.cleanup()


async def deliver_all(
    router: Router, messages: Iterator[OutboundMessage], in_flight: int
) -> list[list[RoutedResult]]:
    """Deliver every message, at most ``in_flight`` at once (as the relay's queue feeds the
    router), results in the messages' order."""
    results: dict[int, list[RoutedResult]] = {}
    numbered = enumerate(messages)

    async def worker() -> None:
        for index, message in numbered:
            results[index] = await router.deliver(message)

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(in_flight)])
    return [results[i] for i in range(len(results))]


class OutboundEngine(TestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()

    def start_upstream(self, **options: Any) -> UpstreamProcess:
        upstream = UpstreamProcess(**options)
        upstream.__enter__()
        self.addCleanup(upstream.__exit__, None, None, None)
        return upstream

    async def start_sink(self) -> SmtpSink:
        if not os.access(SMTP_SINK, os.X_OK):
            raise SkipTest(f"{SMTP_SINK} (Debian package postfix) is not installed")
        sink = SmtpSink()
        self.addCleanup(sink.stop)
        return await sink.start()

    def make_provider(self, port: int, name: str, **options: Any) -> SMTPProvider:
        provider = SMTPProvider(provider_config(port, name, **options), reactor, self.metrics)
        self.addCleanup(provider.close)
        return provider

    # -- 1 --------------------------------------------------------------------------------

    async def test_breaker_moves_traffic_to_backup_and_back(self) -> None:
        backup_upstream = self.start_upstream()
        primary_port = await reserve_port()
        primary = self.make_provider(
            primary_port,
            "primary",
            connect_timeout=1.0,
            greeting_timeout=1.0,
            breaker_threshold=3,
            breaker_cooldown=1.0,
            breaker_max_cooldown=2.0,
        )
        backup = self.make_provider(backup_upstream.port, "backup")
        router = Router([primary, backup])
        gauge = record_breaker_gauge(self.metrics, "primary")
        # (phase, seconds the delivery took, provider, kind, primary's breaker state at send)
        sent: list[tuple[str, float, str, Kind, BreakerState]] = []
        serial = iter(range(1_000_000))

        async def send(phase: str) -> RoutedResult:
            state = primary.breaker.state
            started = time.monotonic()
            (routed,) = await router.deliver(outbound(f"{phase}{next(serial)}"))
            sent.append(
                (phase, time.monotonic() - started, routed.provider, routed.result.kind, state)
            )
            return routed

        # Phase A: the primary refuses connections. Each message fails over to the backup;
        # the third failure in a row opens the breaker.
        for i in range(3):
            routed = await send("A")
            assert (routed.provider, routed.result.kind) == ("backup", Kind.DELIVERED)
            expected = BreakerState.OPEN if i == 2 else BreakerState.CLOSED
            assert primary.breaker.state is expected, (i, primary.breaker.state)
        opened_at = time.monotonic()
        for _ in range(3):  # breaker open: answered at once, no new connection attempt
            routed = await send("A")
            assert (routed.provider, routed.result.kind) == ("backup", Kind.DELIVERED)
        refused = self.metrics.registry.get_sample_value(
            "mailrelay_upstream_connections_total", {"provider": "primary", "result": "connect"}
        )
        assert refused == 3

        # Phase B: the primary now accepts and never greets. The half-open probe hangs there
        # until greeting_timeout; meanwhile every message is answered at once by the backup.
        hanging = HangingListener(primary_port)
        try:

            def probe_failed() -> bool:
                return hanging.accepted >= 1 and compress(gauge).endswith("212")

            while not probe_failed():
                assert time.monotonic() - opened_at < 10, f"no failed probe: {gauge}"
                await send("B")
                await pause(0.05)
        finally:
            await hanging.close()
        phase_b = [s for s in sent if s[0] == "B"]
        assert hanging.accepted == 1  # only the probe: no message tried the hanging primary
        assert {(s[2], s[3]) for s in phase_b} == {("backup", Kind.DELIVERED)}
        # Some were sent while the probe hung (half-open): they did not wait for it either.
        assert any(s[4] is BreakerState.HALF_OPEN for s in phase_b), phase_b
        assert connections_ok(self.metrics, "primary") == 0

        # Phase C: the primary comes back on the same port; after the (doubled) cooldown the
        # probe's session comes up, the breaker closes, traffic returns to the primary.
        primary_upstream = self.start_upstream(port=primary_port)
        assert primary_upstream.port == primary_port
        back_at = time.monotonic()
        while not sent or sent[-1][2] != "primary":
            assert time.monotonic() - back_at < 10, f"traffic never returned: {gauge}"
            await send("C")
            await pause(0.05)
        returned_after = time.monotonic() - back_at
        for _ in range(5):
            routed = await send("C")
            assert (routed.provider, routed.result.kind) == ("primary", Kind.DELIVERED)
        assert primary.breaker.state is BreakerState.CLOSED

        # closed -> open -> (half-open -> open after the hung probe)+ -> half-open -> closed
        transitions = compress(gauge)
        assert re.fullmatch(r"0(21)+0", transitions), gauge
        assert transitions.count("21") >= 2, gauge  # at least the failed probe and the good one
        after_open = [s for s in sent if s[0] in "BC"] + sent[3:6]
        assert max(s[1] for s in after_open) < 0.5, sorted(s[1] for s in after_open)[-5:]
        to_primary = sum(1 for s in sent if s[2] == "primary")
        to_backup = sum(1 for s in sent if s[2] == "backup")
        assert primary_upstream.message_count() == to_primary
        assert backup_upstream.message_count() == to_backup
        assert all(s[3] is Kind.DELIVERED for s in sent)
        print(
            f"\nfailover: {len(sent)} messages ({to_backup} backup, {to_primary} primary);"
            f" slowest after the breaker opened {max(s[1] for s in after_open) * 1000:.1f} ms;"
            f" back on primary {returned_after:.2f} s after it returned; gauge {transitions}"
        )

    # -- 2 --------------------------------------------------------------------------------

    async def test_rate_limit_paces_a_busy_pool(self) -> None:
        upstream = self.start_upstream()
        provider = self.make_provider(upstream.port, "paced", rate=50, connections=4)
        router = Router([provider])
        count = 600
        first: list[tuple[float, float]] = []  # (monotonic, process_time) at the first result
        cpu: list[float] = []
        done = defer.Deferred[None]()

        def sample_cpu() -> None:
            wall = time.monotonic() - first[0][0]
            cpu.append((time.process_time() - first[0][1]) / wall)
            done.callback(None)

        def result(routed: list[RoutedResult]) -> list[RoutedResult]:
            if not first:
                first.append((time.monotonic(), time.process_time()))
                reactor.callLater(10.0, sample_cpu)
            return routed

        pending = [router.deliver(outbound(f"R{i}")).addCallback(result) for i in range(count)]
        await done  # the 10 s after the first arrival, mail waiting in the pool's FIFO
        results = await defer.gatherResults(pending)
        assert all(r[0].result.kind is Kind.DELIVERED for r in results)
        assert upstream.message_count() == count

        times = arrival_times(upstream)
        start = times[0]
        assert times[-1] >= start + 10, "the upstream saw less than 10 s of traffic"
        per_second = [sum(1 for t in times if start + k <= t < start + k + 1) for k in range(10)]
        elapsed = times[-1] - start
        print(
            f"\nrate 50/s: per-second arrivals {per_second}; overall"
            f" {(count - 1) / elapsed:.2f}/s; CPU {cpu[0] * 100:.1f}% of one core"
        )
        # 50 ± 5% in every second: at most 52 (50, +1 at a window's edge, +1 for the coarse
        # file clock), at least 48.
        assert all(48 <= n <= 52 for n in per_second), per_second
        assert cpu[0] < 0.25, f"{cpu[0]:.1%} of a core while mail waits"

    async def test_rate_limit_keeps_the_configured_pace(self) -> None:
        """A backlog drains at the configured rate, not at rate minus the reactor's timer
        lateness. Against smtp-sink so that the upstream is never the bottleneck."""
        sink = await self.start_sink()
        rate, count = 200, 601
        provider = self.make_provider(sink.port, "paced", rate=rate, connections=4)
        router = Router([provider])
        arrived: list[float] = []

        def result(routed: list[RoutedResult]) -> list[RoutedResult]:
            arrived.append(time.monotonic())
            return routed

        pending = [router.deliver(outbound(f"P{i}")).addCallback(result) for i in range(count)]
        results = await defer.gatherResults(pending)
        assert all(r[0].result.kind is Kind.DELIVERED for r in results)
        pace = (count - 1) / (arrived[-1] - arrived[0])
        print(f"\npace at rate {rate}/s: {pace:.1f}/s ({pace / rate:.1%})")
        # Neither faster than configured, nor slower by the reactor's timer lateness (a late
        # wake-up's delay is made up, limits.py Gcra.take).
        assert rate * 0.98 <= pace <= rate * 1.02, pace

    # -- 3 --------------------------------------------------------------------------------

    async def test_ten_thousand_messages_reuse_four_connections(self) -> None:
        sink = await self.start_sink()
        provider = self.make_provider(sink.port, "bulk", connections=4)
        router = Router([provider])
        count = 10_000
        started = time.monotonic()
        results = await deliver_all(router, (outbound(f"M{i}") for i in range(count)), 64)
        took = time.monotonic() - started
        assert len(results) == count
        assert all(r[0].result.kind is Kind.DELIVERED for r in results)
        await provider.close()  # QUITs the idle connections: smtp-sink counts ended sessions
        await poll(
            lambda: (
                sink.counters()["mesg"] == count
                and sink.counters()["sess"] == sink.counters()["quit"]
            ),
            timeout=10,
            what="every session to end at smtp-sink",
        )
        counters = sink.counters()
        connections = counters["sess"]
        print(
            f"\nreuse: {count} messages in {took:.1f} s ({count / took:.0f}/s),"
            f" {connections} connections at the upstream"
        )
        max_per = provider.config.max_messages_per_connection
        # 4 slots, each replaced after max_messages_per_connection messages.
        assert connections <= 4 + math.ceil(count / max_per), counters
        # ... and replaced they were: no connection carried more than max_per messages.
        assert connections >= math.ceil(count / max_per), counters
        assert connections == counters["quit"]  # every one ended politely, with QUIT
        assert connections == connections_ok(self.metrics, "bulk")

    # -- 4 --------------------------------------------------------------------------------

    async def test_recipient_batches_reach_the_upstream_in_order(self) -> None:
        upstream = self.start_upstream()
        provider = self.make_provider(upstream.port, "batched", batch_size=20, batch_delay=0.2)
        router = Router([provider])
        recipients = tuple(f"rcpt{i:02d}@example.com" for i in range(45))
        routed = await router.deliver(outbound("B1", recipients))

        assert [r.result.recipient for r in routed] == list(recipients)
        assert {(r.provider, r.result.kind) for r in routed} == {("batched", Kind.DELIVERED)}
        stored = upstream.messages()
        assert [m["rcpt_tos"] for m in stored] == [
            list(recipients[0:20]),
            list(recipients[20:40]),
            list(recipients[40:45]),
        ]
        assert all(m["body"] == BODY for m in stored)
        times = arrival_times(upstream)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        print(f"\nbatching: gaps between transactions {[round(g, 3) for g in gaps]} s")
        # File mtimes come from the kernel's coarse clock (a few ms behind): allow 10 ms.
        assert all(g >= 0.2 - 0.01 for g in gaps), gaps
