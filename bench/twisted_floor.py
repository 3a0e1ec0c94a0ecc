"""The floor: what the least SMTP a Twisted process can speak costs in CPU per message.

Two bare Twisted programs, no spool, no fsync, no logging, no checks:

- inbound: a server that answers smtp-source's session (220, HELO/EHLO, MAIL, RCPT, DATA, the
  body up to the final dot, QUIT) with canned replies, one connection per message;
- outbound: a client that sends N messages over K persistent connections to smtp-sink,
  MAIL/RCPT/DATA pipelined in one write, then the body.

Each runs in a process of its own, whose CPU (user + system, from /proc) is divided by the
messages it handled. Beside them, the same load on Postfix's smtp-sink (C) as the inbound
server. What mailrelay does per message is a superset of both halves (plus the spool's writes,
fsyncs and reads, and two processes' hand-off), so their sum is a lower bound for it in
CPython on this machine.

    .venv/bin/python bench/twisted_floor.py [--messages 4000] [--clients 10] [--runs 3]

Needs smtp-source and smtp-sink (Debian: package postfix; nothing is configured). Loopback
only, ports chosen at random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as `python bench/twisted_floor.py`, so the repository root is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    BenchError,
    cpu_ticks,
    free_ports,
    start_relay,
    toml_str,
    tool,
    tree_cpu_ticks,
)
from tests.support.net import wait_for_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

# -- the two bare programs (run as `python twisted_floor.py --serve PORT` / `--send ...`) -------


def serve(port: int) -> None:
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import ITCPTransport

    replies = {
        b"HELO": b"250 floor\r\n",
        b"EHLO": b"250-floor\r\n250 PIPELINING\r\n",
        b"MAIL": b"250 2.1.0 Ok\r\n",
        b"RCPT": b"250 2.1.5 Ok\r\n",
        b"RSET": b"250 2.0.0 Ok\r\n",
        b"NOOP": b"250 2.0.0 Ok\r\n",
    }

    class Session(protocol.Protocol):
        def connectionMade(self) -> None:
            transport = self.transport
            if ITCPTransport.providedBy(transport):
                transport.setTcpNoDelay(True)
            self.buffer = b""
            self.in_data = False
            transport.write(b"220 floor ESMTP\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            out = []
            while True:
                if self.in_data:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    self.buffer = self.buffer[end + 5 :]
                    self.in_data = False
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                    continue
                line_end = self.buffer.find(b"\r\n")
                if line_end < 0:
                    break
                line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2 :]
                verb = line[:4].upper()
                if verb == b"DATA":
                    self.in_data = True
                    # The body search above needs the CRLF before a dot on the first line.
                    self.buffer = b"\r\n" + self.buffer
                    out.append(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    out.append(b"221 2.0.0 Bye\r\n")
                    self.transport.write(b"".join(out))
                    self.transport.loseConnection()
                    return
                else:
                    out.append(replies.get(verb, b"502 5.5.2 ?\r\n"))
            if out:
                self.transport.write(b"".join(out))

    factory = protocol.Factory.forProtocol(Session)
    reactor.listenTCP(port, factory, backlog=512, interface="127.0.0.1")  # type: ignore[attr-defined]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


def send(port: int, messages: int, connections: int, size: int) -> None:
    from twisted.internet import defer, protocol, reactor
    from twisted.internet.interfaces import ITCPTransport

    body = b"Subject: floor\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78) + b".\r\n"
    envelope = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    left = [messages]
    done: defer.Deferred[None] = defer.Deferred()

    class Sender(protocol.Protocol):
        def connectionMade(self) -> None:
            transport = self.transport
            if ITCPTransport.providedBy(transport):
                transport.setTcpNoDelay(True)
            self.buffer = b""
            self.expect = 2  # banner, EHLO
            transport.write(b"EHLO floor\r\n")

        def next_message(self) -> None:
            if left[0] == 0:
                self.transport.write(b"QUIT\r\n")
                self.expect = -1
                return
            left[0] -= 1
            self.expect = 3  # MAIL, RCPT, DATA (354)
            self.transport.write(envelope)

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                if line[3:4] == b"-":
                    continue  # a multiline reply goes on
                if self.expect == -1:
                    return
                self.expect -= 1
                if self.expect == 0:
                    if line.startswith(b"354"):
                        self.expect = 1  # the reply to the final dot
                        self.transport.write(body)
                    else:  # the EHLO reply, or the one to the final dot
                        self.next_message()

        def connectionLost(self, reason: object) -> None:
            open_connections[0] -= 1
            if open_connections[0] == 0 and not done.called:
                done.callback(None)

    open_connections = [connections]
    # Its own CPU from here (imports and start-up left out), printed for the parent.
    start = os.times()

    def report(_: object) -> None:
        end = os.times()
        cpu = end.user - start.user + end.system - start.system
        print(f"cpu {cpu} elapsed {end.elapsed - start.elapsed}", flush=True)

    done.addCallback(report)
    creator = protocol.ClientCreator(reactor, Sender)
    for _ in range(connections):
        creator.connectTCP("127.0.0.1", port)
    done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- the measurement ------------------------------------------------------------------------------


def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise BenchError(f"the server did not start: {line!r}")


def run_inbound(
    server: str, messages: int, clients: int, size: int, timeout: float
) -> tuple[float, float]:
    """msg/s and the server's CPU ms per message, smtp-source -> ``server``."""
    (port,) = free_ports(1)
    process: subprocess.Popen[Any]
    if server == "twisted":
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True
        )
        wait_ready(process)
    else:
        process = sink_process(port)
    try:
        before = cpu_ticks(process.pid)
        started = time.monotonic()
        run_smtp_source(port, messages, clients, size, timeout)
        elapsed = time.monotonic() - started
        after = cpu_ticks(process.pid)
        if before is None or after is None:
            raise BenchError(f"the {server} server exited during the run")
        return messages / elapsed, (after - before) * 1000 / TICK / messages
    finally:
        process.terminate()
        process.wait()


def run_outbound(messages: int, connections: int, size: int, timeout: float) -> tuple[float, float]:
    """msg/s and the bare Twisted client's CPU ms per message, client -> smtp-sink."""
    (port,) = free_ports(1)
    sink = sink_process(port)
    try:
        numbers = (port, messages, connections, size)
        client = subprocess.run(
            [sys.executable, __file__, "--send", *map(str, numbers)],
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        reported = [line for line in client.stdout.splitlines() if line.startswith("cpu ")]
        if client.returncode != 0 or not reported:
            raise BenchError(f"the sending client failed ({client.returncode}): {client.stderr}")
        _, cpu_text, _, elapsed_text = reported[-1].split()
        cpu, elapsed = float(cpu_text), float(elapsed_text)
        return messages / elapsed, cpu * 1000 / messages
    finally:
        sink.terminate()
        sink.wait()


def sink_process(port: int) -> subprocess.Popen[bytes]:
    sink = tool("smtp-sink")
    assert sink is not None
    process = subprocess.Popen(
        [sink, "-u", "postfix", f"127.0.0.1:{port}", "512"], stdout=subprocess.DEVNULL
    )
    wait_for_port("127.0.0.1", port)
    return process


def run_smtp_source(port: int, messages: int, clients: int, size: int, timeout: float) -> None:
    source = tool("smtp-source")
    assert source is not None
    subprocess.run(
        [
            source,
            *("-l", str(size), "-m", str(messages), "-s", str(clients)),
            *("-f", "a@example.com", "-t", "b@example.com", f"127.0.0.1:{port}"),
        ],
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )


def run_mailrelay(
    messages: int, clients: int, size: int, timeout: float, processes: int
) -> tuple[float, float]:
    """End-to-end msg/s and mailrelay's CPU ms per message (all its processes): smtp-source
    -> mailrelay -> smtp-sink, until queue/ is empty."""
    port, http_port, sink_port = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="floor-") as scratch:
        run_dir = Path(scratch)
        spool = run_dir / "spool"
        config = (
            f"[smtp]\nlisten = [{toml_str(f'tcp:{port}:interface=127.0.0.1:backlog=512')}]\n"
            f"processes = {processes}\nmax_connections = 1000\n"
            "[limits]\nconnections_per_peer = 0\n"
            f"[http]\nlisten = {toml_str(f'tcp:{http_port}:interface=127.0.0.1')}\n"
            f"[spool]\npath = {toml_str(str(spool))}\n"
            '[[providers]]\nname = "sink"\nhost = "127.0.0.1"\n'
            f'port = {sink_port}\ntls = "none"\n'
        )
        sink = sink_process(sink_port)
        relay = start_relay(run_dir, config, port)
        try:
            before = tree_cpu_ticks(relay.pid)
            started = time.monotonic()
            run_smtp_source(port, messages, clients, size, timeout)
            deadline = started + timeout
            while any((spool / "queue").iterdir()):
                if time.monotonic() > deadline:
                    raise BenchError("mailrelay did not deliver everything in time")
                time.sleep(0.01)
            elapsed = time.monotonic() - started
            after = tree_cpu_ticks(relay.pid)
            if before is None or after is None:
                raise BenchError("mailrelay exited during the run")
            return messages / elapsed, (after - before) * 1000 / TICK / messages
        finally:
            relay.stop()
            sink.terminate()
            sink.wait()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--send":
        send(*(int(a) for a in sys.argv[2:6]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=10, help="smtp-source -s [10]")
    parser.add_argument("--connections", type=int, default=16, help="outbound connections [16]")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--processes", type=int, default=2, help="mailrelay smtp.processes [2]")
    args = parser.parse_args()
    for name in ("smtp-source", "smtp-sink"):
        if tool(name) is None:
            print(
                f"twisted_floor: {name} not found (Debian: apt-get install postfix)",
                file=sys.stderr,
            )
            return 2
    cases: dict[str, Callable[[], tuple[float, float]]] = {
        "inbound twisted": lambda: run_inbound("twisted", *load),
        "inbound smtp-sink": lambda: run_inbound("smtp-sink", *load),
        "outbound twisted": lambda: run_outbound(
            args.messages, args.connections, args.size, args.timeout
        ),
        "mailrelay e2e": lambda: run_mailrelay(*load, args.processes),
    }
    load = (args.messages, args.clients, args.size, args.timeout)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    try:
        for run in range(1, args.runs + 1):
            for name, measure in cases.items():
                r = measure()
                results[name].append(r)
                print(f"run {run} {name:18s} {r[0]:8.1f} msg/s {r[1]:6.3f} CPU ms/msg", flush=True)
    except (BenchError, subprocess.SubprocessError, TimeoutError) as e:
        print(f"twisted_floor: {e}", file=sys.stderr)
        return 1
    print(f"\nmedians of {args.runs}, {args.messages} messages of {args.size} bytes per run:")
    for name, values in results.items():
        rate = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{name:18s} {rate:8.1f} msg/s {cpu:6.3f} CPU ms/msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
