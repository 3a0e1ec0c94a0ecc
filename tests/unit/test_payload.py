"""The DATA payload: CRLF only, every '.'-line stuffed, one terminator (pitfalls 15, 16)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from mailrelay.outbound.payload import (
    ONE_WRITE_LIMIT,
    PIECE,
    build_data_payload,
    data_payload_pieces,
    normalize_line_endings,
    send_data_payload,
    stuff_dots,
    unstuff,
)

BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def lines_of(payload: bytes) -> list[bytes]:
    assert payload.endswith(b"\r\n")
    return payload[:-2].split(b"\r\n")


def assert_well_formed(payload: bytes) -> None:
    """No bare CR/LF, ends with the terminator, and no line before it is a lone '.'."""
    assert BARE_CR_OR_LF.search(payload) is None, payload
    assert payload.endswith(b".\r\n")
    lines = lines_of(payload)
    assert lines[-1] == b"."
    for line in lines[:-1]:
        # A stuffed line starts with '..'; a lone '.' (or '.' + anything unstuffed) would
        # end DATA early at the server or lose a dot.
        assert not line.startswith(b".") or line.startswith(b".."), line


def _line_at(offset: int) -> bytes:
    """A body whose line starting with '.' begins exactly at byte ``offset``."""
    filler_line = b"x" * 98 + b"\r\n"  # 100 bytes per line
    body = filler_line * (offset // 100)
    rest = offset - len(body)
    if rest:
        assert rest >= 2
        body += b"y" * (rest - 2) + b"\r\n"
    assert len(body) == offset
    return body + b".smuggled\r\nMAIL FROM:<evil@example.test>\r\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b".first\r\nsecond\r\n", b"..first\r\nsecond\r\n.\r\n", id="dot-first-line"),
        pytest.param(b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n", id="lone-dot-line"),
        pytest.param(b".\r\n", b"..\r\n.\r\n", id="only-a-dot"),
        pytest.param(b"a\r\n..\r\n...x\r\n", b"a\r\n...\r\n....x\r\n.\r\n", id="dot-dot-lines"),
        pytest.param(b"a\r\nno final eol", b"a\r\nno final eol\r\n.\r\n", id="no-final-crlf"),
        pytest.param(b"a\r\n.", b"a\r\n..\r\n.\r\n", id="dot-without-final-crlf"),
        pytest.param(b"", b".\r\n", id="empty-body"),
        pytest.param(b"a\nb\n", b"a\r\nb\r\n.\r\n", id="bare-lf"),
        pytest.param(b"a\rb\r", b"a\r\nb\r\n.\r\n", id="bare-cr"),
        pytest.param(b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n", id="lf-dot-lf-smuggling"),
        pytest.param(b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n.\r\n", id="cr-dot-cr-smuggling"),
        pytest.param(b"a\r\n.\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n", id="crlf-dot-lf"),
        pytest.param(b"a\n\r.\r\n", b"a\r\n\r\n..\r\n.\r\n", id="lf-then-cr"),
        pytest.param(b"mid.dot\r\n", b"mid.dot\r\n.\r\n", id="inner-dot-untouched"),
    ],
)
def test_build_data_payload_stuffs_and_normalises(body: bytes, expected: bytes) -> None:
    """Exact bytes on the wire for the interesting shapes of a body."""
    payload = build_data_payload(body)
    assert payload == expected
    assert_well_formed(payload)


@pytest.mark.parametrize("offset", [16384, 32768, 65536])
def test_dot_line_at_a_16k_boundary_is_stuffed(offset: int) -> None:
    """Twisted's chunked stuffing missed a '.' line starting exactly on a 16 KiB boundary."""
    body = _line_at(offset)
    payload = build_data_payload(body)
    assert payload[offset : offset + 11] == b"..smuggled\r"
    assert payload.count(b"\r\n.\r\n") == 1
    assert unstuff(payload[:-3]) == body
    assert_well_formed(payload)


def test_lone_dot_line_at_a_16k_boundary_does_not_end_data_early() -> None:
    body = _line_at(16384).replace(b".smuggled", b".")
    payload = build_data_payload(body)
    assert payload.index(b"\r\n.\r\n") == len(payload) - 5
    assert unstuff(payload[:-3]) == body


def test_clean_body_is_returned_unchanged_by_normalisation() -> None:
    body = b"a\r\nb\r\n"
    assert normalize_line_endings(body) is body


# -- properties --------------------------------------------------------------------------------

_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_dotty_line = st.one_of(
    _line,
    _line.map(lambda b: b"." + b),
    st.sampled_from([b".", b"..", b"...", b". ", b""]),
)


@given(st.lists(_dotty_line, max_size=30))
def test_property_crlf_body_round_trips(lines: list[bytes]) -> None:
    """For CRLF bodies, un-stuffing the payload gives the body back, byte for byte."""
    body = b"".join(line + b"\r\n" for line in lines)
    payload = build_data_payload(body)
    assert unstuff(payload[:-3]) == body
    # The only end-of-data marker is the terminator: at the very end, nowhere earlier.
    assert payload.find(b"\r\n.\r\n") in (-1, len(payload) - 5)
    assert not payload.startswith(b".\r\n") or payload == b".\r\n"
    assert_well_formed(payload)


@given(st.binary(max_size=300))
def test_property_any_bytes_never_leave_a_bare_cr_or_lf(body: bytes) -> None:
    """Arbitrary bytes (bare CR, bare LF, dots anywhere) still give a well-formed payload."""
    payload = build_data_payload(body)
    assert_well_formed(payload)
    normalised = normalize_line_endings(body)
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert unstuff(payload[:-3]) == normalised
    assert payload.find(b"\r\n.\r\n") in (-1, len(payload) - 5)


@given(st.binary(max_size=200))
def test_property_normalisation_leaves_only_crlf(body: bytes) -> None:
    out = normalize_line_endings(body)
    assert BARE_CR_OR_LF.search(out) is None
    assert out.replace(b"\r\n", b"") == body.replace(b"\r\n", b"").replace(b"\r", b"").replace(
        b"\n", b""
    )


# -- a large body, in pieces as the connection takes them -------------------------------------


@given(
    st.lists(
        st.sampled_from([b".", b"..x", b"x", b"", b"y" * 40, b".\r", b"z" * 300]), max_size=80
    ).map(lambda lines: b"\r\n".join(lines)),
    st.integers(min_value=1, max_value=200),
)
def test_pieces_make_the_same_payload_wherever_they_are_cut(body: bytes, piece: int) -> None:
    pieces = list(data_payload_pieces(body, piece=piece))
    assert b"".join(pieces) == build_data_payload(body)
    assert_well_formed(b"".join(pieces))
    assert pieces[-1] == b".\r\n"
    for i in range(1, len(pieces)):
        # Every piece starts at a line start (but the CRLF added to a body without one).
        assert b"".join(pieces[:i]).endswith(b"\r\n") or pieces[i] == b"\r\n"


@pytest.mark.parametrize("offset", [PIECE - 100, PIECE, PIECE + 2, 2 * PIECE])
def test_a_dot_line_at_a_piece_boundary_is_stuffed(offset: int) -> None:
    body = _line_at(offset) + b"z" * 200 + b"\r\n"
    payload = b"".join(data_payload_pieces(body))
    assert payload == build_data_payload(body)
    assert b"\r\n..smuggled\r\n" in payload and b"\r\n.smuggled" not in payload


def test_a_large_body_is_written_by_a_producer_a_piece_at_a_time() -> None:
    body = (b"a" * 98 + b"\r\n" + b".b" * 49 + b"\r\n") * (ONE_WRITE_LIMIT // 100)
    transport = StringTransport()
    sent: list[bool] = []
    producer = send_data_payload(transport, body, lambda: sent.append(True))
    assert producer is not None and transport.producer is producer and not transport.streaming
    assert transport.value() == b""  # nothing yet: the transport asks for each piece
    writes = 0
    while transport.producer is not None:
        assert sent == []  # the final dot is not out yet
        before = len(transport.value())
        producer.resumeProducing()
        assert len(transport.value()) - before <= PIECE * 2  # stuffed dots at most double
        writes += 1
    # Unregistered with the last piece written, not one round later.
    assert sent == [True] and producer.finished
    assert transport.value() == build_data_payload(body)
    assert writes > len(body) // PIECE


def test_a_small_body_is_one_write() -> None:
    transport = StringTransport()
    sent: list[bool] = []
    assert (
        send_data_payload(transport, b"Subject: x\r\n\r\n.hi\r\n", lambda: sent.append(True))
        is None
    )
    assert transport.producer is None and sent == [True]
    assert transport.value() == b"Subject: x\r\n\r\n..hi\r\n.\r\n"


def test_a_lost_connection_stops_the_pieces() -> None:
    transport = StringTransport()
    sent: list[bool] = []
    body = (b"x" * 98 + b"\r\n") * (ONE_WRITE_LIMIT // 50)
    producer = send_data_payload(transport, body, lambda: sent.append(True))
    assert producer is not None
    producer.resumeProducing()
    producer.stopProducing()
    written = transport.value()
    producer.resumeProducing()
    assert transport.value() == written and sent == []


def test_cancel_writes_nothing_more_and_unregisters() -> None:
    transport = StringTransport()
    body = (b"x" * 98 + b"\r\n") * (ONE_WRITE_LIMIT // 50)
    producer = send_data_payload(transport, body, lambda: None)
    assert producer is not None
    producer.resumeProducing()
    producer.cancel()
    written = transport.value()
    assert transport.producer is None and producer.finished
    producer.resumeProducing()
    assert transport.value() == written and not written.endswith(b"\r\n.\r\n")


@given(st.lists(st.sampled_from([b".", b"..", b"\n", b"\r\n", b"x", b"\r", b" ."]), max_size=40))
def test_property_stuff_dots_is_the_multiline_substitution(parts: list[bytes]) -> None:
    """stuff_dots replaced a MULTILINE regex substitution: the same output for any input."""
    lines = b"".join(parts)
    assert stuff_dots(lines) == re.sub(rb"^\.", b"..", lines, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("lines", "stuffed"),
    [
        (b"", b""),
        (b".", b".."),
        (b".\r\n.\r\n", b"..\r\n..\r\n"),
        (b"a.\r\n.b\r\n", b"a.\r\n..b\r\n"),
        (b"no dots\r\n", b"no dots\r\n"),
    ],
)
def test_stuff_dots(lines: bytes, stuffed: bytes) -> None:
    assert stuff_dots(lines) == stuffed
