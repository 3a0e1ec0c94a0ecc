"""The spool directory: durable acceptance, the journal, and the moves between areas.

Layout under the spool path::

    tmp/       messages being received; anything here at start is a leftover and removed
    queue/     accepted messages (<id>) and their journals (<id>.journal)
    failed/    dead letters: messages with a recipient that failed for good (the seed's .failed)
    corrupt/   files that failed their checksum, kept for a person to look at

Durability contract: ``MessageWriter.commit`` writes the tmp file, fsyncs it, renames it into
``queue/`` and fsyncs the directory; only when that Deferred fires may the server say 250.
If any step fails the copy is removed and never delivered (no fsync retry: "fsyncgate").
"""

from __future__ import annotations

import os
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.blocking import BlockingRunner
from mailrelay.spool.format import (
    JOURNAL_MAGIC,
    MESSAGE_MAGIC,
    TAG_BODY,
    TAG_ENVELOPE,
    TAG_OUTCOME,
    CorruptSpoolFile,
    Envelope,
    Outcome,
    StoredMessage,
    decode_message,
    end_record,
    journal_end,
    read_journal,
    record,
)

# Body bytes are framed in records of at most this size; small enough to checksum cheaply,
# large enough that a big message is a handful of records.
BODY_RECORD_SIZE = 256 * 1024
# A message whose framed bytes pass this size is written to its tmp file as it arrives.
SPILL_SIZE = 256 * 1024
JOURNAL_SUFFIX = ".journal"


class SpoolWriteError(Exception):
    """The message could not be made durable; the client must get a 4xx and keep its copy."""


def new_queue_id(now: float) -> str:
    """A unique, time-sortable queue ID: microseconds since the epoch and 32 random bits."""
    return f"{int(now * 1_000_000):014X}{secrets.randbits(32):08X}"


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    log = Logger()

    def __init__(self, root: Path, runner: BlockingRunner, now: Callable[[], float] = time.time):
        self.root = root
        self.tmp = root / "tmp"
        self.queue = root / "queue"
        self.failed = root / "failed"
        self.corrupt = root / "corrupt"
        self._runner = runner
        self._now = now

    def prepare(self) -> None:
        """Create the areas and clear tmp/ of messages whose sessions died before the 250."""
        for area in (self.tmp, self.queue, self.failed, self.corrupt):
            area.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        _fsync_directory(self.root)

    # -- acceptance ---------------------------------------------------------------------------

    def open_writer(self, envelope: Envelope) -> MessageWriter:
        return MessageWriter(self, envelope)

    def new_queue_id(self) -> str:
        return new_queue_id(self._now())

    # -- reading ----------------------------------------------------------------------------------

    def queued_ids(self) -> list[str]:
        """IDs of every message in queue/, oldest first (blocking; for recovery)."""
        return sorted(p.name for p in self.queue.iterdir() if not p.name.endswith(JOURNAL_SUFFIX))

    def load(self, queue_id: str) -> defer.Deferred[tuple[StoredMessage, list[Outcome]]]:
        return self._runner.run(self._load, queue_id)

    def _load(self, queue_id: str) -> tuple[StoredMessage, list[Outcome]]:
        message = decode_message((self.queue / queue_id).read_bytes())
        if message.envelope.queue_id != queue_id:
            raise CorruptSpoolFile("envelope names another queue ID")
        try:
            journal = read_journal((self.queue / (queue_id + JOURNAL_SUFFIX)).read_bytes())
        except FileNotFoundError:
            return message, []
        if journal.damaged:
            self.log.error(
                "{queue_id} journal damaged: kept {count} record(s); a recipient whose outcome"
                " was lost may be sent again",
                queue_id=queue_id,
                count=len(journal.outcomes),
            )
        return message, journal.outcomes

    # -- journal ----------------------------------------------------------------------------------

    def append_journal(self, queue_id: str, outcomes: Sequence[Outcome]) -> defer.Deferred[None]:
        payload = b"".join(record(TAG_OUTCOME, o.to_json()) for o in outcomes)
        return self._runner.run(self._append_journal, queue_id, payload)

    def _append_journal(self, queue_id: str, payload: bytes) -> None:
        path = self.queue / (queue_id + JOURNAL_SUFFIX)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and (end := journal_end(os.pread(fd, size, 0))) < size:
                # A torn tail (crash mid-append) or other damage: cut it off first, or the
                # records appended now would sit behind it and never be read.
                os.ftruncate(fd, end)
                size = end
            if size == 0:
                payload = JOURNAL_MAGIC + payload
                created = True
            else:
                created = False
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.queue)

    # -- leaving the queue ------------------------------------------------------------------------

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        return self._runner.run(self._remove, queue_id)

    def _remove(self, queue_id: str) -> None:
        # The message goes first: a journal left alone is cleaned up at the next start,
        # a message left without its journal would be sent again.
        (self.queue / queue_id).unlink(missing_ok=True)
        (self.queue / (queue_id + JOURNAL_SUFFIX)).unlink(missing_ok=True)
        _fsync_directory(self.queue)

    def move_to_failed(self, queue_id: str) -> defer.Deferred[None]:
        return self._runner.run(self._move, queue_id, self.failed)

    def move_to_corrupt(self, queue_id: str) -> defer.Deferred[None]:
        return self._runner.run(self._move, queue_id, self.corrupt)

    def _move(self, queue_id: str, area: Path) -> None:
        # The message goes first: after a crash in between, queue/ holds only a journal,
        # which the next start moves after its message (remove_orphan_journals). The other
        # order would leave a message without its journal: every recipient sent again.
        os.rename(self.queue / queue_id, area / queue_id)
        journal = self.queue / (queue_id + JOURNAL_SUFFIX)
        if journal.exists():
            os.rename(journal, area / journal.name)
        _fsync_directory(area)
        _fsync_directory(self.queue)

    def remove_orphan_journals(self) -> int:
        """Journals without a message in queue/ (a crash inside _remove or _move); at start.

        One whose message went to failed/ or corrupt/ follows it there (it is the record of
        why); one whose message was removed is deleted.
        """
        handled = 0
        for path in self.queue.glob("*" + JOURNAL_SUFFIX):
            queue_id = path.name[: -len(JOURNAL_SUFFIX)]
            if (self.queue / queue_id).exists():
                continue
            for area in (self.failed, self.corrupt):
                if (area / queue_id).exists():
                    os.rename(path, area / path.name)
                    break
            else:
                path.unlink(missing_ok=True)
            handled += 1
        return handled


class MessageWriter:
    """One message being received: framed records, made durable in tmp/ then queue/ by commit.

    A message smaller than ``SPILL_SIZE`` stays in memory until commit, and the whole file is
    then written, fsynced and renamed in the I/O thread: the reactor thread never waits on the
    file system for it (opening a file in a busy directory took ~1 ms, measured). A larger
    message spills to its tmp file as it arrives, so memory stays bounded.
    """

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self._spool = spool
        self.envelope = envelope
        self._tmp_path = spool.tmp / envelope.queue_id
        self._final_path = spool.queue / envelope.queue_id
        self._framed = bytearray(MESSAGE_MAGIC + record(TAG_ENVELOPE, envelope.to_json()))
        self._pending = bytearray()
        self._body_length = 0
        self._body_crc = 0
        self._error: OSError | None = None
        self._closed = False
        self._file: BinaryIO | None = None

    @property
    def body_length(self) -> int:
        return self._body_length

    def write(self, data: bytes) -> None:
        """Add body bytes. Write errors are remembered and reported by commit()."""
        self._body_length += len(data)
        self._body_crc = zlib.crc32(data, self._body_crc)
        self._pending += data
        if len(self._pending) >= BODY_RECORD_SIZE:
            self._frame_pending()
            if len(self._framed) >= SPILL_SIZE:
                self._spill()

    def _frame_pending(self) -> None:
        if self._pending:
            self._framed += record(TAG_BODY, bytes(self._pending))
            self._pending.clear()

    def _spill(self) -> None:
        """Move framed bytes from memory to the tmp file (large messages only)."""
        if self._error is not None:
            self._framed.clear()
            return
        try:
            if self._file is None:
                self._file = open(self._tmp_path, "xb")  # noqa: SIM115 - closed by commit/abort
            self._file.write(self._framed)
        except OSError as e:
            self._error = e
        self._framed.clear()

    def commit(self) -> defer.Deferred[str]:
        """Make the message durable; fires with the queue ID, or fails with SpoolWriteError."""
        self._frame_pending()
        self._framed += end_record(self._body_length, self._body_crc)
        self._closed = True
        d = self._spool._runner.run(self._make_durable)
        return d.addErrback(self._discard_after_failure)

    def _discard_after_failure(self, failure: Failure) -> Failure:
        # Whatever failed (even before _make_durable ran), this copy is never delivered.
        self._close_file()
        self._tmp_path.unlink(missing_ok=True)
        return failure

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()

    def _make_durable(self) -> str:
        """In the I/O thread: write what is left, fsync, rename into queue/, fsync queue/."""
        renamed = False
        try:
            if self._error is not None:
                raise self._error
            if self._file is None:
                self._file = open(self._tmp_path, "xb")  # noqa: SIM115 - closed just below
            self._file.write(self._framed)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self._tmp_path, self._final_path)
            renamed = True
            _fsync_directory(self._spool.queue)
        except OSError as e:
            # Never fsync again after a failure: drop this copy; the client keeps its own.
            self._close_file()
            (self._final_path if renamed else self._tmp_path).unlink(missing_ok=True)
            raise SpoolWriteError(f"{e.strerror or e}") from e
        return self.envelope.queue_id

    def abort(self) -> None:
        """The session ended before the final dot: nothing of this message stays."""
        if self._closed:
            return
        self._closed = True
        self._framed.clear()
        self._close_file()
        self._tmp_path.unlink(missing_ok=True)
