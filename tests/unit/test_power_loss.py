"""Power loss (reliability case 19): the durability invariants when unsynced data is lost.

The spool runs on ``PowerLossFS`` (tests/support/powerloss.py), which models what survives a
power cut. One run, driven synchronously (InlineRunner, task.Clock, fake providers in a real
Router):

1. First life: messages are accepted one after another (``open_writer().write().commit()``;
   a commit whose Deferred fired with the queue ID is a message the client got 250 for; one
   session ends before its final dot) and delivered through a chain of two providers that
   fail some recipients temporarily (failover, journal records between providers, deferrals,
   retries) or for good (dead letters in failed/, or DSNs). The power goes out at file-system
   operation N: that call and every later one raise PowerCut, and nothing more reaches an
   upstream.
2. The disk is rewritten to what was durable (``crash()``); a new Spool and DeliveryQueue start
   on it, the providers now accept, and the queue is run until it is empty.

Checked after every run, for every cut point (what reliability.md promises):

- acked => delivered: every recipient of every message whose commit fired was delivered at
  least once over both lives, or (a recipient failing for good) its message is in failed/ with
  that outcome journalled, or a DSN reached its sender;
- nothing else is delivered: each message sent upstream is one a client sent, byte for byte,
  to one of its recipients, and its commit fired, or it is the one commit in flight at the
  cut and its file had become durable (the client got no 250 and sends it again: a duplicate,
  never a loss; counted as ``durable_unacked``); an aborted message never; a DSN only about
  an accepted message with a recipient that failed for good;
- what the first life completed durably holds: a final outcome whose ``append_journal``
  returned is in the journal after the crash, and that recipient is never sent again; a
  message whose ``remove``/``move`` out of queue/ returned, or whose ``unlink`` (a delivered
  message) was followed by an fsync of queue/ that returned, is never sent again; without a
  cut, every unlinked message is made durably gone by the end of the first life;
- hence a duplicate only for a delivery made after its recipient's last durable record;
  duplicates are counted;
- no error logged except the cut itself (no corrupt file, no damaged journal, no crash of an
  attempt for another reason); after the second life queue/, tmp/ and corrupt/ are empty.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure

from mailrelay.blocking import InlineRunner
from mailrelay.metrics import Metrics
from mailrelay.outbound.results import Kind, OutboundMessage, Progress, RecipientResult
from mailrelay.outbound.router import Router
from mailrelay.queue import DeliveryQueue, RetryPolicy
from mailrelay.spool.format import (
    JOURNAL_MAGIC,
    TAG_OUTCOME,
    Envelope,
    Outcome,
    Status,
    decode_journal,
    last_outcomes,
    record,
)
from mailrelay.spool.store import (
    BODY_RECORD_SIZE,
    CORRUPT,
    FAILED,
    JOURNAL_SUFFIX,
    QUEUE,
    Spool,
    SpoolWriteError,
)
from tests.support.powerloss import Model, PowerCut, PowerLossFS
from tests.unit.fakes import FakeProvider, LogCapture, envelope, result_of, store

# Thousands of small trees are made and removed: on tmpfs when there is one (a real disk's
# mkdir/rmdir dominate otherwise). PowerLossFS never fsyncs for real, so nothing else differs.
_SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

# -- the shim itself ---------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_bytes(b"old content")  # there before: durable
    return tmp_path


def _create(fs: PowerLossFS, path: Path, data: bytes, sync: bool = True) -> None:
    f = fs.create_exclusive(path)
    f.write(data)
    f.flush()
    if sync:
        fs.fsync(f.fileno())
    f.close()


def _tree(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
    }


def test_shim_unsynced_write_is_lost(base: Path) -> None:
    fs = PowerLossFS(base)
    _create(fs, base / "d" / "never", b"never synced", sync=False)
    _create(fs, base / "d" / "half", b"synced")
    fd = fs.open_append(base / "d" / "half")
    fs.write(fd, b" and more, not synced")
    fs.close(fd)
    fs.fsync_directory(base / "d")
    assert (base / "d" / "half").read_bytes() == b"synced and more, not synced"
    fs.crash()
    assert _tree(base) == {"d/half": b"synced", "d/never": b"", "d/old": b"old content"}


def test_shim_synced_file_without_directory_fsync_vanishes(base: Path) -> None:
    fs = PowerLossFS(base)
    _create(fs, base / "d" / "new", b"content")
    fs.crash()
    assert _tree(base) == {"d/old": b"old content"}


def test_shim_rename_without_directory_fsync_reverts(base: Path) -> None:
    fs = PowerLossFS(base)
    fs.rename(base / "d" / "old", base / "d" / "renamed")
    fs.crash()
    assert _tree(base) == {"d/old": b"old content"}


def test_shim_rename_keeps_the_inode_and_its_synced_content(base: Path) -> None:
    fs = PowerLossFS(base)
    _create(fs, base / "d" / "tmp", b"body")
    fs.mkdir(base / "q")
    fs.fsync_directory(base)  # q/ itself is durable, its entries not yet
    fs.rename(base / "d" / "tmp", base / "q" / "msg")
    fs.fsync_directory(base / "q")
    fs.crash()
    assert _tree(base) == {"d/old": b"old content", "q/msg": b"body"}


def test_shim_unlink_without_directory_fsync_comes_back(base: Path) -> None:
    fs = PowerLossFS(base)
    fs.unlink(base / "d" / "old")
    assert not (base / "d" / "old").exists()
    fs.crash()
    assert _tree(base) == {"d/old": b"old content"}


def test_shim_unlink_with_directory_fsync_is_durable(base: Path) -> None:
    fs = PowerLossFS(base)
    fs.unlink(base / "d" / "old")
    fs.fsync_directory(base / "d")
    fs.crash()
    assert _tree(base) == {}


def test_shim_cut_refuses_that_call_and_every_later_one(base: Path) -> None:
    fs = PowerLossFS(base, cut_at=2)
    f = fs.create_exclusive(base / "d" / "x")  # operation 1
    with pytest.raises(PowerCut):
        f.write(b"data")  # operation 2: not done
    with pytest.raises(PowerCut):
        fs.read_bytes(base / "d" / "old")
    f.close()  # closing never raises
    assert fs.ops == 2 and fs.cut
    fs.crash()
    with pytest.raises(PowerCut):
        fs.exists(base / "d")
    assert _tree(base) == {"d/old": b"old content"}


def test_shim_journal_model_keeps_what_an_fsync_committed_and_a_prefix_of_the_rest(
    base: Path,
) -> None:
    kept = set()
    for seed in range(20):
        root = base / f"j{seed}"
        root.mkdir()
        fs = PowerLossFS(root, model="journal", seed=seed)
        _create(fs, root / "a", b"a")  # its fsync commits its name too
        _create(fs, root / "b", b"b", sync=False)  # name maybe, content never
        fs.unlink(root / "a")
        fs.crash()
        kept.add(tuple(sorted(_tree(root).items())))
    # Never "a" gone while "b" is missing: the changes survive in order.
    assert kept == {(("a", b"a"),), (("a", b"a"), ("b", b"")), (("b", b""),)}


# -- the spool's own recovery step under power loss --------------------------------------------

QID = "0000000000000100000001"


def _outcome(recipient: str, status: Status, at: float) -> Outcome:
    return Outcome(recipient, status, "250 ok" if status is Status.DELIVERED else "550", "p", at)


@pytest.mark.parametrize("model", ["directory", "journal"])
def test_merging_a_stray_journal_survives_a_power_cut_anywhere(model: Model) -> None:
    """A message in failed/ with a journal, and an older journal of it left in queue/ (a move
    cut between its two renames; then more records beside the message). reconcile_journal
    merges them; a cut anywhere in it must lose no record of either (it used to rewrite the
    kept journal in place without fsync, then remove the stray)."""
    stray_bytes = JOURNAL_MAGIC + record(
        TAG_OUTCOME, _outcome("a@x.test", Status.DELIVERED, 1.0).to_json()
    )
    for seed in range(4 if model == "journal" else 1):
        cut = 0
        while True:
            cut += 1
            base = Path(tempfile.mkdtemp(prefix="powerloss-", dir=_SCRATCH))
            try:
                (base / "spool").mkdir()
                spool = Spool(base / "spool", InlineRunner())
                spool.prepare()
                store(spool, envelope(QID, ["a@x.test", "b@x.test"]))
                spool.move_now(QID, QUEUE, FAILED)
                spool.append_journal_now(QID, [_outcome("b@x.test", Status.FAILED, 2.0)], FAILED)
                # The stray, with a torn last record (a crash mid-append before the move).
                (spool.queue / (QID + JOURNAL_SUFFIX)).write_bytes(stray_bytes + b"R\0\0")
                fs = PowerLossFS(base, cut_at=cut, model=model, seed=seed)
                with contextlib.suppress(PowerCut):
                    assert Spool(base / "spool", InlineRunner(), fs=fs).reconcile_journals() == 1
                finished = not fs.cut
                fs.crash()
                again = Spool(base / "spool", InlineRunner())
                again.reconcile_journals()
                journal = again.journal_now(QID, FAILED)
                assert {r: o.status for r, o in last_outcomes(journal).items()} == {
                    "a@x.test": Status.DELIVERED,
                    "b@x.test": Status.FAILED,
                }, (cut, fs.history)
                assert sorted(p.name for p in spool.queue.iterdir()) == []
                assert sorted(p.name for p in spool.failed.iterdir()) == [
                    QID,
                    QID + JOURNAL_SUFFIX,
                ], (cut, fs.history)
                if finished:
                    break  # the whole merge ran, then the power went
            finally:
                shutil.rmtree(base)


# -- the spool and the queue under power loss --------------------------------------------------

POLICY = RetryPolicy(initial=100.0, maximum=400.0, lifetime=1_000_000.0, jitter=0.1)
START = 1_000_000.0
MESSAGES = 7
TEMP_TRIES = 2  # p2 defers a "temp" recipient this many times in the first life
STEPS = (0.0, 0.0, 30.0, 120.0, 250.0)  # clock advances between two acceptances


@dataclass
class Delivery:
    life: int
    provider: str
    queue_id: str
    sender: str
    recipient: str
    kind: Kind
    body: bytes


@dataclass(frozen=True)
class Scenario:
    envelopes: list[Envelope]
    bodies: list[bytes]
    aborted: int  # index of the message whose session ends before the final dot


@functools.cache
def scenario(seed: int) -> Scenario:
    """Messages with 1-3 recipients: "ok" (delivered by p1), "fo" (p1 defers, p2 delivers:
    failover), "temp" (both defer for a while), "perm" (p1 fails them for good). One body (and
    for odd seeds the aborted one's too) is big enough to spill to tmp/ while it arrives."""
    rng = random.Random(seed)
    aborted = rng.randrange(MESSAGES)
    envelopes, bodies = [], []
    for n in range(MESSAGES):
        kinds = rng.choices(["ok", "fo", "temp", "perm"], weights=[4, 2, 2, 1], k=rng.randint(1, 3))
        if n == MESSAGES - 1:
            kinds += ["temp", "perm"]  # every run has a deferral and a failure for good
        envelopes.append(
            Envelope(
                queue_id=f"{n + 1:022X}",
                sender=f"s{n}@example.test",
                recipients=tuple(f"{kind}{n}-{j}@example.test" for j, kind in enumerate(kinds)),
                received_at=0.0,  # set at acceptance
                client="127.0.0.1",
                helo="client.test",
            )
        )
        big = n == seed % MESSAGES or (n == aborted and seed % 2)
        size = BODY_RECORD_SIZE + 1000 if big else rng.randint(10, 3000)
        bodies.append(f"Subject: m{n}\r\n\r\n".encode() + rng.randbytes(size))
    return Scenario(envelopes, bodies, aborted)


class Provider(FakeProvider):
    """A FakeProvider that logs each recipient's answer and hears nothing once the power is
    off (the process is dead)."""

    def __init__(
        self,
        name: str,
        life: int,
        fs: PowerLossFS,
        log: list[Delivery],
        kind_for: Callable[[OutboundMessage, str], Kind],
    ) -> None:
        super().__init__(name, self._answer)
        self._life, self._fs, self._log, self._kind_for = life, fs, log, kind_for

    def _answer(self, m: OutboundMessage) -> list[RecipientResult]:
        results = []
        for r in m.recipients:
            kind = self._kind_for(m, r)
            self._log.append(Delivery(self._life, self.name, m.queue_id, m.sender, r, kind, m.body))
            reply = {Kind.DELIVERED: "250 ok", Kind.TEMPORARY: "451 later"}.get(kind, "550 no")
            results.append(RecipientResult(r, kind, reply))
        return results

    def deliver(
        self, message: OutboundMessage, progress: Progress | None = None
    ) -> defer.Deferred[list[RecipientResult]]:
        if self._fs.cut:
            return defer.Deferred()  # never answers: nothing after the cut happens
        return super().deliver(message, progress)


def providers(life: int, fs: PowerLossFS, log: list[Delivery]) -> list[FakeProvider]:
    tries: Counter[tuple[str, str]] = Counter()

    def p1(m: OutboundMessage, r: str) -> Kind:
        if r.startswith("perm"):
            return Kind.PERMANENT
        if r.startswith("fo") or (r.startswith("temp") and life == 1):
            return Kind.TEMPORARY
        return Kind.DELIVERED

    def p2(m: OutboundMessage, r: str) -> Kind:
        tries[m.queue_id, r] += 1
        if r.startswith("temp") and life == 1 and tries[m.queue_id, r] <= TEMP_TRIES:
            return Kind.TEMPORARY
        return Kind.DELIVERED

    return [Provider("p1", life, fs, log, p1), Provider("p2", life, fs, log, p2)]


@dataclass
class Life:
    """One boot: a spool on a PowerLossFS, a queue, and what its spool calls completed."""

    fs: PowerLossFS
    clock: Clock
    spool: Spool
    queue: DeliveryQueue
    # (queue ID, recipient) -> final status, from durable journal appends that returned
    recorded: dict[tuple[str, str], Status] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # removed or moved out of queue/, durably
    unlinked: set[str] = field(default_factory=set)  # unlinked from queue/, maybe not durably

    @classmethod
    def boot(
        cls,
        number: int,
        base: Path,
        fs: PowerLossFS,
        now: float,
        log: list[Delivery],
        reporting_mta: str | None,
        one_fsync: bool = False,
    ) -> tuple[Life, defer.Deferred[None]]:
        """prepare() the spool (it may raise PowerCut) and start the queue. ``one_fsync``: an
        acceptance renames, then fsyncs the file alone (spool.directory_fsync = "auto" on
        ext4, XFS, btrfs)."""
        clock = Clock()
        clock.advance(now)
        spool = Spool(
            base / "spool",
            InlineRunner(),
            now=clock.seconds,
            fs=fs,
            acceptance_directory_fsync=not one_fsync,
        )
        queue = DeliveryQueue(
            clock,
            spool,
            Router(providers(number, fs, log)),
            POLICY,
            Metrics(),
            rand=lambda: 0.5,
            reporting_mta=reporting_mta,
        )
        life = cls(fs, clock, spool, queue)
        life._watch()
        spool.prepare()
        return life, defer.Deferred.fromCoroutine(queue.start())

    def _watch(self) -> None:
        """Record every journal append, removal and move that completed; a removal without
        its fsync (a delivered message) once an fsync of queue/ started after it completed."""
        spool = self.spool
        append, remove, move = spool.append_journal, spool.remove, spool.move
        unlink, sync_area = spool.unlink, spool.sync_area
        unlinked = self.unlinked

        def append_journal(
            queue_id: str, outcomes: Sequence[Outcome], area: str = QUEUE
        ) -> defer.Deferred[None]:
            def done(_: None) -> None:
                for o in outcomes:
                    if o.status.is_final:
                        self.recorded[queue_id, o.recipient] = o.status

            return append(queue_id, outcomes, area).addCallback(done)

        def removed(queue_id: str, area: str = QUEUE) -> defer.Deferred[None]:
            return remove(queue_id, area).addCallback(lambda _: self.gone.add(queue_id))

        def moved(queue_id: str, source: str, target: str) -> defer.Deferred[None]:
            d = move(queue_id, source, target)
            if source == QUEUE:
                d.addCallback(lambda _: self.gone.add(queue_id))
            return d

        def unlinked_now(queue_id: str, area: str = QUEUE) -> defer.Deferred[None]:
            d = unlink(queue_id, area)
            if area == QUEUE:
                d.addCallback(lambda _: unlinked.add(queue_id))
            return d

        def synced(area: str) -> defer.Deferred[None]:
            covered = set(unlinked) if area == QUEUE else set()
            return sync_area(area).addCallback(lambda _: self.gone.update(covered))

        spool.append_journal = append_journal  # type: ignore[method-assign]
        spool.remove = removed  # type: ignore[method-assign]
        spool.move = moved  # type: ignore[method-assign]
        spool.unlink = unlinked_now  # type: ignore[method-assign]
        spool.sync_area = synced  # type: ignore[method-assign]

    def run_timers(self, limit: int = 200) -> None:
        """Advance the clock from timer to timer until none is left (or the power is off)."""
        for _ in range(limit):
            calls = self.clock.getDelayedCalls()
            if not calls or self.fs.cut:
                return
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()))


@dataclass
class Run:
    ops: int = 0  # file-system operations of the first life (the cut one included)
    acked: set[str] = field(default_factory=set)
    in_flight: str | None = None  # a commit that had not fired when the power went out
    deliveries: list[Delivery] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    durable_unacked: int = 0
    set_aside: int = 0  # the commit in flight, cut short in queue/ (one fsync), in corrupt/


def run(
    seed: int, cut_at: int | None, model: Model, reporting_mta: str | None, one_fsync: bool = False
) -> Run:
    """One power cut at operation ``cut_at`` of the first life (None: after it ended)."""
    base = Path(tempfile.mkdtemp(prefix="powerloss-", dir=_SCRATCH))
    try:
        (base / "spool").mkdir()  # made long ago: durable
        with LogCapture() as logged:
            result = _run(scenario(seed), seed, cut_at, model, reporting_mta, base, one_fsync)
        result.violations.extend(_errors(logged))
        return result
    finally:
        shutil.rmtree(base)


def _run(
    s: Scenario,
    seed: int,
    cut_at: int | None,
    model: Model,
    reporting_mta: str | None,
    base: Path,
    one_fsync: bool,
) -> Run:
    rng = random.Random(seed * 1000 + 1)
    result = Run()
    accepted: dict[str, tuple[Envelope, bytes]] = {}
    fs = PowerLossFS(base, cut_at=cut_at, model=model, seed=seed * 100_003 + (cut_at or 0))
    one: Life | None = None
    try:
        one, started = Life.boot(1, base, fs, START, result.deliveries, reporting_mta, one_fsync)
        started.addErrback(lambda f: f.trap(PowerCut))
    except PowerCut:
        pass  # during prepare()
    if one is not None:
        for n, (template, body) in enumerate(zip(s.envelopes, s.bodies, strict=True)):
            if fs.cut:
                break
            env = attrs.evolve(template, received_at=one.clock.seconds())
            if _accept(one, env, body, n == s.aborted, result):
                accepted[env.queue_id] = (env, body)
                one.clock.advance(rng.choice(STEPS))
        one.run_timers()
        if not fs.cut and one.unlinked - one.gone:
            result.violations.append(
                f"unlinked, never made durably gone: {sorted(one.unlinked - one.gone)}"
            )
    result.ops = fs.ops
    now = one.clock.seconds() if one is not None else START
    fs.crash()
    if one is not None:
        _check_durable_records(one, base / "spool" / QUEUE, result.violations)

    two, started = Life.boot(
        2, base, PowerLossFS(base, model=model), now, result.deliveries, reporting_mta, one_fsync
    )
    result_of(started)
    two.run_timers()
    _check(s, one, result, accepted, base / "spool", reporting_mta, one_fsync)
    return result


def _accept(life: Life, env: Envelope, body: bytes, abort: bool, result: Run) -> bool:
    """Receive one message; True if it got as far as its commit (fired or cut)."""
    try:
        writer = life.spool.open_writer(env, smtp_acceptance=True)
        for i in range(0, len(body), 64 * 1024):
            writer.write(body[i : i + 64 * 1024])
        if abort:
            writer.abort()  # the session ended before the final dot
            return False
    except PowerCut:
        return False  # mid-DATA (a big message spills to tmp/): no commit, no 250
    result.in_flight = env.queue_id

    def acked(queue_id: str) -> None:
        result.acked.add(queue_id)  # the client got "250 ... queued as <queue_id>"
        result.in_flight = None
        life.queue.enqueue(env)

    writer.commit().addCallbacks(acked, lambda f: f.trap(PowerCut, SpoolWriteError))
    return True


def _errors(logged: LogCapture) -> Iterator[str]:
    """Every error logged, but the power cut's (an attempt or a start-up that it broke)."""
    for event in logged.events:
        if event.get("log_level") not in (LogLevel.error, LogLevel.critical):
            continue
        failure = event.get("log_failure")
        if isinstance(failure, Failure) and failure.check(PowerCut):
            continue
        yield f"error logged: {formatEvent(event)} {failure or ''}"


def _check_durable_records(one: Life, queue_dir: Path, v: list[str]) -> None:
    """Right after the crash: what the first life completed is on disk."""
    for (queue_id, recipient), status in sorted(one.recorded.items()):
        if queue_id in one.gone or not (queue_dir / queue_id).exists():
            continue
        path = queue_dir / (queue_id + JOURNAL_SUFFIX)
        on_disk = last_outcomes(decode_journal(path.read_bytes())) if path.exists() else {}
        got = on_disk.get(recipient)
        if got is None or not got.status.is_final:
            v.append(
                f"{queue_id} <{recipient}>: journalled {status.value} durably, but after the"
                f" crash its journal says {got.status.value if got else 'nothing'}"
            )
    for queue_id in sorted(one.gone):
        if (queue_dir / queue_id).exists():
            v.append(f"{queue_id}: left queue/ durably, back in it after the crash")


def _check(
    s: Scenario,
    one: Life | None,
    result: Run,
    accepted: dict[str, tuple[Envelope, bytes]],
    spool_dir: Path,
    reporting_mta: str | None,
    one_fsync: bool,
) -> None:
    v = result.violations
    by_sender = {env.sender: env for env in s.envelopes}
    delivered: Counter[tuple[str, str]] = Counter()
    dsn_for: Counter[str] = Counter()  # original queue ID -> DSNs delivered
    for d in result.deliveries:
        if d.sender == "":  # a DSN: to the original sender, about that message
            original = by_sender.get(d.recipient)
            if original is None or original.queue_id not in accepted:
                v.append(f"DSN {d.queue_id} to <{d.recipient}> about no accepted message")
            elif not any(r.startswith("perm") for r in original.recipients):
                v.append(f"DSN {d.queue_id} for {original.queue_id}, which had no failure")
            elif d.kind is Kind.DELIVERED:
                dsn_for[original.queue_id] += 1
            continue
        if d.queue_id not in accepted:
            v.append(f"{d.queue_id}: sent upstream but never committed (aborted)")
            continue
        env, body = accepted[d.queue_id]
        if d.queue_id not in result.acked and d.queue_id != result.in_flight:
            v.append(f"{d.queue_id}: sent upstream, but its commit failed before the cut")
        if d.body != body:
            v.append(f"{d.queue_id}: the body sent upstream is not the body accepted")
        if d.recipient not in env.recipients:
            v.append(f"{d.queue_id}: sent to <{d.recipient}>, not one of its recipients")
        if d.kind is Kind.DELIVERED:
            delivered[d.queue_id, d.recipient] += 1
    if result.in_flight is not None and any(q == result.in_flight for q, _ in delivered):
        result.durable_unacked += 1  # no 250, yet durable: the client sends it again

    # Never sent again once durably recorded (journal record, removal, move).
    for d in result.deliveries:
        if one is None or d.life != 2:
            continue
        if d.queue_id in one.gone:
            v.append(f"{d.queue_id} <{d.recipient}>: sent again after it left queue/ durably")
        elif (d.queue_id, d.recipient) in one.recorded:
            status = one.recorded[d.queue_id, d.recipient].value
            v.append(f"{d.queue_id} <{d.recipient}>: sent again after a durable {status} record")

    # acked => delivered (or failed for good, and kept or reported).
    failed_dir = spool_dir / FAILED
    for queue_id in sorted(result.acked):
        env, _ = accepted[queue_id]
        for r in env.recipients:
            if not r.startswith("perm"):
                if not delivered[queue_id, r]:
                    v.append(f"{queue_id} <{r}>: acked but never delivered")
            elif reporting_mta is not None:
                if not dsn_for[queue_id]:
                    v.append(f"{queue_id} <{r}>: failed for good, but no DSN reached the sender")
            else:
                journal = failed_dir / (queue_id + JOURNAL_SUFFIX)
                final = (
                    last_outcomes(decode_journal(journal.read_bytes())) if journal.exists() else {}
                )
                if not (failed_dir / queue_id).exists() or r not in final:
                    v.append(f"{queue_id} <{r}>: failed for good, but not kept in failed/")

    for area in (QUEUE, "tmp", CORRUPT):
        left = sorted(p.name for p in (spool_dir / area).iterdir())
        if area == CORRUPT and one_fsync and left == [result.in_flight]:
            # Renamed into queue/, cut before its fsync: the name survived, the content did
            # not. Its client got no 250; the file is set aside (a warning, not an error).
            result.set_aside += 1
            continue
        if left:
            v.append(f"{area}/ not empty after the second life: {left}")


def _summary(runs: list[Run]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for r in runs:
        sent = Counter((d.queue_id, d.recipient) for d in r.deliveries if d.kind is Kind.DELIVERED)
        totals["runs"] += 1
        totals["acked"] += len(r.acked)
        totals["delivered"] += sum(sent.values())
        totals["duplicates"] += sum(n - 1 for n in sent.values())
        totals["durable_unacked"] += r.durable_unacked
        totals["set_aside"] += r.set_aside
    return dict(totals)


def _cut_points(total: int, limit: int, seed: int) -> list[int | None]:
    """Every operation of the first life (or a seeded sample of them), then no cut at all
    (the power goes after the first life ended)."""
    points = list(range(1, total + 1))
    if len(points) > limit:
        points = sorted(random.Random(seed).sample(points, limit))
    return [*points, None]


# Totals per parametrization, printed (pytest -s) for the record.
SUMMARY: dict[str, dict[str, int]] = {}


@pytest.mark.parametrize(
    ("seed", "model", "reporting_mta", "one_fsync"),
    [
        (1, "directory", None, False),
        (2, "directory", "relay.test", False),
        (3, "directory", None, False),
        (4, "journal", None, False),
        (5, "journal", "relay.test", False),
        # What spool.directory_fsync = "auto" does on ext4, XFS and btrfs, whose fsync of a
        # renamed file commits the rename with it: the "journal" model. (Seeds whose cuts
        # hit the window it opens at least once: 7 did not, 9 twice.)
        (6, "journal", None, True),
        (9, "journal", "relay.test", True),
    ],
)
def test_every_power_cut_keeps_the_promise(
    seed: int, model: Model, reporting_mta: str | None, one_fsync: bool
) -> None:
    total = run(seed, None, model, reporting_mta, one_fsync).ops
    runs: list[Run] = []
    failures: list[str] = []
    for cut in _cut_points(total, limit=250, seed=seed):
        r = run(seed, cut, model, reporting_mta, one_fsync)
        runs.append(r)
        failures.extend(f"cut at {cut}: {text}" for text in r.violations)
    key = f"seed={seed} model={model} dsn={reporting_mta is not None} one_fsync={one_fsync}"
    SUMMARY[key] = {"ops": total, **_summary(runs)}
    print(key, SUMMARY[key])
    assert runs[-1].acked == {e.queue_id for e in scenario(seed).envelopes} - {
        scenario(seed).envelopes[scenario(seed).aborted].queue_id
    }, "without a cut, every message but the aborted one is acked"
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} violation(s))"
    if one_fsync:
        # The window the one-fsync order opens was hit, and handled, at least once.
        assert SUMMARY[key]["set_aside"] >= 1
