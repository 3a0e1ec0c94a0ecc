"""MaildropPickup: adopting what ``mailrelay-sendmail`` left in ``<spool>/maildrop/``, refusing
what it must not adopt (into corrupt/), the crash-window leftover, dot-files, passes that
overlap, and polling. A real spool (make_spool), a task.Clock, a list as the queue."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailrelay.blocking import BlockingRunner
from mailrelay.config import SMTPConfig
from mailrelay.metrics import Metrics
from mailrelay.pickup import STALE_TMP, MaildropPickup
from mailrelay.spool.format import Envelope, decode_message, encode_message, end_record, record
from mailrelay.spool.maildrop import deposit
from mailrelay.spool.store import Spool, SpoolWriteError, new_queue_id
from tests.unit.fakes import LogCapture, has_fired, make_spool, result_of

MAX_SIZE = 10_000
MAX_RECIPIENTS = 3
LIMITS = SMTPConfig(max_message_size=MAX_SIZE, max_recipients=MAX_RECIPIENTS)
INTERVAL = 5.0
A, B = "a@example.test", "b@example.test"
BODY = b"Received: by host (mailrelay sendmail)\r\nSubject: hi\r\n\r\nhello\r\n"


def qid(n: int) -> str:
    return f"{n:022X}"


def make_envelope(n: int = 1, **changes: Any) -> Envelope:
    values: dict[str, Any] = {
        "queue_id": qid(n),
        "sender": "app@example.test",
        "recipients": (A, B),
        "received_at": 1_700_000_000.0 + n,
        "client": "sendmail uid=0",  # what the file claims; the kernel's answer wins
        "helo": "localhost",
    }
    values.update(changes)
    return Envelope(**values)


class ManualRunner:
    """Runs the call at once (so a pass lists the maildrop when it starts) but holds its
    result back until ``release``: a pass stays in progress for as long as the test likes."""

    def __init__(self) -> None:
        self.pending: list[tuple[defer.Deferred[Any], Any]] = []
        self.runs = 0

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.runs += 1
        d: defer.Deferred[Any] = defer.Deferred()
        try:
            result: Any = f(*args, **kwargs)
        except Exception:
            result = Failure()
        self.pending.append((d, result))
        return d

    def release(self) -> None:
        d, result = self.pending.pop(0)
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


class World:
    def __init__(self, root: Path, runner: BlockingRunner | None = None) -> None:
        self.clock = Clock()
        if runner is None:
            self.spool = make_spool(root / "spool")
        else:
            self.spool = Spool(root / "spool", runner)
            self.spool.prepare()
        self.metrics = Metrics()
        self.enqueued: list[Envelope] = []
        self.pickup = MaildropPickup(
            self.clock, self.spool, LIMITS, self.enqueued.append, self.metrics, INTERVAL
        )

    def drop(self, envelope: Envelope, body: bytes = BODY) -> Path:
        deposit(self.spool.root, envelope, body)
        return self.spool.maildrop / envelope.queue_id

    def write(self, name: str, data: bytes) -> Path:
        """A file in the maildrop as a careless or hostile local user may leave one."""
        path = self.spool.maildrop / name
        path.write_bytes(data)
        return path

    def run(self) -> int:
        adopted: int = result_of(self.pickup.pickup())
        return adopted

    def names(self, area: str) -> list[str]:
        return sorted(os.listdir(self.spool.area(area)))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    @property
    def received(self) -> float:
        return self.metric("mailrelay_messages_received_total")

    @property
    def rejected(self) -> float:
        return self.metric("mailrelay_messages_rejected_total", {"reason": "maildrop"})


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


# -- adoption -------------------------------------------------------------------------------------


def test_a_deposited_message_is_copied_into_the_queue_and_enqueued(w: World) -> None:
    env = make_envelope()
    source = w.drop(env)
    owner = source.stat().st_uid

    before = time.time()
    assert w.run() == 1
    after = time.time()

    stored = decode_message((w.spool.queue / env.queue_id).read_bytes())
    # The owner comes from the kernel and the time from the daemon, whatever the file says.
    assert before <= stored.envelope.received_at <= after
    adopted = attrs.evolve(
        env, client=f"sendmail uid={owner}", received_at=stored.envelope.received_at
    )
    assert stored.envelope == adopted
    assert stored.body == BODY
    assert not source.exists()
    assert w.names("maildrop") == []
    assert w.enqueued == [adopted]
    assert w.received == 1
    assert w.metric("mailrelay_recipients_received_total") == 2
    assert w.rejected == 0
    assert w.names("corrupt") == [] and w.names("tmp") == []
    # The queue copy is the daemon's own file, written like mail received over SMTP: its
    # mtime (the next attempt time) is the time it was adopted.
    assert (w.spool.queue / env.queue_id).stat().st_mtime == adopted.received_at


def test_an_empty_or_missing_maildrop_adopts_nothing(w: World) -> None:
    assert w.run() == 0
    os.rmdir(w.spool.maildrop)
    assert w.run() == 0
    assert w.enqueued == [] and w.received == 0


def test_several_files_are_adopted_in_one_pass_in_queue_id_order(w: World) -> None:
    envs = [make_envelope(n) for n in (3, 1, 2)]
    for env in envs:
        w.drop(env)
    assert w.run() == 3
    assert [e.queue_id for e in w.enqueued] == [qid(1), qid(2), qid(3)]
    assert w.names("queue") == [qid(1), qid(2), qid(3)]
    assert w.received == 3


def test_the_adoption_is_logged_with_the_kernel_uid(w: World) -> None:
    env = make_envelope()
    owner = w.drop(env).stat().st_uid
    with LogCapture() as logs:
        w.run()
    (text,) = [t for t in logs.texts() if t.startswith(f"{env.queue_id} picked up")]
    assert text.startswith(f"{env.queue_id} picked up from maildrop: from=<app@example.test>")
    assert f"client=sendmail uid={owner}" in text


# -- refusals -------------------------------------------------------------------------------------


def encoded(env: Envelope, body: bytes = BODY) -> bytes:
    return encode_message(env, body)


def _garbage(w: World) -> tuple[str, str]:
    w.write(qid(1), b"\x00\x01 this is not a spool file \xff" * 10)
    return qid(1), "bad magic line"


def _truncated(w: World) -> tuple[str, str]:
    w.write(qid(1), encoded(make_envelope(1))[:-3])
    return qid(1), "truncated"


def _not_a_queue_id(w: World) -> tuple[str, str]:
    w.write("hello", encoded(make_envelope(1)))
    return "hello", "not a queue ID"


def _lower_case_id(w: World) -> tuple[str, str]:
    name = qid(0xABC).lower()
    w.write(name, encoded(make_envelope(0xABC)))
    return name, "not a queue ID"


def _another_id(w: World) -> tuple[str, str]:
    w.write(qid(2), encoded(make_envelope(1)))
    return qid(2), "the envelope names another queue ID"


def _bare_lf(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1), b"Subject: x\n\nbody\r\n")
    return qid(1), "bare CR or LF"


def _bare_cr(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1), b"Subject: x\r\n\r\nbo\rdy\r\n")
    return qid(1), "bare CR or LF"


def _nul(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1), b"Subject: x\r\n\r\nbo\0dy\r\n")
    return qid(1), "NUL byte"


def _long_line(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1), b"Subject: x\r\n\r\n" + b"x" * 999 + b"\r\n")
    return qid(1), "line 3 is longer than 998 octets"


def _invalid_recipient(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1, recipients=(A, "not an address")))
    return qid(1), "invalid address 'not an address'"


def _null_recipient(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1, recipients=("",)))
    return qid(1), "invalid address ''"


def _invalid_sender(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1, sender="app@@example.test"))
    return qid(1), "invalid address 'app@@example.test'"


def _no_recipients(w: World) -> tuple[str, str]:
    w.drop(make_envelope(1, recipients=()))
    return qid(1), "no recipients"


def _too_many_recipients(w: World) -> tuple[str, str]:
    recipients = tuple(f"r{i}@example.test" for i in range(MAX_RECIPIENTS + 1))
    w.drop(make_envelope(1, recipients=recipients))
    return qid(1), f"too many recipients ({MAX_RECIPIENTS + 1}, limit {MAX_RECIPIENTS})"


def _body_too_big(w: World) -> tuple[str, str]:
    body = b"Subject: x\r\n\r\n" + (b"y" * 98 + b"\r\n") * (MAX_SIZE // 100 + 1)
    w.drop(make_envelope(1), body)
    return qid(1), f"message too big (limit {MAX_SIZE} bytes)"


def _file_too_big(w: World) -> tuple[str, str]:
    # Refused on its size alone, before it is read: a sparse file costs nothing here.
    path = w.drop(make_envelope(1))
    os.truncate(path, MAX_SIZE + 1024 * 1024 + 1)
    return qid(1), "larger than smtp.max_message_size"


def _symlink(w: World) -> tuple[str, str]:
    target = w.spool.root.parent / "elsewhere"
    target.write_bytes(encoded(make_envelope(1)))
    os.symlink(target, w.spool.maildrop / qid(1))
    return qid(1), "not a regular file"


def _directory(w: World) -> tuple[str, str]:
    (w.spool.maildrop / qid(1)).mkdir()
    return qid(1), "not a regular file"


def _fifo(w: World) -> tuple[str, str]:
    # Opening a FIFO for reading blocks until a writer comes: the pickup must not hang on it.
    os.mkfifo(w.spool.maildrop / qid(1))
    return qid(1), "not a regular file"


REFUSALS = [
    _garbage,
    _truncated,
    _not_a_queue_id,
    _lower_case_id,
    _another_id,
    _bare_lf,
    _bare_cr,
    _nul,
    _long_line,
    _invalid_recipient,
    _null_recipient,
    _invalid_sender,
    _no_recipients,
    _too_many_recipients,
    _body_too_big,
    _file_too_big,
]
# Not regular files: removed (or, for a directory that is not empty, left and reported), never
# kept in corrupt/, where the queue commands open every file.
NOT_FILES = [_symlink, _directory, _fifo]


@pytest.mark.parametrize("make", REFUSALS, ids=[f.__name__.lstrip("_") for f in REFUSALS])
def test_a_file_that_fails_the_checks_goes_to_corrupt_and_is_counted(
    w: World, make: Callable[[World], tuple[str, str]]
) -> None:
    name, reason = make(w)
    with LogCapture() as logs:
        assert w.run() == 0
    assert w.names("maildrop") == []
    assert w.names("corrupt") == [f"maildrop-{name}"]
    assert w.names("queue") == [] and w.names("tmp") == []
    assert w.enqueued == []
    assert w.rejected == 1
    assert w.received == 0
    (text,) = [t for t in logs.texts() if t.startswith(f"maildrop file {name} refused")]
    assert reason in text, text


@pytest.mark.parametrize("make", NOT_FILES, ids=[f.__name__.lstrip("_") for f in NOT_FILES])
def test_an_entry_that_is_not_a_regular_file_is_removed_not_kept(
    w: World, make: Callable[[World], tuple[str, str]]
) -> None:
    name, reason = make(w)
    with LogCapture() as logs:
        assert w.run() == 0
    assert w.names("maildrop") == [] and w.names("corrupt") == []
    assert w.enqueued == [] and w.rejected == 1
    (text,) = [t for t in logs.texts() if t.startswith(f"maildrop file {name} refused")]
    assert reason in text, text


def test_a_refused_symlink_is_removed_and_its_target_left_alone(w: World) -> None:
    _symlink(w)
    target = w.spool.root.parent / "elsewhere"
    before = target.read_bytes()
    w.run()
    assert not (w.spool.maildrop / qid(1)).is_symlink()
    assert target.read_bytes() == before


@pytest.mark.parametrize("area", ["queue", "hold", "failed", "corrupt"])
def test_a_file_naming_an_id_the_spool_already_has_never_replaces_that_message(
    w: World, area: str
) -> None:
    """A leftover of a crash after adoption, or another user's attempt to overwrite a held
    message or a dead letter: the spool's message stays as it is."""
    victim = w.spool.area(area) / qid(1)
    victim.write_bytes(b"the spool's own message")
    w.drop(make_envelope(1))
    assert w.run() == 0
    assert victim.read_bytes() == b"the spool's own message"
    assert w.names("maildrop") == [] and w.enqueued == []


def test_a_hostile_envelope_does_not_stop_the_pass(w: World) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    w.write(qid(1), b"MAILRELAY-SPOOL 1\n" + record(b"E", nested) + end_record(0, 0))
    w.drop(make_envelope(2))
    with LogCapture():
        assert w.run() == 1
    assert w.names("queue") == [qid(2)]
    assert w.names("maildrop") == []


def test_refused_files_do_not_stop_the_good_ones_beside_them(w: World) -> None:
    _garbage(w)  # qid(1)
    w.drop(make_envelope(2))
    w.write("zzz", b"junk")
    w.drop(make_envelope(4, recipients=("bad address",)))
    w.drop(make_envelope(5))
    with LogCapture():
        assert w.run() == 2
    assert [e.queue_id for e in w.enqueued] == [qid(2), qid(5)]
    assert w.names("corrupt") == [f"maildrop-{qid(1)}", f"maildrop-{qid(4)}", "maildrop-zzz"]
    assert w.names("maildrop") == []
    assert (w.received, w.rejected) == (2, 3)


# -- the crash-window leftover ------------------------------------------------------------------


def test_a_leftover_already_in_the_queue_is_only_removed(w: World) -> None:
    env = make_envelope()
    w.drop(env)
    assert w.run() == 1
    queued = (w.spool.queue / env.queue_id).read_bytes()
    # A crash after the queue copy was made durable and before the maildrop copy went.
    w.drop(env)

    assert w.run() == 0

    assert w.names("maildrop") == []
    assert (w.spool.queue / env.queue_id).read_bytes() == queued
    assert len(w.enqueued) == 1  # not enqueued twice
    assert (w.received, w.rejected) == (1, 0)
    assert w.names("corrupt") == []


def test_a_leftover_is_recognised_before_it_is_checked(w: World) -> None:
    """Whatever the maildrop copy holds, the queue copy (the daemon's own) is the message."""
    env = make_envelope()
    w.drop(env)
    w.run()
    w.write(env.queue_id, b"whatever")
    assert w.run() == 0
    assert w.names("maildrop") == [] and w.names("corrupt") == []
    assert w.rejected == 0


# -- dot-files ------------------------------------------------------------------------------------


def test_dot_files_are_never_adopted_and_removed_only_when_stale(w: World) -> None:
    now = time.time()
    young = w.write(f".{qid(1)}.tmp", encoded(make_envelope(1)))
    os.utime(young, (now - STALE_TMP + 600, now - STALE_TMP + 600))
    old = w.write(f".{qid(2)}.tmp", encoded(make_envelope(2)))
    os.utime(old, (now - STALE_TMP - 600, now - STALE_TMP - 600))
    hidden = w.write(f".{qid(3)}", encoded(make_envelope(3)))  # fresh: a sendmail mid-write

    assert w.run() == 0

    assert w.names("maildrop") == sorted([young.name, hidden.name])
    assert w.names("queue") == [] and w.names("corrupt") == []
    assert w.enqueued == [] and (w.received, w.rejected) == (0, 0)


@pytest.mark.parametrize("poison", ["stale dot-directory", "directory that cannot be moved"])
def test_one_entry_that_cannot_be_removed_does_not_stop_the_pickup(w: World, poison: str) -> None:
    now = time.time()
    if poison == "stale dot-directory":
        junk = w.spool.maildrop / ".junk"
        junk.mkdir()
        os.utime(junk, (now - STALE_TMP - 600, now - STALE_TMP - 600))
    else:
        # The user's directory was set aside once (with a file in it); the same name again
        # cannot be renamed over the non-empty one in corrupt/.
        (w.spool.corrupt / "maildrop-0junk").mkdir()
        (w.spool.corrupt / "maildrop-0junk" / "x").write_bytes(b"x")
        (w.spool.maildrop / "0junk").mkdir()
        (w.spool.maildrop / "0junk" / "x").write_bytes(b"x")
    env = make_envelope()
    w.drop(env)
    with LogCapture():
        w.run()
    assert [e.queue_id for e in w.enqueued] == [env.queue_id]


def test_a_write_failure_for_one_file_still_enqueues_those_adopted_before_it(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = make_envelope(1), make_envelope(2)
    w.drop(first)
    w.drop(second)
    real = w.spool.write_durably

    def write_durably(envelope: Envelope, data: bytes) -> None:
        if envelope.queue_id == second.queue_id:
            raise SpoolWriteError("No space left on device")
        real(envelope, data)

    monkeypatch.setattr(w.spool, "write_durably", write_durably)
    with LogCapture():
        w.run()
    assert w.names("queue") == [first.queue_id]
    assert [e.queue_id for e in w.enqueued] == [first.queue_id]
    assert w.names("maildrop") == [second.queue_id]  # kept for the next pass


# -- passes that overlap --------------------------------------------------------------------------


def test_a_call_during_a_pass_gets_the_next_pass_and_calls_share_it(tmp_path: Path) -> None:
    runner = ManualRunner()
    w = World(tmp_path, runner)
    first = w.pickup.pickup()  # lists the (empty) maildrop now; its result is held back
    env = make_envelope()
    w.drop(env)  # arrives after the listing
    second = w.pickup.pickup()
    third = w.pickup.pickup()
    assert runner.runs == 1  # no second pass while the first runs
    assert not has_fired(first) and not has_fired(second)

    runner.release()

    assert result_of(first) == 0
    assert w.enqueued == []
    assert runner.runs == 2  # the next pass started at once, and it saw the new file
    assert not has_fired(second) and not has_fired(third)

    runner.release()

    assert result_of(second) == 1 and result_of(third) == 1
    assert [e.queue_id for e in w.enqueued] == [env.queue_id]
    assert runner.pending == []
    # Idle again: a new call starts a new pass at once.
    fourth = w.pickup.pickup()
    assert runner.runs == 3
    runner.release()
    assert result_of(fourth) == 0


def test_a_failed_pass_answers_its_callers_with_zero_and_the_next_pass_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = ManualRunner()
    w = World(tmp_path, runner)
    boom = RuntimeError("listing exploded")

    def adopt_all() -> list[Any]:
        raise boom

    monkeypatch.setattr(w.pickup, "adopt_all", adopt_all)
    with LogCapture() as logs:
        d = w.pickup.pickup()
        runner.release()
    assert result_of(d) == 0
    failures = [e["log_failure"] for e in logs.events if "log_failure" in e]
    assert [f.value for f in failures] == [boom]

    monkeypatch.undo()
    w.drop(make_envelope())
    d = w.pickup.pickup()
    runner.release()
    assert result_of(d) == 1


def test_enqueue_raising_is_reported_to_no_caller_as_a_failure(w: World) -> None:
    """The pass's Deferreds always fire with a number (the control channel awaits them)."""

    def enqueue(envelope: Envelope) -> None:
        raise RuntimeError("queue broken")

    pickup = MaildropPickup(w.clock, w.spool, LIMITS, enqueue, w.metrics, INTERVAL)
    w.drop(make_envelope())
    with LogCapture():
        d = pickup.pickup()
    assert result_of(d) == 0


# -- polling --------------------------------------------------------------------------------------


def test_polling_picks_up_a_file_every_interval_until_stopped(w: World) -> None:
    first = make_envelope(1)
    w.drop(first)
    w.pickup.start_polling()
    assert w.enqueued == []  # not at once: the daemon runs a pass itself at start
    w.clock.advance(INTERVAL - 0.01)
    assert w.enqueued == []
    w.clock.advance(0.01)
    assert [e.queue_id for e in w.enqueued] == [first.queue_id]

    second = make_envelope(2)
    w.drop(second)
    w.clock.advance(INTERVAL)
    assert [e.queue_id for e in w.enqueued] == [first.queue_id, second.queue_id]

    w.pickup.stop_polling()
    w.drop(make_envelope(3))
    w.clock.advance(INTERVAL * 10)
    assert len(w.enqueued) == 2
    assert w.clock.getDelayedCalls() == []
    w.pickup.stop_polling()  # twice is harmless


def test_stop_polling_before_start_is_harmless(w: World) -> None:
    w.pickup.stop_polling()
    assert w.clock.getDelayedCalls() == []


def test_sendmail_ids_are_queue_ids(w: World) -> None:
    """What sendmail names its files passes the pickup's name check."""
    env = make_envelope(queue_id=new_queue_id(time.time()))
    w.drop(env)
    assert w.run() == 1
