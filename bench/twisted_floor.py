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
import contextlib
import os
import resource
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
    CountingSink,
    cpu_ticks,
    free_ports,
    run_smtp_source,
    smtp_source_command,
    start_relay,
    toml_str,
    tool,
    tree_cpu_ticks,
)

TICK = os.sysconf("SC_CLK_TCK")

# -- the two bare programs (run as `python twisted_floor.py --serve PORT` / `--send ...`) -------


def _open_session(transport: Any, first_line: bytes) -> None:
    """TCP_NODELAY, as the relay sets it on both sides, then the session's first line."""
    from twisted.internet.interfaces import ITCPTransport

    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)
    transport.write(first_line)


def serve(port: int) -> None:
    from twisted.internet import protocol, reactor

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
            self.buffer = b""
            self.in_data = False
            _open_session(self.transport, b"220 floor ESMTP\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            out = []
            while True:
                if self.in_data:
                    end = self.buffer.find(b"\r\n.\r\n", self.searched)
                    if end < 0:
                        self.searched = max(0, len(self.buffer) - 4)  # not again next read
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
                    self.searched = 0
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


def send(port: int, messages: int, connections: int, size: int) -> int:
    """Exit status 0 when every message got a 250 to its final dot; prints its CPU (from
    after its start-up) for the parent."""
    from twisted.internet import defer, protocol, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    body = b"Subject: floor\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78) + b".\r\n"
    envelope = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    left = [messages]
    errors: list[str] = []
    open_connections = [connections]
    done: defer.Deferred[None] = defer.Deferred()

    def closed() -> None:
        open_connections[0] -= 1
        if open_connections[0] == 0 and not done.called:
            done.callback(None)

    class Sender(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buffer = b""
            self.expect = 2  # banner, EHLO
            self.sending = False  # the body is out: the next reply is to the final dot
            _open_session(self.transport, b"EHLO floor\r\n")

        def next_message(self) -> None:
            if left[0] == 0 or errors:
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
                if line[3:4] == b"-" or self.expect == -1:
                    continue  # a multiline reply goes on, or the 221
                self.expect -= 1
                if self.expect:
                    continue
                if self.sending and not line.startswith(b"250"):
                    errors.append(f"final dot: {line!r}")
                if not self.sending and line.startswith(b"354"):
                    self.sending, self.expect = True, 1
                    self.transport.write(body)
                else:
                    self.sending = False  # the EHLO reply, or the one to the final dot
                    self.next_message()

        def connectionLost(self, reason: object) -> None:
            closed()

    def refused(failure: Any) -> None:
        errors.append(f"connect: {failure.getErrorMessage()}")
        closed()

    start = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()

    def report(_: object) -> None:
        end = resource.getrusage(resource.RUSAGE_SELF)
        cpu = end.ru_utime - start.ru_utime + end.ru_stime - start.ru_stime
        print(f"cpu {cpu} elapsed {time.monotonic() - started}", flush=True)
        reactor.stop()  # type: ignore[attr-defined]

    done.addCallback(report)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    for _ in range(connections):
        connectProtocol(endpoint, Sender()).addErrback(refused)
    reactor.run()  # type: ignore[attr-defined]
    for error in errors[:5]:
        print(error, file=sys.stderr)
    return 1 if errors else 0


# -- the measurement ------------------------------------------------------------------------------


def start_floor_server(stack: contextlib.ExitStack) -> tuple[int, int]:
    """The bare inbound server in a process of its own: (port, pid)."""
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    stack.callback(stop_process, process)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise BenchError(f"the bare server did not start: {line!r}")
    return port, process.pid


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_sink(stack: contextlib.ExitStack) -> CountingSink:
    """smtp-sink, counting the final dots it answered (stopped when ``stack`` closes)."""
    return stack.enter_context(CountingSink())


def load_port(port: int, messages: int, clients: int, size: int, timeout: float) -> None:
    """smtp-source's load to ``port`` (bench.common's runner: it also checks the count)."""
    source = tool("smtp-source")
    assert source is not None
    command = smtp_source_command(
        source,
        port,
        size=size,
        messages=messages,
        sessions=clients,
        mail_from="a@example.com",
        rcpt_to="b@example.com",
    )
    load = run_smtp_source(command, messages, timeout)
    if load.problem:
        raise BenchError(load.problem)


def run_inbound(
    server: str, messages: int, clients: int, size: int, timeout: float
) -> tuple[float, float]:
    """msg/s and the server's CPU ms per message, smtp-source -> ``server``."""
    with contextlib.ExitStack() as stack:
        if server == "twisted":
            port, pid = start_floor_server(stack)
        else:
            sink = start_sink(stack)
            port, pid = sink.port, sink.pid or 0
        before = cpu_ticks(pid)
        started = time.monotonic()
        load_port(port, messages, clients, size, timeout)
        elapsed = time.monotonic() - started
        after = cpu_ticks(pid)
        if before is None or after is None:
            raise BenchError(f"the {server} server exited during the run")
        return messages / elapsed, (after - before) * 1000 / TICK / messages


def run_outbound(messages: int, connections: int, size: int, timeout: float) -> tuple[float, float]:
    """msg/s and CPU ms per message of the bare client (both from after its start-up),
    client -> smtp-sink."""
    with contextlib.ExitStack() as stack:
        sink = start_sink(stack)
        numbers = (sink.port, messages, connections, size)
        client = subprocess.run(
            [sys.executable, __file__, "--send", *map(str, numbers)],
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        reported = [line for line in client.stdout.splitlines() if line.startswith("cpu ")]
        if client.returncode != 0 or not reported:
            raise BenchError(f"the sending client failed ({client.returncode}): {client.stderr}")
        if sink.wait_transactions(messages, timeout=10) is None:
            raise BenchError(f"smtp-sink counted {sink.transactions()} of {messages} messages")
        _, cpu_text, _, elapsed_text = reported[-1].split()
        return messages / float(elapsed_text), float(cpu_text) * 1000 / messages


def run_mailrelay(
    messages: int, clients: int, size: int, timeout: float, processes: int
) -> tuple[float, float]:
    """End-to-end msg/s and mailrelay's CPU ms per message (all its processes): smtp-source
    -> mailrelay -> smtp-sink, until the sink has counted every message and queue/ is empty.
    A warm-up batch first, so the acceptor processes' start-up is not counted."""
    with contextlib.ExitStack() as stack:
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="floor-")))
        sink = start_sink(stack)
        port, http_port = free_ports(2)
        spool = run_dir / "spool"
        config = (
            f"[smtp]\nlisten = [{toml_str(f'tcp:{port}:interface=127.0.0.1:backlog=512')}]\n"
            f"processes = {processes}\nmax_connections = 1000\n"
            "[limits]\nconnections_per_peer = 0\n"
            f"[http]\nlisten = {toml_str(f'tcp:{http_port}:interface=127.0.0.1')}\n"
            f"[spool]\npath = {toml_str(str(spool))}\n"
            '[[providers]]\nname = "sink"\nhost = "127.0.0.1"\n'
            f'port = {sink.port}\ntls = "none"\n'
        )
        relay = start_relay(run_dir, config, port)
        stack.callback(relay.stop)

        def delivered(expected: int, deadline: float) -> None:
            if (
                sink.wait_transactions(expected, timeout=max(0.0, deadline - time.monotonic()))
                is None
            ):
                raise BenchError(f"smtp-sink counted {sink.transactions()} of {expected} messages")
            while any((spool / "queue").iterdir()):
                if time.monotonic() > deadline:
                    raise BenchError("mailrelay delivered, but queue/ is not empty")
                time.sleep(0.005)

        warm_up = max(clients * 10, 100)
        load_port(port, warm_up, clients, size, timeout)
        delivered(warm_up, time.monotonic() + timeout)
        before = tree_cpu_ticks(relay.pid)
        started = time.monotonic()
        load_port(port, messages, clients, size, timeout)
        delivered(warm_up + messages, started + timeout)
        elapsed = time.monotonic() - started
        after = tree_cpu_ticks(relay.pid)
        if before is None or after is None:
            raise BenchError("mailrelay exited during the run")
        return messages / elapsed, (after - before) * 1000 / TICK / messages


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--send":
        return send(*(int(a) for a in sys.argv[2:6]))
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
