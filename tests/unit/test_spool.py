"""The spool: framed files, durable commit, the journal, and moves between areas."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from mailrelay.spool import store as store_module
from mailrelay.spool.format import (
    JOURNAL_MAGIC,
    MESSAGE_MAGIC,
    TAG_OUTCOME,
    CorruptSpoolFile,
    Envelope,
    JournalRead,
    Outcome,
    Status,
    decode_envelope,
    decode_journal,
    decode_message,
    journal_end,
    read_journal,
    record,
)
from mailrelay.spool.store import JOURNAL_SUFFIX, Spool, SpoolWriteError
from tests.unit.fakes import envelope, failure_of, make_spool, result_of, store

QID = "0000000000000100000001"
BODY = b"Subject: test\r\n\r\n.dot line\r\nbody \xff\x00 bytes\r\n"


def files(area: Path) -> list[str]:
    return sorted(p.name for p in area.iterdir())


def outcome(recipient: str, status: Status = Status.DELIVERED, at: float = 1.0) -> Outcome:
    return Outcome(recipient, status, f"250 ok {recipient}", "p1", at)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path / "spool")


@pytest.fixture(scope="module")
def message_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small committed message file, with two body records."""
    spool = make_spool(tmp_path_factory.mktemp("spool"))
    writer = spool.open_writer(envelope(QID, ["a@example.test", "b@example.test"]))
    writer.write(BODY)
    old = store_module.BODY_RECORD_SIZE
    store_module.BODY_RECORD_SIZE = 8  # force the next write into a record of its own
    try:
        writer.write(b"second chunk of the body\r\n")
    finally:
        store_module.BODY_RECORD_SIZE = old
    result_of(writer.commit())
    return (spool.queue / QID).read_bytes()


# -- writing and reading a message -----------------------------------------------------------


def test_prepare_creates_the_areas(tmp_path: Path) -> None:
    root = tmp_path / "new-spool"
    make_spool(root)
    assert files(root) == ["corrupt", "failed", "hold", "maildrop", "queue", "tmp"]
    assert (root / "maildrop").stat().st_mode & 0o7777 == 0o1733


def test_prepare_clears_leftovers_in_tmp(spool: Spool) -> None:
    (spool.tmp / "leftover").write_bytes(b"half a message")
    spool.open_writer(envelope("OTHER"))  # a session that died before commit
    spool.prepare()
    assert files(spool.tmp) == []


def test_clear_tmp_removes_the_partial_messages_of_one_process_only(spool: Spool) -> None:
    from mailrelay.spool.store import new_queue_id

    mine = [new_queue_id(1_700_000_000 + i, tag=7) for i in range(3)]
    others = [new_queue_id(1_700_000_000, tag=8), new_queue_id(1_700_000_000, tag=0)]
    for name in [*mine, *others, "not-a-queue-id"]:
        (spool.tmp / name).write_bytes(b"partial")
    assert spool.clear_tmp(7) == 3
    assert sorted(p.name for p in spool.tmp.iterdir()) == sorted([*others, "not-a-queue-id"])
    assert spool.clear_tmp(7) == 0


def test_commit_puts_the_message_in_queue_and_nothing_in_tmp(spool: Spool) -> None:
    writer = spool.open_writer(envelope(QID))
    writer.write(BODY[:10])
    writer.write(BODY[10:])
    assert writer.body_length == len(BODY)
    assert files(spool.tmp) == []  # a small message touches the disk only at commit
    assert result_of(writer.commit()) == QID
    assert files(spool.queue) == [QID]
    assert files(spool.tmp) == []
    assert decode_message((spool.queue / QID).read_bytes()).body == BODY


def test_large_message_spills_to_tmp_while_arriving(spool: Spool) -> None:
    writer = spool.open_writer(envelope(QID))
    body = b"z" * (store_module.SPILL_SIZE * 3)
    writer.write(body)
    assert files(spool.tmp) == [QID]
    assert result_of(writer.commit()) == QID
    assert files(spool.tmp) == []
    assert decode_message((spool.queue / QID).read_bytes()).body == body


def test_decode_round_trip(message_file: bytes) -> None:
    stored = decode_message(message_file)
    assert stored.envelope == envelope(QID, ["a@example.test", "b@example.test"])
    assert stored.body == BODY + b"second chunk of the body\r\n"
    assert decode_envelope(message_file) == stored.envelope


def test_load_returns_message_and_journal(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    result_of(spool.append_journal(QID, [outcome("a@example.test")]))
    stored, journal = result_of(spool.load(QID))
    assert stored.body == BODY
    assert journal == [outcome("a@example.test")]


def test_load_refuses_a_file_that_names_another_queue_id(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    os.rename(spool.queue / QID, spool.queue / "RENAMED")
    assert failure_of(spool.load("RENAMED")).check(CorruptSpoolFile)


def test_big_body_spans_several_records(spool: Spool) -> None:
    body = bytes(range(256)) * (store_module.BODY_RECORD_SIZE // 256 * 2 + 3)
    store(spool, envelope(QID), body)
    assert decode_message((spool.queue / QID).read_bytes()).body == body


def test_every_truncation_is_detected(message_file: bytes) -> None:
    """A file cut short anywhere (crash, full disk) is never taken for a whole message."""
    for cut in range(len(message_file)):
        with pytest.raises(CorruptSpoolFile):
            decode_message(message_file[:cut])


def test_every_flipped_byte_is_detected(message_file: bytes) -> None:
    for i in range(len(message_file)):
        for flip in (0x01, 0x80):
            damaged = bytearray(message_file)
            damaged[i] ^= flip
            with pytest.raises(CorruptSpoolFile):
                decode_message(bytes(damaged))


def test_trailing_garbage_is_detected(message_file: bytes) -> None:
    with pytest.raises(CorruptSpoolFile):
        decode_message(message_file + b"\0")
    with pytest.raises(CorruptSpoolFile):
        decode_message(message_file + message_file[len(MESSAGE_MAGIC) :])


def test_abort_removes_the_tmp_file(spool: Spool) -> None:
    writer = spool.open_writer(envelope(QID))
    writer.write(BODY)
    writer.abort()
    assert files(spool.tmp) == []
    assert files(spool.queue) == []
    writer.abort()  # twice is harmless


# -- failures on the durable path ------------------------------------------------------------


def _failing_fsync(only_directories: bool):  # type: ignore[no-untyped-def]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if not only_directories or stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    return fsync


def test_fsync_failure_gives_spool_write_error_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = spool.open_writer(envelope(QID))
    writer.write(BODY)
    monkeypatch.setattr(os, "fsync", _failing_fsync(only_directories=False))
    failure = failure_of(writer.commit())
    assert failure.check(SpoolWriteError)
    assert "Input/output error" in str(failure.value)
    assert files(spool.queue) == []
    assert files(spool.tmp) == []


def test_directory_fsync_failure_after_rename_removes_the_renamed_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = spool.open_writer(envelope(QID))
    writer.write(BODY)
    monkeypatch.setattr(os, "fsync", _failing_fsync(only_directories=True))
    assert failure_of(writer.commit()).check(SpoolWriteError)
    assert files(spool.queue) == []
    assert files(spool.tmp) == []


def test_rename_failure_removes_the_tmp_file(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = spool.open_writer(envelope(QID))
    writer.write(BODY)

    def rename(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", rename)
    assert failure_of(writer.commit()).check(SpoolWriteError)
    assert files(spool.queue) == []
    assert files(spool.tmp) == []


def test_write_error_is_reported_at_commit(spool: Spool) -> None:
    writer = spool.open_writer(envelope(QID))

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    writer._file = FullDisk()  # type: ignore[assignment]
    writer.write(b"x" * (store_module.BODY_RECORD_SIZE + 1))  # does not raise here
    failure = failure_of(writer.commit())
    assert failure.check(SpoolWriteError)
    assert files(spool.queue) == []
    assert files(spool.tmp) == []


# -- the journal -----------------------------------------------------------------------------


def test_journal_append_and_decode(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    first = [outcome("a@example.test"), outcome("b@example.test", Status.DEFERRED)]
    second = [Outcome("b@example.test", Status.FAILED, "550 no", None, 2.0, uncertain=True)]
    result_of(spool.append_journal(QID, first))
    result_of(spool.append_journal(QID, second))
    data = (spool.queue / (QID + JOURNAL_SUFFIX)).read_bytes()
    assert data.startswith(JOURNAL_MAGIC)
    assert data.count(JOURNAL_MAGIC) == 1
    assert decode_journal(data) == first + second


def test_empty_or_missing_journal_is_no_outcomes(spool: Spool) -> None:
    assert decode_journal(b"") == []
    store(spool, envelope(QID), BODY)
    assert result_of(spool.load(QID))[1] == []


def _journal_bytes(outcomes: list[Outcome]) -> bytes:
    return JOURNAL_MAGIC + b"".join(record(TAG_OUTCOME, o.to_json()) for o in outcomes)


def test_torn_journal_tail_is_ignored_at_every_cut() -> None:
    """A crash mid-append leaves a prefix: whole records count, the torn rest is dropped."""
    outcomes = [outcome("a@example.test"), outcome("b@example.test", Status.FAILED)]
    data = _journal_bytes(outcomes)
    first_end = len(_journal_bytes(outcomes[:1]))
    for cut in range(len(data) + 1):
        expected = outcomes if cut == len(data) else outcomes[:1] if cut >= first_end else []
        assert decode_journal(data[:cut]) == expected, cut


def test_append_after_a_torn_tail_keeps_the_journal_readable(spool: Spool) -> None:
    """The next attempt appends after a torn record: its outcomes must still be read, not
    make the whole message look corrupt."""
    store(spool, envelope(QID), BODY)
    path = spool.queue / (QID + JOURNAL_SUFFIX)
    first = outcome("a@example.test", Status.DEFERRED)
    full = _journal_bytes([first, outcome("b@example.test")])
    path.write_bytes(full[: len(full) - 7])  # crash in the middle of the second record
    later = outcome("b@example.test", Status.DELIVERED, at=9.0)
    result_of(spool.append_journal(QID, [later]))
    assert result_of(spool.load(QID))[1] == [first, later]


def test_append_after_a_torn_magic_line_keeps_the_journal_readable(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    path = spool.queue / (QID + JOURNAL_SUFFIX)
    path.write_bytes(JOURNAL_MAGIC[:5])
    result_of(spool.append_journal(QID, [outcome("a@example.test")]))
    assert result_of(spool.load(QID))[1] == [outcome("a@example.test")]


def test_damaged_journal_keeps_its_valid_prefix_and_says_so() -> None:
    """A flipped bit in the second record: the first still counts; the damage is reported."""
    first = _journal_bytes([outcome("a@example.test")])
    data = bytearray(_journal_bytes([outcome("a@example.test"), outcome("b@example.test")]))
    data[len(first) + 10] ^= 0x01
    read = read_journal(bytes(data))
    assert [o.recipient for o in read.outcomes] == ["a@example.test"]
    assert read.damaged and read.end == len(first)


def test_zero_filled_tail_after_power_loss_keeps_the_records_before_it() -> None:
    good = _journal_bytes([outcome("a@example.test", Status.DEFERRED)])
    read = read_journal(good + bytes(64))
    assert [o.recipient for o in read.outcomes] == ["a@example.test"]
    assert read.damaged and read.end == len(good)
    assert journal_end(good + bytes(64)) == len(good)


def test_journal_with_a_foreign_record_keeps_nothing_after_it() -> None:
    read = read_journal(JOURNAL_MAGIC + record(b"B", b"not an outcome"))
    assert read.outcomes == [] and read.damaged


def test_journal_with_a_bad_magic_line_is_damaged_and_empty() -> None:
    read = read_journal(b"GARBAGE-JOURNAL 9\n" + bytes(20))
    assert read == JournalRead([], 0, True)


def test_append_after_damage_cuts_the_damage_off(spool: Spool) -> None:
    store(spool, envelope(QID))
    result_of(spool.append_journal(QID, [outcome("a@example.test", Status.DEFERRED)]))
    path = spool.queue / (QID + JOURNAL_SUFFIX)
    path.write_bytes(path.read_bytes() + bytes(64))  # zero-filled tail
    result_of(spool.append_journal(QID, [outcome("b@example.test")]))
    _, journal = result_of(spool.load(QID))
    assert [o.recipient for o in journal] == ["a@example.test", "b@example.test"]


def test_outcome_json_round_trip() -> None:
    o = Outcome("a@example.test", Status.DEFERRED, "451 later", None, 12.5, uncertain=True)
    assert Outcome.from_json(o.to_json()) == o


# -- leaving the queue -----------------------------------------------------------------------


def test_remove_deletes_message_and_journal(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    result_of(spool.append_journal(QID, [outcome("a@example.test")]))
    result_of(spool.remove(QID))
    assert files(spool.queue) == []


@pytest.mark.parametrize("area", ["failed", "corrupt"])
def test_move_takes_the_journal_along(spool: Spool, area: str) -> None:
    store(spool, envelope(QID), BODY)
    result_of(spool.append_journal(QID, [outcome("a@example.test")]))
    move = spool.move_to_failed if area == "failed" else spool.move_to_corrupt
    result_of(move(QID))
    assert files(spool.queue) == []
    assert files(spool.root / area) == [QID, QID + JOURNAL_SUFFIX]


def test_move_without_a_journal(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    result_of(spool.move_to_corrupt(QID))
    assert files(spool.corrupt) == [QID]


def test_remove_orphan_journals(spool: Spool) -> None:
    store(spool, envelope(QID), BODY)
    result_of(spool.append_journal(QID, [outcome("a@example.test")]))
    (spool.queue / ("ORPHAN" + JOURNAL_SUFFIX)).write_bytes(JOURNAL_MAGIC)
    assert spool.reconcile_journals() == 1
    assert files(spool.queue) == [QID, QID + JOURNAL_SUFFIX]


def test_queued_ids_are_oldest_first_and_skip_journals(spool: Spool) -> None:
    ids = [spool.new_queue_id() for _ in range(3)]
    for qid in reversed(ids):
        store(spool, envelope(qid), BODY)
    result_of(spool.append_journal(ids[0], [outcome("a@example.test")]))
    assert spool.queued_ids() == sorted(ids)


def test_new_queue_ids_are_unique_and_time_sortable() -> None:
    from mailrelay.spool.store import new_queue_id

    earlier = {new_queue_id(1000.0) for _ in range(50)}
    later = new_queue_id(1000.001)
    assert len(earlier) == 50
    assert all(e < later for e in earlier)


class _RefusingRunner:
    """A runner that fails before running anything (e.g. a thread pool already stopped)."""

    def run(self, f: object, *args: object, **kwargs: object) -> defer.Deferred[object]:
        return defer.fail(RuntimeError("runner unavailable"))


def test_commit_failing_before_fsync_still_removes_the_tmp_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, _RefusingRunner())
    spool.prepare()
    writer = spool.open_writer(envelope("Q1"))
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    failure_of(writer.commit())
    assert files(spool.tmp) == [] and files(spool.queue) == []


def test_crash_between_the_two_renames_of_a_move_keeps_the_journal_with_its_message(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message moves first; a journal left behind follows it at the next start."""
    store(spool, envelope(QID))
    result_of(
        spool.append_journal(
            QID, [outcome("a@example.test"), outcome("b@example.test", Status.FAILED)]
        )
    )
    real_rename = os.rename

    def crash_on_journal(src: object, dst: object) -> None:
        if str(src).endswith(JOURNAL_SUFFIX):
            raise OSError(errno.EIO, "simulated crash")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", crash_on_journal)
    failure_of(spool.move_to_failed(QID))
    monkeypatch.undo()
    # The message is not in queue/ any more: it can never be sent again.
    assert files(spool.queue) == [QID + JOURNAL_SUFFIX]
    assert files(spool.failed) == [QID]
    assert spool.reconcile_journals() == 1
    assert files(spool.queue) == []
    assert files(spool.failed) == sorted([QID, QID + JOURNAL_SUFFIX])


def test_flipped_length_field_is_damage_not_a_torn_tail() -> None:
    """A length that points past the end looks truncated, but whole records follow it."""
    one = _journal_bytes([outcome("a@x.test")])
    data = bytearray(_journal_bytes([outcome(r) for r in ("a@x.test", "b@x.test", "c@x.test")]))
    second = len(one)  # the second record starts where a one-record journal ends
    assert data[second : second + 1] == b"R"
    data[second + 2] ^= 0x40  # the length field (u32 after the tag) now points past the end
    read = read_journal(bytes(data))
    assert len(read.outcomes) == 1
    assert read.damaged


def test_every_torn_tail_is_silent() -> None:
    data = _journal_bytes([outcome("a@example.test"), outcome("b@example.test")])
    one = len(_journal_bytes([outcome("a@example.test")]))
    for cut in range(one + 1, len(data)):
        read = read_journal(data[:cut])
        assert len(read.outcomes) == 1 and not read.damaged, cut


@given(
    st.text(max_size=30),
    st.lists(st.text(max_size=30), max_size=5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
def test_property_envelope_json_is_unchanged_and_round_trips(
    sender: str, recipients: list[str], received_at: float, body_8bit: bool
) -> None:
    """to_json is spelled out (for speed): the bytes are still those attrs.asdict gave, so
    files written before read the same, and it decodes back to the same envelope."""
    env = Envelope(
        queue_id="0000000000000100000001",
        sender=sender,
        recipients=tuple(recipients),
        received_at=received_at,
        client="127.0.0.1",
        helo="helo.test",
        body_8bit=body_8bit,
    )
    assert env.to_json() == json.dumps(attrs.asdict(env), separators=(",", ":")).encode()
    assert Envelope.from_json(env.to_json()) == env
