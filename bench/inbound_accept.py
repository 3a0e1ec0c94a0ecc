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
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Run as `python bench/inbound_accept.py`, so the repository root is not on sys.path yet.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    CLK_TCK,
    HOST,
    TWISTD,
    BenchError,
    BigResult,
    Load,
    Relay,
    cpu_ticks,
    free_ports,
    relay_module,
    run_smtp_source,
    send_big_message,
    smtp_source_command,
    start_relay,
    tail,
    toml_str,
    tool,
)
from bench.postfix_peer import PostfixPeer, postfix_unavailable, postfix_version  # noqa: E402
from tests.support.procfs import status_kib  # noqa: E402

MAIL_FROM = "a@example.com"
RCPT_TO = "b@example.com"
POSTFIX_COUNTED = ("smtpd", "cleanup")


def source_command(args: argparse.Namespace, port: int) -> list[str]:
    return smtp_source_command(
        args.smtp_source,
        port,
        size=args.size,
        messages=args.messages,
        sessions=args.clients,
        mail_from=MAIL_FROM,
        rcpt_to=RCPT_TO,
        reuse=args.reuse,
    )


# --- mailrelay ------------------------------------------------------------------------------------


def relay_config(run_dir: Path, smtp_port: int, http_port: int, dead_port: int, big: int) -> str:
    q = toml_str
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


def start_queueing_relay(src: str | None, run_dir: Path, big: int) -> Relay:
    """A relay whose only provider is a port nobody listens on: accepted mail stays queued."""
    smtp_port, http_port, dead_port = free_ports(3)
    config = relay_config(run_dir, smtp_port, http_port, dead_port, big)
    return start_relay(run_dir, config, smtp_port, src)


# --- Postfix --------------------------------------------------------------------------------------


def queueing_postfix(run_dir: Path) -> PostfixPeer:
    """A Postfix instance that queues and defers (``defer_transports = smtp``): never sends."""
    port, dead_port = free_ports(2)
    return PostfixPeer(
        run_dir,
        port,
        {
            "relayhost": f"[{HOST}]:{dead_port}",
            # Mail only queues: the smtp transport is deferred without a delivery attempt.
            "defer_transports": "smtp",
        },
    )


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
    relay = start_queueing_relay(src, run_dir, 0)
    try:
        before = cpu_ticks(relay.pid)
        load = run_smtp_source(source_command(args, relay.port), args.messages, args.timeout)
        after = cpu_ticks(relay.pid)
    finally:
        relay.stop()
    if before is None or after is None:
        raise BenchError(f"the relay exited during the run\n{tail(relay.log)}")
    result = Result(name, load, (after - before) / CLK_TCK)
    if load.problem:
        result.notes.append(f"{load.problem}\n{tail(relay.log, 10)}")
    return result


def run_postfix(args: argparse.Namespace, run_dir: Path) -> Result:
    postfix = queueing_postfix(run_dir)
    postfix.setup()
    try:
        postfix.start()
        before = postfix.cpu()
        load = run_smtp_source(source_command(args, postfix.port), args.messages, args.timeout)
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

AFTER_250 = 1.0  # seconds the sampling goes on after the 250 (what the queue does next)


def measure_big(args: argparse.Namespace, src: str | None, run_dir: Path) -> tuple[BigResult, int]:
    """The large message through a fresh relay: memory samples and the spool file's size."""
    size = args.big_mb * 1024 * 1024
    relay = start_queueing_relay(src, run_dir, size)
    try:
        big = send_big_message(
            relay.port,
            size,
            lambda: status_kib(relay.pid, "VmRSS"),
            lambda elapsed: elapsed >= AFTER_250,
            mail_from=MAIL_FROM,
            rcpt_to=RCPT_TO,
        )
        stored = sum(p.stat().st_size for p in (run_dir / "spool" / "queue").iterdir())
    finally:
        relay.stop()
    return big, stored


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
    args.smtp_source = tool("smtp-source")
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
    print(f"client: {shlex.join(source_command(args, 0)).replace(':0', ':PORT')}")
    skip_postfix = "--no-postfix" if args.no_postfix else postfix_unavailable()
    if skip_postfix:
        print(f"Postfix side skipped: {skip_postfix}")
    else:
        print(f"postfix: {postfix_version()}, private instance, defer_transports = smtp")
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
                big, stored = measure_big(args, src, root / f"big-{name}")
            except BenchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(
                f"\n{name}, one {big.size / 1048576:.1f} MiB message: {big.reply[:40]} after"
                f" {big.seconds:.2f} s; spool file {stored / 1048576:.1f} MiB\n"
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
