"""The on-disk format of a spooled message and of its per-recipient journal.

A message file is a magic line followed by framed records::

    MAILRELAY-SPOOL 1\\n
    record*                      E (envelope, JSON), then B (body chunk) ..., then Z (end)
    record = tag:1 | length:u32be | payload:length | crc32(tag|length|payload):u32be

The Z record carries the body's total length and CRC, so a file cut short anywhere, or a
flipped byte anywhere, is detected instead of being half-sent (like Postfix's END record).

A journal file (``<id>.journal`` beside the message) is the same magic line with "JOURNAL" and
then R records, one per recipient outcome, appended and fsynced before the outcome is acted on.
A torn last record (a crash mid-append) is ignored: it was never made durable, so nothing
acted on it.

The attempt log (``<spool>/attempts``, shared by every message) is a magic line with
"ATTEMPTS" and then S records, one per delivery attempt started (the marker time, a
big-endian double, then the queue ID in ASCII), and D records, one per attempt that ended
normally (the queue ID). It is appended without fsync; a torn tail is ignored (the valid prefix
is kept). An S record with no D record after it is an attempt that was interrupted.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator
from enum import Enum
from typing import Any

import attrs

MESSAGE_MAGIC = b"MAILRELAY-SPOOL 1\n"
JOURNAL_MAGIC = b"MAILRELAY-JOURNAL 1\n"
ATTEMPTS_MAGIC = b"MAILRELAY-ATTEMPTS 1\n"

TAG_ENVELOPE = b"E"
TAG_BODY = b"B"
TAG_END = b"Z"
TAG_OUTCOME = b"R"
TAG_ATTEMPT = b"S"
TAG_ATTEMPT_DONE = b"D"

_HEADER = struct.Struct(">cI")
_CRC = struct.Struct(">I")
_MARKER_TIME = struct.Struct(">d")
MAX_RECORD = 64 * 1024 * 1024


class CorruptSpoolFile(Exception):
    """A spool file failed its framing or checksum; it must never be delivered as it is."""


class TruncatedSpoolFile(CorruptSpoolFile):
    """A spool file whose valid records stop before its end: empty, or cut in a record or
    before the end record. A power cut leaves such a message file in queue/ when it hits an
    acceptance between the rename and the fsync (spool.directory_fsync = "auto"): no 250 was
    given for it."""


class Status(Enum):
    """A journal record's meaning. A recipient's state is its last record."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # a temporary failure; retried later
    FAILED = "failed"  # a permanent failure; not retried unless an operator requeues it
    # An operator requeued a dead letter: the recipient is pending again, with a fresh
    # attempt count and lifetime from this record's time.
    REQUEUED = "requeued"

    @property
    def is_final(self) -> bool:
        return self in (Status.DELIVERED, Status.FAILED)


@attrs.frozen
class Envelope:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    client: str
    helo: str
    body_8bit: bool = False

    def to_json(self) -> bytes:
        # Spelled out: attrs.asdict took ~10x as long (twice a message with acceptors).
        fields = {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "received_at": self.received_at,
            "client": self.client,
            "helo": self.helo,
            "body_8bit": self.body_8bit,
        }
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        try:
            raw = json.loads(data)
            received_at = float(raw["received_at"])
            if not math.isfinite(received_at):
                raise ValueError("received_at is not a finite number")
            return cls(
                queue_id=str(raw["queue_id"]),
                sender=str(raw["sender"]),
                recipients=tuple(str(r) for r in raw["recipients"]),
                received_at=received_at,
                client=str(raw["client"]),
                helo=str(raw["helo"]),
                body_8bit=bool(raw.get("body_8bit", False)),
            )
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CorruptSpoolFile(f"bad envelope record: {e}") from None


@attrs.frozen
class Outcome:
    """What happened to one recipient on one attempt, as the journal records it."""

    recipient: str
    status: Status
    reply: str  # the upstream's reply (or our reason), secrets never included
    provider: str | None
    at: float
    uncertain: bool = False  # the connection was lost after the final dot: maybe delivered

    def to_json(self) -> bytes:
        data: dict[str, Any] = attrs.asdict(self)
        data["status"] = self.status.value
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Outcome:
        try:
            raw = json.loads(data)
            return cls(
                recipient=str(raw["recipient"]),
                status=Status(raw["status"]),
                reply=str(raw["reply"]),
                provider=None if raw.get("provider") is None else str(raw["provider"]),
                at=float(raw["at"]),
                uncertain=bool(raw.get("uncertain", False)),
            )
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CorruptSpoolFile(f"bad journal record: {e}") from None


def last_outcomes(journal: list[Outcome]) -> dict[str, Outcome]:
    """Each recipient's state: the last journal record about it."""
    return {o.recipient: o for o in journal}


def record(tag: bytes, payload: bytes) -> bytes:
    header = _HEADER.pack(tag, len(payload))
    return header + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(header)))


def end_record(body_length: int, body_crc: int) -> bytes:
    return record(TAG_END, struct.pack(">QI", body_length, body_crc))


def encode_message(envelope: Envelope, body: bytes, chunk_size: int = 256 * 1024) -> bytes:
    """A whole message file at once (the inbound path streams the same records instead)."""
    parts = [MESSAGE_MAGIC, record(TAG_ENVELOPE, envelope.to_json())]
    for start in range(0, len(body), chunk_size):
        parts.append(record(TAG_BODY, body[start : start + chunk_size]))
    parts.append(end_record(len(body), zlib.crc32(body)))
    return b"".join(parts)


def iter_records(data: bytes, magic: bytes) -> Iterator[tuple[bytes, bytes, int]]:
    """Yield (tag, payload, end offset) for each whole record; raise on any damage."""
    for tag, payload, end in iter_record_views(data, magic):
        yield tag, bytes(payload), end


def iter_record_views(data: bytes, magic: bytes) -> Iterator[tuple[bytes, memoryview, int]]:
    """iter_records, each payload a view into ``data`` (no copy)."""
    if not data.startswith(magic):
        if magic.startswith(data):
            raise TruncatedSpoolFile("empty file" if not data else "truncated magic line")
        raise CorruptSpoolFile("bad magic line")
    offset = len(magic)
    view = memoryview(data)
    while offset < len(data):
        if len(data) - offset < _HEADER.size + _CRC.size:
            raise TruncatedSpoolFile(f"truncated record header at offset {offset}")
        tag, length = _HEADER.unpack_from(data, offset)
        if length > MAX_RECORD:
            raise CorruptSpoolFile(f"record too long at offset {offset}")
        start = offset + _HEADER.size
        end = start + length
        if end + _CRC.size > len(data):
            raise TruncatedSpoolFile(f"truncated record at offset {offset}")
        (crc,) = _CRC.unpack_from(data, end)
        if crc != zlib.crc32(view[start:end], zlib.crc32(view[offset:start])):
            raise CorruptSpoolFile(f"checksum mismatch at offset {offset}")
        offset = end + _CRC.size
        yield tag, view[start:end], offset


@attrs.frozen
class StoredMessage:
    envelope: Envelope
    body: bytes  # the message as received (headers and body, CRLF lines, dots unstuffed)


def decode_message(data: bytes) -> StoredMessage:
    # Body records are joined from views into ``data``: the body is copied once, and a large
    # message needs twice its size while it is read, not three times.
    envelope: Envelope | None = None
    chunks: list[memoryview] = []
    for tag, payload, end in iter_record_views(data, MESSAGE_MAGIC):
        if tag == TAG_ENVELOPE and envelope is None and not chunks:
            envelope = Envelope.from_json(bytes(payload))
        elif tag == TAG_BODY and envelope is not None:
            chunks.append(payload)
        elif tag == TAG_END and envelope is not None:
            if end != len(data):
                raise CorruptSpoolFile("data after the end record")
            body = b"".join(chunks)
            chunks.clear()  # (views pin ``data``)
            length, crc = struct.unpack(">QI", payload)
            if length != len(body) or crc != zlib.crc32(body):
                raise CorruptSpoolFile("body length or checksum does not match the end record")
            return StoredMessage(envelope=envelope, body=body)
        else:
            raise CorruptSpoolFile(f"unexpected record {tag!r}")
    raise TruncatedSpoolFile("no end record (truncated)")


def decode_envelope(data: bytes) -> Envelope:
    """Read just the envelope (the first record) from the start of a message file."""
    for tag, payload, _end in iter_records(data, MESSAGE_MAGIC):
        if tag != TAG_ENVELOPE:
            break
        return Envelope.from_json(payload)
    raise CorruptSpoolFile("no envelope record")


@attrs.frozen
class JournalRead:
    outcomes: list[Outcome]  # every whole, valid record, in order
    end: int  # where the next record belongs (after the last valid one)
    damaged: bool  # something other than a torn tail was cut off


def read_journal(data: bytes) -> JournalRead:
    """Read a journal, keeping its valid prefix whatever follows it.

    A torn tail (a crash mid-append) is expected and silent. Any other damage (a zero-filled
    tail after power loss, a flipped bit) is reported as ``damaged``; the records before it
    still count. A bad journal never makes its message undeliverable: at worst a recipient
    whose outcome was lost is tried again (a possible duplicate).
    """
    if JOURNAL_MAGIC.startswith(data):
        return JournalRead([], 0, False)  # empty, or the first append was torn in the magic
    if not data.startswith(JOURNAL_MAGIC):
        return JournalRead([], 0, True)
    outcomes: list[Outcome] = []
    end = len(JOURNAL_MAGIC)
    try:
        for tag, payload, record_end in iter_records(data, JOURNAL_MAGIC):
            if tag != TAG_OUTCOME:
                raise CorruptSpoolFile(f"unexpected journal record {tag!r}")
            try:
                outcomes.append(Outcome.from_json(payload))
            except CorruptSpoolFile:
                if not _is_legacy_marker(payload):
                    raise
            end = record_end
    except CorruptSpoolFile as e:
        # A torn tail is the end of the file: no whole record can follow it. A flipped bit
        # in a length field also reads as "truncated", but whole records still follow.
        torn = "truncated" in str(e) and not _whole_record_after(data, end)
        return JournalRead(outcomes, end, damaged=not torn)
    return JournalRead(outcomes, end, False)


def _is_legacy_marker(payload: bytes) -> bool:
    """A "sending" record, written before each attempt by earlier versions (the attempt log
    replaced them): skipped, so an upgraded spool's journals are read whole."""
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("status") == "sending"


def _whole_record_after(data: bytes, start: int) -> bool:
    """Is there a checksum-valid outcome record anywhere after ``start``? (Journals are
    small, and this runs only on a damaged one.)"""
    view = memoryview(data)
    last = len(data) - _HEADER.size - _CRC.size
    for offset in range(start + 1, last + 1):
        tag, length = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if tag != TAG_OUTCOME or end + _CRC.size > len(data):
            continue
        (crc,) = _CRC.unpack_from(data, end)
        body_start = offset + _HEADER.size
        if crc == zlib.crc32(view[body_start:end], zlib.crc32(view[offset:body_start])):
            return True
    return False


def decode_journal(data: bytes) -> list[Outcome]:
    return read_journal(data).outcomes


def journal_end(data: bytes) -> int:
    """Where the next record belongs: anything after the last valid record is cut off."""
    return read_journal(data).end


def attempt_record(queue_id: str, when: float) -> bytes:
    """One attempt-log record: an attempt for ``queue_id`` started at ``when``."""
    return record(TAG_ATTEMPT, _MARKER_TIME.pack(when) + queue_id.encode("ascii"))


def attempt_done_record(queue_id: str) -> bytes:
    """One attempt-log record: the attempt for ``queue_id`` ended, its outcomes recorded."""
    return record(TAG_ATTEMPT_DONE, queue_id.encode("ascii"))


def read_attempt_log(data: bytes) -> dict[str, float]:
    """The attempts that never ended: queue ID -> the time its last one started. From the
    valid prefix of an attempt log: a torn tail (a crash mid-write), or any other damage,
    ends the log where it starts."""
    markers: dict[str, float] = {}
    if not data.startswith(ATTEMPTS_MAGIC):
        return markers  # empty, torn in the magic, or not an attempt log
    try:
        for tag, payload, _end in iter_records(data, ATTEMPTS_MAGIC):
            if tag == TAG_ATTEMPT_DONE:
                markers.pop(payload.decode("ascii"), None)
                continue
            if tag != TAG_ATTEMPT or len(payload) <= _MARKER_TIME.size:
                break
            (when,) = _MARKER_TIME.unpack_from(payload)
            if not math.isfinite(when):
                break
            markers[payload[_MARKER_TIME.size :].decode("ascii")] = when
    except (CorruptSpoolFile, UnicodeDecodeError):
        pass
    return markers
