"""The frames on an acceptor's pipe: cut right whatever the read boundaries; anything that is
not a frame (an unknown kind, an impossible length, a bad queued payload) is a FrameError."""

from __future__ import annotations

import struct

import attrs
import pytest

from mailrelay.acceptors.channel import (
    LOG_EVENT,
    MAX_FRAME,
    METRICS,
    QUEUED,
    QUEUED_ID,
    FrameError,
    FrameReader,
    decode_queued,
    decode_queued_id,
    frame,
    queued_frame,
)
from mailrelay.spool.format import Envelope

ENVELOPE = Envelope(
    queue_id="0000000000000100000001",  # (a queue ID: 22 upper-case hex digits)
    sender="app@example.test",
    recipients=("a@example.test", "b@example.test"),
    received_at=1234.5,
    client="127.0.0.1",
    helo="client.test",
    body_8bit=True,
)


def test_several_frames_in_one_chunk_come_out_in_order() -> None:
    stream = frame(LOG_EVENT, b'{"a":1}') + frame(METRICS, b"") + frame(QUEUED, b"x" * 300)
    reader = FrameReader()
    assert list(reader.feed(stream)) == [
        (LOG_EVENT, b'{"a":1}'),
        (METRICS, b""),
        (QUEUED, b"x" * 300),
    ]
    assert reader.pending == 0


def test_frames_fed_one_octet_at_a_time_come_out_whole() -> None:
    frames = [(METRICS, b"[]"), (LOG_EVENT, b"event " * 50), (QUEUED_ID, b"\x00" * 9)]
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    reader = FrameReader()
    out: list[tuple[bytes, bytes]] = []
    completed_at: list[int] = []
    for i in range(len(stream)):
        got = list(reader.feed(stream[i : i + 1]))
        if got:
            completed_at.append(i)
        out += got
    assert out == frames
    # Each frame comes out on its own last octet, not before.
    ends = []
    offset = 0
    for _, payload in frames:
        offset += 5 + len(payload)
        ends.append(offset - 1)
    assert completed_at == ends
    assert reader.pending == 0


def test_pending_counts_the_octets_of_a_cut_frame() -> None:
    data = frame(LOG_EVENT, b"0123456789")
    reader = FrameReader()
    assert list(reader.feed(frame(METRICS, b"[]") + data[:7])) == [(METRICS, b"[]")]
    assert reader.pending == 7  # the header and 2 octets of the payload: cut here
    assert list(reader.feed(data[7:])) == [(LOG_EVENT, b"0123456789")]
    assert reader.pending == 0


def test_a_cut_header_is_pending_too() -> None:
    reader = FrameReader()
    assert list(reader.feed(b"L\x00\x00")) == []
    assert reader.pending == 3


@pytest.mark.parametrize("kind", [b"X", b"q", b"\x00", b"{"])
def test_an_unknown_kind_is_a_broken_stream(kind: bytes) -> None:
    reader = FrameReader()
    with pytest.raises(FrameError, match="unknown frame kind"):
        list(reader.feed(kind + struct.pack(">I", 2) + b"{}"))


def test_an_unknown_kind_after_good_frames_yields_those_first() -> None:
    reader = FrameReader()
    got: list[tuple[bytes, bytes]] = []
    with pytest.raises(FrameError):
        for item in reader.feed(frame(METRICS, b"[]") + b"Z\x00\x00\x00\x00"):
            got.append(item)
    assert got == [(METRICS, b"[]")]


def test_a_length_over_max_frame_is_a_broken_stream_at_once() -> None:
    reader = FrameReader()
    # Only the header: the reader must not wait for (and buffer) 4 MiB more.
    with pytest.raises(FrameError, match="octets"):
        list(reader.feed(LOG_EVENT + struct.pack(">I", MAX_FRAME + 1)))


def test_a_length_of_exactly_max_frame_is_accepted() -> None:
    reader = FrameReader()
    payload = b"m" * MAX_FRAME
    assert list(reader.feed(frame(METRICS, payload))) == [(METRICS, payload)]


def test_queued_frame_round_trips() -> None:
    [(kind, payload)] = list(FrameReader().feed(queued_frame(ENVELOPE)))
    assert kind == QUEUED
    assert decode_queued(payload) == ENVELOPE


@pytest.mark.parametrize(
    "envelope_json",
    [
        b"not json",
        b"[1, 2]",
        b'{"queue_id": "x"}',  # fields missing
        b'{"queue_id":"x","sender":"s","recipients":[],"received_at":"nan","client":"c",'
        b'"helo":"h"}',
    ],
)
def test_a_bad_envelope_is_a_frame_error(envelope_json: bytes) -> None:
    with pytest.raises(FrameError, match="bad queued frame"):
        decode_queued(envelope_json)


def test_an_envelope_too_large_for_a_frame_travels_by_queue_id() -> None:
    """Tens of thousands of recipients (smtp.max_recipients has no cap): a frame over MAX_FRAME
    would read as a broken stream and get the acceptor killed (review)."""
    many = attrs.evolve(
        ENVELOPE, recipients=tuple(f"{'r' * 200}{i}@example.com" for i in range(6000))
    )
    data = queued_frame(many)
    assert len(data) < 64
    [(kind, payload)] = list(FrameReader().feed(data))
    assert kind == QUEUED_ID
    assert decode_queued_id(payload) == ENVELOPE.queue_id


@pytest.mark.parametrize("payload", [b"", b"../../etc/passwd", b"0661425e4a11f2c3d4e5f6"])
def test_a_bad_queue_id_is_a_frame_error(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_queued_id(payload)
