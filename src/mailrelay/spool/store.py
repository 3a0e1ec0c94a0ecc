"""The spool directory: durable acceptance, the journal, and the moves between areas.

Layout under the spool path::

    tmp/       messages being received; anything here at start is a leftover and removed
    queue/     accepted messages (<id>) and their journals (<id>.journal); a message's mtime
               is its next attempt time (as in Postfix), so a deferral survives a restart
    hold/      messages an operator put on hold, with their journals; never tried
    failed/    dead letters: messages with a recipient that failed for good (the seed's .failed)
    corrupt/   files that failed their checksum, kept for a person to look at
    maildrop/  messages from the sendmail command (mode 1733: any local user may drop one);
               the daemon checks and adopts them into queue/
    attempts   the attempt log: a record (queue ID, time) appended before each delivery
               attempt and one (queue ID) after it, so the next start knows which attempts
               a crash interrupted
    lock       held (flock) by the daemon, or by a queue command working on a stopped daemon's
               spool, so the two never act on the same files at once
    control.sock  the daemon's control channel (mode 0600), see mailrelay.control

Durability contract: ``MessageWriter.commit`` writes the tmp file, fsyncs it, renames it into
``queue/`` and fsyncs the directory; only when that Deferred fires may the server say 250. For
an SMTP acceptance on ext4 or XFS (``spool.directory_fsync = "auto"``) it renames first and
fsyncs the file once instead, which makes the content and the new name durable together (see
mailrelay.spool.filesystems).
If any step fails the copy is removed and never delivered (no fsync retry: "fsyncgate"); only
if that removal fails too (a file system gone read-only) may the copy be delivered after all,
a duplicate of what the client sends again after its 451.
Every move and removal fsyncs the directories it changed before it returns, but ``unlink``:
the delivery queue makes the removals of delivered messages durable several at a time
(mailrelay.spool.removals).

The attempt log is the one file written from the reactor thread: ``mark_attempt`` (and
``mark_attempt_done``) is a single ``write()`` of one framed record to a descriptor opened at
queue start (O_APPEND; no fsync, no directory change, no thread hop), so it costs about as
little as a log line. A process crash keeps what was written (the kernel has it); a power cut
may lose any of it, and then the next start under-counts possible duplicates (it never loses
or re-sends anything because of it: the journals and the messages' files are the durable
record). At start the log is read into the attempts that never ended, cut down to the messages
still in queue/ or hold/, and rewritten (temporary name, rename); when it passes
``ATTEMPT_LOG_LIMIT`` it is rewritten with only the markers the queue still needs.

Every file-system call for messages, journals and the attempt log goes through ``Spool.fs``
(``FileSystem`` in mailrelay.spool.fs: plain ``os`` calls by default), so a test can model a
power cut; the lock does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from mailrelay.blocking import BlockingRunner
from mailrelay.logger import Logger
from mailrelay.spool.format import (
    ATTEMPTS_MAGIC,
    JOURNAL_MAGIC,
    MESSAGE_MAGIC,
    TAG_BODY,
    TAG_ENVELOPE,
    TAG_OUTCOME,
    CorruptSpoolFile,
    Envelope,
    Outcome,
    StoredMessage,
    attempt_done_record,
    attempt_record,
    decode_message,
    end_record,
    read_attempt_log,
    read_journal,
    record,
)
from mailrelay.spool.fs import REAL_FS, FileSystem, SpoolFile
from mailrelay.spool.fs import fsync_directory as fsync_directory  # pickup, maildrop use it

P = ParamSpec("P")
R = TypeVar("R")

# Body bytes are framed in records of at most this size; small enough to checksum cheaply,
# large enough that a big message is a handful of records.
BODY_RECORD_SIZE = 256 * 1024
# A message whose framed bytes pass this size is written to its tmp file as it arrives.
SPILL_SIZE = 256 * 1024
JOURNAL_SUFFIX = ".journal"
# Areas a message can be in, by name (queue commands name them too).
QUEUE, HOLD, FAILED, CORRUPT, MAILDROP = "queue", "hold", "failed", "corrupt", "maildrop"
MESSAGE_AREAS = (QUEUE, HOLD, FAILED, CORRUPT)
# The attempt log, in the spool root beside the areas (see the module docstring).
ATTEMPTS = "attempts"
# Past this size the attempt log is rewritten with only the markers still needed: a record is
# ~40 bytes, so that is once every ~25 000 attempts.
ATTEMPT_LOG_LIMIT = 1024 * 1024
# Queue ID tags (new_queue_id): 0 is the relay process's, 1 to ACCEPTOR_TAGS the acceptor
# processes', and SENDMAIL_TAG the sendmail command's, so the clean-up after an acceptor's exit
# (clear_tmp, adopt_unindexed) never takes a message the pickup is moving in from maildrop/.
ACCEPTOR_TAGS = 254
SENDMAIL_TAG = 255


class SpoolWriteError(Exception):
    """The message could not be made durable; the client must get a 4xx and keep its copy."""


class SpoolBusy(Exception):
    """Another process holds the spool's lock."""

    def __init__(self, root: Path, holder: str) -> None:
        super().__init__(f"spool {root.absolute()} is in use by another process ({holder})")
        self.holder_is_daemon = holder.endswith("mailrelay daemon")


class SpoolLock:
    """An exclusive flock on ``<spool>/lock``, held for as long as this object lives open.

    flock is released by the kernel when the process dies, so a SIGKILLed daemon never leaves
    a stale lock behind. The holder writes its pid into the file, for the error message only.
    """

    def __init__(self, root: Path, purpose: str) -> None:
        path = root / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            first_line = os.pread(fd, 200, 0).decode("ascii", "replace").partition("\n")[0]
            holder = first_line.strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolBusy(root, holder) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {purpose}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def new_queue_id(now: float, tag: int | None = None) -> str:
    """A unique, time-sortable queue ID: microseconds since the epoch and 32 random bits, or,
    with ``tag`` (0-255), the tag and 24 random bits: which process made it (see queue_id_tag)."""
    if tag is None:
        return f"{int(now * 1_000_000):014X}{secrets.randbits(32):08X}"
    return f"{int(now * 1_000_000):014X}{tag:02X}{secrets.randbits(24):06X}"


def queue_id_tag(queue_id: str) -> int:
    """The tag of an ID made with one (new_queue_id): with acceptor processes, 0 for the relay
    process and each acceptor process's own number for the IDs it made; SENDMAIL_TAG for the
    sendmail command's."""
    return int(queue_id[14:16], 16)


def _records_after_magic(data: bytes) -> bytes:
    return data[len(JOURNAL_MAGIC) :] if data.startswith(JOURNAL_MAGIC) else b""


def queue_id_time(queue_id: str) -> float:
    """When a message was accepted, read back from its queue ID (see new_queue_id)."""
    return int(queue_id[:14], 16) / 1_000_000


def is_queue_id(name: str) -> bool:
    """Our IDs are 22 upper-case hex digits; anything else (a path, "..") names no message."""
    return len(name) == 22 and all(c in "0123456789ABCDEF" for c in name)


class Spool:
    log = Logger()

    def __init__(
        self,
        root: Path,
        runner: BlockingRunner,
        now: Callable[[], float] = time.time,
        *,
        fs: FileSystem = REAL_FS,
        id_tag: int | None = None,
        acceptance_directory_fsync: bool = True,
    ):
        """``fs``: every file-system call for messages and journals goes through it (the real
        one by default; a test passes one that models power loss). The lock does not.
        ``id_tag``: the tag in every queue ID this process makes (new_queue_id).
        ``acceptance_directory_fsync``: False where the file system makes a renamed file's
        name durable with its fsync (mailrelay.spool.filesystems): an SMTP acceptance then
        costs one flush instead of two. Every other write into queue/ fsyncs the directory."""
        self.root = root
        self.id_tag = id_tag
        self.acceptance_directory_fsync = acceptance_directory_fsync
        # Queue IDs whose commit is under way (written, maybe renamed into queue/, not yet
        # durable): the queue's start-up scan must leave them to their own enqueue.
        self.committing: set[str] = set()
        self.fs = fs
        self.tmp = root / "tmp"
        self.queue = root / QUEUE
        self.hold = root / HOLD
        self.failed = root / FAILED
        self.corrupt = root / CORRUPT
        self.maildrop = root / MAILDROP
        self.control_socket = root / "control.sock"
        self.attempts = root / ATTEMPTS
        self.attempt_log_limit = ATTEMPT_LOG_LIMIT
        self._attempt_fd: int | None = None
        self._attempt_log_size = 0
        self._runner = runner
        self._now = now

    def area(self, name: str) -> Path:
        return self.root / name

    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]:
        """Run blocking spool work where this spool runs it (its I/O thread pool)."""
        return self._runner.run(f, *args, **kwargs)

    def lock(self, purpose: str) -> SpoolLock:
        """Take the spool's lock or raise SpoolBusy (blocking, but only a flock call)."""
        return SpoolLock(self.root, purpose)

    def ensure_areas(self) -> None:
        """Create missing message areas (a spool written by an older version) and make every
        area private: the spool root must stay traversable for the maildrop, but queued mail
        is nobody else's to list or read. Lock holder only."""
        for area in (*MESSAGE_AREAS, "tmp"):
            self.fs.mkdir(self.area(area), exist_ok=True)
            self.fs.chmod(self.area(area), 0o700)

    def prepare(self) -> None:
        """Create the areas and clear tmp/ of messages whose sessions died before the 250.

        Only the lock holder may call this (it deletes files in tmp/).
        """
        fs = self.fs
        fs.mkdir(self.root, parents=True, exist_ok=True)
        self.ensure_areas()
        if not fs.exists(self.maildrop):
            fs.mkdir(self.maildrop)
            # Sticky and writable by every local user, not listable: the sendmail command of
            # another user (PHP's mail(), cron) can drop a message but not see or take others.
            fs.chmod(self.maildrop, 0o1733)
        for leftover in fs.listdir(self.tmp):
            fs.unlink(self.tmp / leftover, missing_ok=True)
        fs.fsync_directory(self.root)

    def clear_tmp(self, tag: int) -> int:
        """Remove from tmp/ the partial messages of the process whose queue IDs carry ``tag``
        (an acceptor process that died in the middle of receiving them: nobody will finish
        them, and prepare() clears tmp/ only at the next start). Blocking; returns how many.
        Only once that process is gone: a live one may still be writing them."""
        removed = 0
        for name in self.fs.listdir(self.tmp):
            if is_queue_id(name) and queue_id_tag(name) == tag:
                self.fs.unlink(self.tmp / name, missing_ok=True)
                removed += 1
        return removed

    # -- acceptance ---------------------------------------------------------------------------

    def open_writer(self, envelope: Envelope, smtp_acceptance: bool = False) -> MessageWriter:
        """A new message. Its commit fsyncs the file, renames it into queue/ and fsyncs queue/;
        an ``smtp_acceptance`` where ``acceptance_directory_fsync`` is off renames it and
        fsyncs the file alone (mailrelay.spool.filesystems). Anything else (a bounce) keeps
        the portable way: a cut-short file in queue/ then always means damage."""
        one_fsync = smtp_acceptance and not self.acceptance_directory_fsync
        return MessageWriter(self, envelope, directory_fsync=not one_fsync)

    def has_journal(self, queue_id: str, area: str = QUEUE) -> bool:
        """Whether a message has a journal (blocking); True when that cannot be told."""
        try:
            return self.fs.exists(self.area(area) / (queue_id + JOURNAL_SUFFIX))
        except OSError:
            return True

    def new_queue_id(self) -> str:
        return new_queue_id(self._now(), self.id_tag)

    def write_durably(self, envelope: Envelope, data: bytes) -> None:
        """A whole message file (``encode_message``) into queue/, blocking, as durably as a
        message received over SMTP."""
        file = self.fs.create_exclusive(self.tmp / envelope.queue_id)  # closed by the callee
        _finish_durably(self, envelope, file, data)

    # -- reading ----------------------------------------------------------------------------------

    def ids(self, area: str) -> list[str]:
        """IDs of the messages in an area, oldest first (blocking)."""
        return sorted(name for name, _ in self.scan(area))

    def queued_ids(self) -> list[str]:
        return self.ids(QUEUE)

    def scan(self, area: str) -> list[tuple[str, float]]:
        """(ID, mtime) of every message in an area, in directory order (blocking).

        One scandir and one stat per message: for queue/, the mtime is the next attempt time.
        """
        found: list[tuple[str, float]] = []
        if not self.fs.is_dir(self.area(area)):
            return found  # a spool from before the area existed
        with self.fs.scandir(self.area(area)) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(JOURNAL_SUFFIX):
                    continue
                try:
                    found.append((name, entry.stat().st_mtime))
                except FileNotFoundError:
                    continue  # removed while we looked
        return found

    def count(self, area: str) -> int:
        """How many messages an area holds (blocking): one scandir, no stat per file."""
        if not self.fs.is_dir(self.area(area)):
            return 0
        with self.fs.scandir(self.area(area)) as entries:
            return sum(
                1
                for entry in entries
                if not entry.name.startswith(".") and not entry.name.endswith(JOURNAL_SUFFIX)
            )

    def area_of(self, queue_id: str) -> str | None:
        """Which area holds the message (blocking); None if none does."""
        if not is_queue_id(queue_id):
            return None
        for area in MESSAGE_AREAS:
            if self.fs.exists(self.area(area) / queue_id):
                return area
        return None

    def load(
        self, queue_id: str, area: str = QUEUE
    ) -> defer.Deferred[tuple[StoredMessage, list[Outcome]]]:
        return self._runner.run(self.load_now, queue_id, area)

    def load_now(self, queue_id: str, area: str = QUEUE) -> tuple[StoredMessage, list[Outcome]]:
        message = decode_message(self.fs.read_bytes(self.area(area) / queue_id))
        if message.envelope.queue_id != queue_id:
            raise CorruptSpoolFile("envelope names another queue ID")
        return message, self.journal_now(queue_id, area)

    def journal_now(self, queue_id: str, area: str = QUEUE) -> list[Outcome]:
        try:
            journal = read_journal(
                self.fs.read_bytes(self.area(area) / (queue_id + JOURNAL_SUFFIX))
            )
        except FileNotFoundError:
            return []
        if journal.damaged:
            self.log.error(
                "{queue_id} journal damaged: kept {count} record(s); a recipient whose outcome"
                " was lost may be sent again",
                queue_id=queue_id,
                count=len(journal.outcomes),
            )
        return journal.outcomes

    # -- journal ----------------------------------------------------------------------------------

    def append_journal(
        self, queue_id: str, outcomes: Sequence[Outcome], area: str = QUEUE
    ) -> defer.Deferred[None]:
        """Append records, fsynced (and the journal's name, when the append creates it)."""
        return self._runner.run(self.append_journal_now, queue_id, outcomes, area)

    def append_journal_now(
        self, queue_id: str, outcomes: Sequence[Outcome], area: str = QUEUE
    ) -> None:
        payload = b"".join(record(TAG_OUTCOME, o.to_json()) for o in outcomes)
        directory = self.area(area)
        path = directory / (queue_id + JOURNAL_SUFFIX)
        fs = self.fs
        fd = fs.open_append(path)
        try:
            size = fs.size(fd)
            existing = read_journal(fs.pread(fd, size, 0)) if size else None
            if existing is not None and existing.end < size:
                # A torn tail (crash mid-append) or other damage: cut it off first, or the
                # records appended now would sit behind it and never be read.
                fs.truncate(fd, existing.end)
                size = existing.end
            if size == 0:
                payload = JOURNAL_MAGIC + payload
            # The file's name is durable once its directory was fsynced after the first
            # append. A file without a whole record was created by an append that a crash
            # cut short (or, in an older spool, by a "sending" marker): its name may not be.
            name_durable = existing is not None and bool(existing.outcomes)
            fs.write(fd, payload)
            fs.fsync(fd)
        finally:
            fs.close(fd)
        if not name_durable:
            fs.fsync_directory(directory)

    # -- the attempt log ---------------------------------------------------------------------------

    def open_attempt_log(self) -> dict[str, float]:
        """At queue start, in the I/O thread (blocking): the attempts the last life left
        unended, as queue ID -> marker time, for the messages still in queue/ or hold/ (a held
        message may have been interrupted too); they are written to a fresh log, which stays
        open for ``mark_attempt``. Lock holder only."""
        try:
            markers = read_attempt_log(self.fs.read_bytes(self.attempts))
        except FileNotFoundError:
            markers = {}
        kept = {
            queue_id: when
            for queue_id, when in markers.items()
            if is_queue_id(queue_id)
            and (self.fs.exists(self.queue / queue_id) or self.fs.exists(self.hold / queue_id))
        }
        self.close_attempt_log()
        self._attempt_fd, self._attempt_log_size = self._fresh_attempt_log(kept)
        return kept

    def _fresh_attempt_log(self, markers: dict[str, float]) -> tuple[int, int]:
        """A new log holding ``markers``, renamed over the old one; its descriptor (open for
        appending) and size. No fsync: see the module docstring."""
        fs = self.fs
        temp = self.root / f".{ATTEMPTS}.new"
        fs.unlink(temp, missing_ok=True)  # left by a crash in an earlier try
        fd = fs.open_append(temp)
        try:
            data = ATTEMPTS_MAGIC + b"".join(attempt_record(q, t) for q, t in markers.items())
            self._write_all(fd, data, 0)
            fs.rename(temp, self.attempts)
        except BaseException:
            fs.close(fd)
            with contextlib.suppress(OSError):
                fs.unlink(temp, missing_ok=True)
            raise
        return fd, len(data)

    def _write_all(self, fd: int, data: bytes, size: int) -> None:
        """One write() of ``data`` at the end of a log of ``size`` bytes; a short write (a
        full disk) is cut off again, so no torn record sits before the next one."""
        written = self.fs.write(fd, data)
        if written != len(data):
            self.fs.truncate(fd, size)
            raise OSError(errno.ENOSPC, "short write to the attempt log")

    def mark_attempt(self, queue_id: str, when: float) -> None:
        """An attempt for ``queue_id`` starts at ``when``: one record appended with one
        write() (in the reactor thread; no fsync). Raises OSError if it cannot be written."""
        self._append_attempt_record(attempt_record(queue_id, when))

    def mark_attempt_done(self, queue_id: str) -> None:
        """The attempt for ``queue_id`` ended with its outcomes recorded: one write(), as
        ``mark_attempt``; its marker no longer counts."""
        self._append_attempt_record(attempt_done_record(queue_id))

    def _append_attempt_record(self, data: bytes) -> None:
        if self._attempt_fd is None:
            raise RuntimeError("the attempt log is not open (open_attempt_log)")
        self._write_all(self._attempt_fd, data, self._attempt_log_size)
        self._attempt_log_size += len(data)

    def attempt_log_full(self) -> bool:
        return self._attempt_log_size > self.attempt_log_limit

    def rotate_attempt_log(self, markers: dict[str, float]) -> None:
        """Replace the log by a fresh one holding only ``markers`` (the attempts running now,
        and the interrupted ones not yet acted on). Synchronous: rare, and small. If the
        fresh log cannot be written, the old one stays in use (and the error is raised)."""
        old = self._attempt_fd
        self._attempt_fd, self._attempt_log_size = self._fresh_attempt_log(markers)
        if old is not None:
            self.fs.close(old)

    def close_attempt_log(self) -> None:
        if self._attempt_fd is not None:
            fd, self._attempt_fd = self._attempt_fd, None
            with contextlib.suppress(OSError):
                self.fs.close(fd)

    # -- scheduling -------------------------------------------------------------------------------

    def set_next_attempt(self, queue_id: str, when: float) -> defer.Deferred[None]:
        return self._runner.run(self.set_next_attempt_now, queue_id, when)

    def set_next_attempt_now(self, queue_id: str, when: float) -> None:
        """Record the next attempt time in the message's mtime. Not fsynced: if a crash loses
        it, the message is only tried sooner than planned."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.utime(self.queue / queue_id, when)

    # -- leaving the queue ------------------------------------------------------------------------

    def remove(self, queue_id: str, area: str = QUEUE) -> defer.Deferred[None]:
        return self._runner.run(self.remove_now, queue_id, area)

    def remove_now(self, queue_id: str, area: str = QUEUE) -> None:
        self.unlink_now(queue_id, area)
        self.fs.fsync_directory(self.area(area))

    def unlink(self, queue_id: str, area: str = QUEUE) -> defer.Deferred[None]:
        return self._runner.run(self.unlink_now, queue_id, area)

    def unlink_now(self, queue_id: str, area: str = QUEUE) -> None:
        """Remove a message and its journal, not yet durably: until the directory is fsynced
        (``sync_area``), a power cut may bring them back."""
        # The message goes first: a journal left alone is cleaned up at the next start,
        # a message left without its journal would be sent again.
        directory = self.area(area)
        self.fs.unlink(directory / queue_id, missing_ok=True)
        self.fs.unlink(directory / (queue_id + JOURNAL_SUFFIX), missing_ok=True)

    def sync_area(self, area: str) -> defer.Deferred[None]:
        """Make every change to an area's directory so far durable (one fsync)."""
        return self._runner.run(self.fs.fsync_directory, self.area(area))

    def move_to_failed(self, queue_id: str) -> defer.Deferred[None]:
        return self.move(queue_id, QUEUE, FAILED)

    def move_to_corrupt(self, queue_id: str, source: str = QUEUE) -> defer.Deferred[None]:
        return self.move(queue_id, source, CORRUPT)

    def move(self, queue_id: str, source: str, target: str) -> defer.Deferred[None]:
        return self._runner.run(self.move_now, queue_id, source, target)

    def move_now(self, queue_id: str, source: str, target: str) -> None:
        """Move a message and its journal between areas.

        The message goes first: after a crash in between, the journal is left alone in the
        source area, and the next start moves it after its message (reconcile_journals).
        In queue/, the other order would leave a message without its journal: every
        recipient sent again.
        """
        fs = self.fs
        source_dir, target_dir = self.area(source), self.area(target)
        fs.rename(source_dir / queue_id, target_dir / queue_id)
        journal = source_dir / (queue_id + JOURNAL_SUFFIX)
        if fs.exists(journal):
            fs.rename(journal, target_dir / journal.name)
        fs.fsync_directory(target_dir)
        fs.fsync_directory(source_dir)

    def reconcile_journals(self) -> int:
        """Journals without their message beside them (a crash inside a move or a removal).

        Run at start, before anything is delivered. A journal follows its message to the area
        that holds it (it is the record of what was delivered, and why something failed);
        one whose message is gone is deleted.
        """
        handled = 0
        for area in MESSAGE_AREAS:
            directory = self.area(area)
            try:
                names = self.fs.listdir(directory)
            except FileNotFoundError:
                continue  # a spool from before the area existed
            for name in names:
                if not name.endswith(JOURNAL_SUFFIX):
                    continue
                queue_id = name[: -len(JOURNAL_SUFFIX)]
                if not self.fs.exists(directory / queue_id):
                    handled += self.reconcile_journal(queue_id)
        return handled

    def reconcile_journal(self, queue_id: str) -> int:
        """Put one message's stray journal back beside it (or delete it if the message is
        gone); the queue commands run this before acting on a message. Returns 0 or 1."""
        fs = self.fs
        home = next((a for a in MESSAGE_AREAS if fs.exists(self.area(a) / queue_id)), None)
        name = queue_id + JOURNAL_SUFFIX
        for area in MESSAGE_AREAS:
            stray = self.area(area) / name
            if area == home or not fs.exists(stray):
                continue
            if home is None:
                fs.unlink(stray, missing_ok=True)
                return 1
            kept = self.area(home) / name
            if fs.exists(kept):
                # Both exist: never overwrite a journal (it may be the only record of a
                # delivery); keep the stray's records first, the newer ones after (a torn
                # tail of the stray cut off, or it would hide them). The merged journal
                # replaces the kept one durably before the stray goes: after a power cut in
                # between, both are still there and are merged again.
                older = fs.read_bytes(stray)
                older = older[: read_journal(older).end] or JOURNAL_MAGIC
                self._replace_durably(kept, older + _records_after_magic(fs.read_bytes(kept)))
                fs.unlink(stray)
            else:
                fs.rename(stray, kept)
                fs.fsync_directory(self.area(home))
            # The stray's removal durable too, or a power cut brings it back (merged again:
            # its records twice, harmless, but avoidable).
            fs.fsync_directory(self.area(area))
            return 1
        return 0

    def _replace_durably(self, path: Path, data: bytes) -> None:
        """Replace a file's content so that a power cut leaves the old or the new content,
        never a mix or nothing: a hidden temporary file beside it (scan skips dot names),
        fsynced, renamed over it, the directory fsynced."""
        fs = self.fs
        temp = path.with_name(f".{path.name}.new")
        fs.unlink(temp, missing_ok=True)  # left by a crash in an earlier try
        file = fs.create_exclusive(temp)
        try:
            file.write(data)
            file.flush()
            fs.fsync(file.fileno())
        finally:
            file.close()
        fs.rename(temp, path)
        fs.fsync_directory(path.parent)


def _finish_durably(
    spool: Spool,
    envelope: Envelope,
    file: SpoolFile,
    data: bytes | bytearray,
    directory_fsync: bool = True,
) -> None:
    """Write the last bytes of a message to its open tmp file, make it durable in queue/; on
    any failure remove the copy (never fsync it again) and raise SpoolWriteError. The one
    durable path for every message that enters queue/.

    ``directory_fsync``: fsync the file, rename it into queue/, fsync queue/ (the portable
    way). Without it (Spool.acceptance_directory_fsync, for SMTP acceptances on a file system
    where that is enough, see mailrelay.spool.filesystems): rename first, then one fsync of
    the file, which makes its content and its new name durable together. A power cut before
    that fsync returns may then leave the file in queue/ short or empty: no 250 was given for
    it, and it fails its framing at the next start (TruncatedSpoolFile)."""
    fs = spool.fs
    tmp_path = spool.tmp / envelope.queue_id
    final_path = spool.queue / envelope.queue_id
    renamed = False
    try:
        try:
            file.write(data)
            file.flush()
            # The mtime is the next attempt time (see the module docstring): now, for a new
            # message. Set explicitly so it is the same clock the queue schedules with.
            fs.utime_fd(file.fileno(), envelope.received_at)
            if not directory_fsync:
                fs.rename(tmp_path, final_path)
                renamed = True
            fs.fsync(file.fileno())
        finally:
            file.close()
        if directory_fsync:
            fs.rename(tmp_path, final_path)
            renamed = True
            fs.fsync_directory(spool.queue)
    except OSError as e:
        # Never fsync again after a failure: drop this copy; the sender keeps its own.
        fs.unlink(final_path if renamed else tmp_path, missing_ok=True)
        raise SpoolWriteError(f"{e.strerror or e}") from e


class MessageWriter:
    """One message being received: framed records, made durable in tmp/ then queue/ by commit.

    A message smaller than ``SPILL_SIZE`` stays in memory until commit, and the whole file is
    then written, fsynced and renamed in the I/O thread: the reactor thread never waits on the
    file system for it (opening a file in a busy directory took ~1 ms, measured). A larger
    message spills to its tmp file as it arrives, so memory stays bounded.
    """

    def __init__(self, spool: Spool, envelope: Envelope, directory_fsync: bool = True) -> None:
        self._spool = spool
        self.envelope = envelope
        self._directory_fsync = directory_fsync
        self._tmp_path = spool.tmp / envelope.queue_id
        self._final_path = spool.queue / envelope.queue_id
        self._framed = bytearray(MESSAGE_MAGIC + record(TAG_ENVELOPE, envelope.to_json()))
        self._pending = bytearray()
        # The body as written, kept for the queue's first attempt (no read of the file then);
        # None once the message spills to its file (a large one is read back instead).
        self._body_parts: list[bytes] | None = []
        self._body_length = 0
        self._body_crc = 0
        self._error: OSError | None = None
        self._closed = False
        self._file: SpoolFile | None = None

    @property
    def body_length(self) -> int:
        return self._body_length

    def write(self, data: bytes) -> None:
        """Add body bytes. Write errors are remembered and reported by commit()."""
        self._body_length += len(data)
        self._body_crc = zlib.crc32(data, self._body_crc)
        self._pending += data
        if self._body_parts is not None:
            self._body_parts.append(data)
        if len(self._pending) >= BODY_RECORD_SIZE:
            self._frame_pending()
            if len(self._framed) >= SPILL_SIZE:
                self._spill()

    def _frame_pending(self) -> None:
        if self._pending:
            self._framed += record(TAG_BODY, bytes(self._pending))
            self._pending.clear()

    @property
    def body(self) -> bytes | None:
        """The body written, unless the message was large enough to spill to its file."""
        return None if self._body_parts is None else b"".join(self._body_parts)

    def _spill(self) -> None:
        """Move framed bytes from memory to the tmp file (large messages only)."""
        self._body_parts = None
        if self._error is not None:
            self._framed.clear()
            return
        try:
            if self._file is None:  # closed by commit or abort
                self._file = self._spool.fs.create_exclusive(self._tmp_path)
            self._file.write(self._framed)
        except OSError as e:
            self._error = e
        self._framed.clear()

    def commit(self) -> defer.Deferred[str]:
        """Make the message durable; fires with the queue ID, or fails with SpoolWriteError."""
        self._frame_pending()
        self._framed += end_record(self._body_length, self._body_crc)
        self._closed = True
        queue_id = self.envelope.queue_id
        committing = self._spool.committing
        committing.add(queue_id)

        def settled(result: object) -> object:
            committing.discard(queue_id)  # before any callback of the caller's runs
            return result

        d = self._spool._runner.run(self._make_durable)
        d.addBoth(settled)
        return d.addErrback(self._discard_after_failure)

    def _discard_after_failure(self, failure: Failure) -> Failure:
        # Whatever failed (even before _make_durable ran), this copy is never delivered.
        self._close_file()
        self._spool.fs.unlink(self._tmp_path, missing_ok=True)
        return failure

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()

    def _make_durable(self) -> str:
        """In the I/O thread: write what is left and make it durable in queue/ (_finish_durably)."""
        try:
            if self._error is not None:
                raise self._error
            if self._file is None:
                self._file = self._spool.fs.create_exclusive(self._tmp_path)  # closed below
        except OSError as e:
            self._close_file()
            self._spool.fs.unlink(self._tmp_path, missing_ok=True)
            raise SpoolWriteError(f"{e.strerror or e}") from e
        _finish_durably(self._spool, self.envelope, self._file, self._framed, self._directory_fsync)
        return self.envelope.queue_id

    def abort(self) -> None:
        """The session ended before the final dot: nothing of this message stays."""
        if self._closed:
            return
        self._closed = True
        self._framed.clear()
        self._close_file()
        self._spool.fs.unlink(self._tmp_path, missing_ok=True)
