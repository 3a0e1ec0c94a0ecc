"""SIGKILL cycles under load: the crash test (tests/e2e/test_crash.py, 20 cycles in CI) and
its benchmark twin (bench/crash_cycles.py, as many cycles as you like) share this.

Clients keep sending while the upstream refuses some DATA with 451 and the relay is killed
with SIGKILL at random points (after a random number of acknowledged messages, so no sleeps),
then restarted. ``run_crash_cycles`` returns what the clients were told and what arrived; the
caller checks the promise with ``CrashReport.problems``.
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
from collections import Counter
from pathlib import Path

import attrs

from tests.support.net import wait_until
from tests.support.relay import RelayProcess
from tests.support.upstream import UpstreamProcess

CLIENTS = 3


class Ledger:
    """What each client was told about each message it sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: set[str] = set()  # 250 after the final dot
        self.refused: set[str] = set()  # a 4xx/5xx reply: must never be delivered
        self.unknown: set[str] = set()  # connection lost before a reply: either is fine

    def count_acked(self) -> int:
        with self.lock:
            return len(self.acked)


def sender(port_of: list[int], ledger: Ledger, stop: threading.Event, client: int) -> None:
    """Send messages one by one, reconnecting after every failure, until told to stop."""
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port_of[0], local_hostname="crash", timeout=10) as s:
                while not stop.is_set():
                    n += 1
                    tag = f"c{client}-m{n}"
                    data = f"Subject: {tag}\r\n\r\nbody of {tag}\r\n".encode()
                    if n % 10 == 0:
                        data += b"a bare LF\nthe relay must refuse\r\n"  # 550 5.5.2
                    try:
                        s.sendmail("app@example.com", ["user@example.com"], data)
                    except smtplib.SMTPResponseException:
                        with ledger.lock:
                            ledger.refused.add(tag)
                        continue
                    except (smtplib.SMTPServerDisconnected, OSError):
                        with ledger.lock:
                            ledger.unknown.add(tag)
                        raise
                    with ledger.lock:
                        ledger.acked.add(tag)
        except (smtplib.SMTPException, OSError):
            # The relay is down (being killed or restarted): try again.
            stop.wait(0.05)


@attrs.frozen
class CrashReport:
    cycles: int
    acked: frozenset[str]
    refused: frozenset[str]
    unknown: frozenset[str]
    copies: dict[str, int]  # tag -> copies at the upstream
    duplicated_ids: frozenset[str]  # queue IDs of messages that arrived more than once
    flagged: frozenset[str]  # queue IDs the relay logged as possible duplicates

    @property
    def delivered(self) -> set[str]:
        return set(self.copies)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.copies.values() if n > 1)

    def summary(self) -> str:
        return (
            f"{self.cycles} SIGKILLs, acked {len(self.acked)}, refused {len(self.refused)},"
            f" unknown {len(self.unknown)}, delivered {len(self.delivered)}, duplicate copies"
            f" {self.duplicates} (of {len(self.duplicated_ids)} messages), messages logged as"
            f" possible duplicates {len(self.flagged)}"
        )

    def problems(self) -> list[str]:
        """Every way the run broke the promise (empty: kept)."""
        found = []
        if lost := self.acked - self.delivered:
            found.append(f"{len(lost)} acknowledged message(s) never arrived: {sorted(lost)[:5]}")
        if not self.refused:
            found.append("no message was refused: the run would prove nothing")
        if wrongly := self.refused & self.delivered:
            found.append(f"{len(wrongly)} refused message(s) arrived: {sorted(wrongly)[:5]}")
        # Duplicates only in the window SMTP cannot close, and each one counted: its queue ID
        # is in a "possible duplicate" log line.
        if uncounted := self.duplicated_ids - self.flagged:
            found.append(f"duplicates not logged as possible: {sorted(uncounted)[:5]}")
        return found


def run_crash_cycles(workdir: Path, cycles: int, seed: int = 20261127) -> CrashReport:
    rng = random.Random(seed)
    ledger = Ledger()
    stop = threading.Event()
    with UpstreamProcess(workdir / "upstream", data_4xx_every=7) as upstream:
        relay = RelayProcess.with_upstream(workdir, upstream.port, retry_initial=0.2, retry_max=0.5)
        relay.start()
        port_of = [relay.smtp_port]
        threads = [
            threading.Thread(target=sender, args=(port_of, ledger, stop, c), daemon=True)
            for c in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        try:
            for _ in range(cycles):
                target = ledger.count_acked() + rng.randint(1, 15)
                wait_until(
                    lambda target=target: ledger.count_acked() >= target,  # type: ignore[misc]
                    30,
                    what="acks before a kill",
                )
                relay.kill()
                relay.start()
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        try:
            wait_until(
                lambda: ledger.acked <= delivered_tags(upstream),
                90 + cycles,
                what="every acknowledged message at the upstream",
            )
        finally:
            relay.stop()
        bodies = [m["body"] for m in upstream.messages()]
    copies = Counter(tag_of(body) for body in bodies)
    return CrashReport(
        cycles=cycles,
        acked=frozenset(ledger.acked),
        refused=frozenset(ledger.refused),
        unknown=frozenset(ledger.unknown),
        copies=dict(copies),
        duplicated_ids=frozenset(queue_id_of(b) for b in bodies if copies[tag_of(b)] > 1),
        flagged=frozenset(possible_duplicates_logged(relay.log_path)),
    )


def tag_of(body: bytes) -> str:
    return body.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


QUEUE_ID_RE = re.compile(rb"\(mailrelay\) with ESMTP id ([0-9A-F]{22})")
FLAGGED_RE = re.compile(r"\] ([0-9A-F]{22})\b.*possible duplicate")


def queue_id_of(body: bytes) -> str:
    match = QUEUE_ID_RE.search(body)
    assert match, "no Received header of ours"
    return match.group(1).decode()


def possible_duplicates_logged(log_path: Path) -> set[str]:
    """Queue IDs the relay logged as possible duplicates, over every life (and rotated log)."""
    flagged = set()
    for path in log_path.parent.glob(log_path.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if match := FLAGGED_RE.search(line):
                flagged.add(match.group(1))
    return flagged


def delivered_tags(upstream: UpstreamProcess) -> set[str]:
    return {tag_of(m["body"]) for m in upstream.messages()}
