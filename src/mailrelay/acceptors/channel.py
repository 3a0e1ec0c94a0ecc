"""Frames on the pipe from an acceptor process to the relay process (its stdout).

A frame is one kind octet, a 4-octet big-endian payload length, then the payload:

    Q   a message the acceptor made durable in queue/: its envelope (JSON); the relay process
        reads the body from the spool at the first attempt (sending bodies down the pipe was
        measured: no gain for 4 KB messages, 17% fewer messages a second end to end for 50 KB
        ones, the relay process reading them 8 KiB a turn)
    I   the same, by queue ID alone, for an envelope too large for a frame (tens of thousands of
        recipients): the relay process reads it from the spool too
    L   a log event (see worker._forwarded)
    M   a metrics snapshot (see samples.py)

A pipe is reliable and ordered, so there is no acknowledgement: a message whose frame never
arrived (the acceptor died between its commit and the write) is found by the rescan of
queue/ that follows any acceptor's exit.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from mailrelay.spool.format import Envelope
from mailrelay.spool.store import is_queue_id

QUEUED = b"Q"
QUEUED_ID = b"I"
LOG_EVENT = b"L"
METRICS = b"M"
KINDS = frozenset((QUEUED, QUEUED_ID, LOG_EVENT, METRICS))

# Larger than any frame an acceptor writes (an envelope travels only up to MAX_ENVELOPE; a log
# event is cut at MAX_LOG_EVENT): a longer length is a broken stream.
MAX_FRAME = 4 * 1024 * 1024
MAX_LOG_EVENT = 256 * 1024
# An envelope larger than this travels by queue ID alone (I).
MAX_ENVELOPE = 1024 * 1024

_HEADER = struct.Struct(">cI")


class FrameError(Exception):
    """The stream is not frames (an unknown kind, an impossible length, a bad payload)."""


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def queued_frame(envelope: Envelope) -> bytes:
    envelope_json = envelope.to_json()
    if len(envelope_json) > MAX_ENVELOPE:
        return frame(QUEUED_ID, envelope.queue_id.encode("ascii"))
    return frame(QUEUED, envelope_json)


def decode_queued(payload: bytes) -> Envelope:
    try:
        return Envelope.from_json(payload)
    except Exception as e:  # a bad envelope is a broken stream, whatever the parser raised
        raise FrameError(f"bad queued frame: {e}") from None


def decode_queued_id(payload: bytes) -> str:
    queue_id = payload.decode("ascii", "replace")
    if not is_queue_id(queue_id):
        raise FrameError(f"bad queue ID {queue_id!r}")
    return queue_id


class FrameReader:
    """Cuts a byte stream into (kind, payload) frames, whatever the read boundaries."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._buffer += data
        buffer = self._buffer
        pos = 0
        try:
            while len(buffer) - pos >= _HEADER.size:
                kind, length = _HEADER.unpack_from(buffer, pos)
                if kind not in KINDS:
                    raise FrameError(f"unknown frame kind {kind!r}")
                if length > MAX_FRAME:
                    raise FrameError(f"frame of {length} octets (at most {MAX_FRAME})")
                end = pos + _HEADER.size + length
                if end > len(buffer):
                    break
                yield kind, bytes(buffer[pos + _HEADER.size : end])
                pos = end
        finally:
            del buffer[:pos]

    @property
    def pending(self) -> int:
        """Octets of a frame not complete yet (a stream that ends here was cut)."""
        return len(self._buffer)
