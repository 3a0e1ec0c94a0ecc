"""The DATA path (``RelayESMTP._process_data``) against a line-by-line reference.

The protocol finds the end of the message with one search and checks, unstuffs and writes the
lines before it as blocks. ``reference`` reads the same bytes the way RFC 5321 describes them,
one CRLF line at a time; for any input, split into any chunks, both must store the same bytes
or refuse the message the same way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailrelay.inbound.delivery import IRelayDelivery, RelayDelivery, Transaction
from mailrelay.inbound.protocol import RelayESMTP
from mailrelay.metrics import Metrics

from .helpers_inbound import LOCAL_V4, open_session, smtp_config

LINE_MAX = 998  # octets before the CRLF; one more after a stuffing dot
BIG = 10**9


# -- the reference: one line at a time -------------------------------------------------------------


@attrs.frozen
class Outcome:
    """What DATA did with a stream: ``stored``/``refused 550``/``refused 552`` at the dot,
    ``closed`` (a line too long), or ``open`` (no end yet); the unstuffed text of the complete
    lines read (all of the message when it ended)."""

    result: str
    text: bytes = b""
    bad: bool = False


def reference(stream: bytes, max_size: int) -> Outcome:
    pos = 0
    text = bytearray()
    bad = False
    while True:
        eol = stream.find(b"\r\n", pos)
        if eol < 0:
            partial = stream[pos:]
            # The partial line may still get its CR: one octet more.
            if len(partial) > LINE_MAX + (partial[:1] == b".") + 1:
                return Outcome("closed")
            return Outcome("open", bytes(text), bad or len(text) > max_size)
        line = stream[pos:eol]
        pos = eol + 2
        if len(line) > LINE_MAX + (line[:1] == b"."):
            return Outcome("closed")
        if line == b".":
            break
        if line[:1] == b".":
            line = line[1:]
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            bad = True
        text += line + b"\r\n"
    if len(text) > max_size:
        return Outcome("refused 552")
    if bad:
        return Outcome("refused 550")
    return Outcome("stored", bytes(text))


# -- the protocol with a delivery that records what it is given ------------------------------------


class RecordedMessage:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.state = "open"

    def write(self, data: bytes) -> None:
        assert self.state == "open"
        self.writes.append(data)

    def commit(self) -> defer.Deferred[str]:
        self.state = "committed"
        return defer.succeed("Q1")

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"


class RecordingDelivery:
    def __init__(self) -> None:
        self.messages: list[RecordedMessage] = []

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Callable[[], RecordedMessage]:
        return RecordedMessage

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b""

    def openMessage(self, transaction: Transaction) -> RecordedMessage:
        self.messages.append(RecordedMessage())
        return self.messages[-1]


def open_data(max_size: int) -> tuple[RelayESMTP, StringTransport, RecordingDelivery]:
    delivery = RecordingDelivery()
    # Duck-typed: only what the protocol calls of IRelayDelivery and IIncomingMessage.
    relay_delivery = cast(IRelayDelivery, delivery)
    proto = RelayESMTP(smtp_config(max_message_size=max_size), Clock(), relay_delivery, Metrics())
    transport = StringTransport(peerAddress=LOCAL_V4)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    assert transport.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    transport.clear()
    return proto, transport, delivery


def replies(transport: StringTransport) -> list[bytes]:
    return bytes(transport.value()).split(b"\r\n")[:-1]


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(c for c in cuts if 0 < c < len(stream))})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False)]


# -- inputs ----------------------------------------------------------------------------------------

PIECES = st.one_of(
    st.sampled_from(
        [b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"\x00", b".", b"..", b"a", b"Subject: x"]
    ),
    st.sampled_from([b"a\rb", b"a\nb", b"a\x00b", b"\r\n\x00", b"\x00\r\n"]),
    st.sampled_from([b"\r\n.\r\n", b"\r\n.", b".\r\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]),
    st.integers(0, 1001).map(lambda n: b"x" * n),
    st.integers(995, 1000).map(lambda n: b"\r\n." + b"y" * n),
)
STREAMS = st.tuples(
    st.lists(PIECES, max_size=30).map(b"".join),
    st.sampled_from([b"", b"\r\n.\r\n", b".\r\n", b"\r\n.\r\nNOOP\r\n"]),
).map(b"".join)
MAX_SIZES = st.sampled_from([BIG, BIG, 0, 20, 1000, 3000])


def _cuts(stream: bytes) -> st.SearchStrategy[list[int]]:
    return st.one_of(
        st.lists(st.integers(0, len(stream)), max_size=12),
        st.just(list(range(len(stream)))),  # one octet at a time
    )


@settings(max_examples=600, deadline=None)
@given(stream=STREAMS, max_size=MAX_SIZES, data=st.data())
def test_block_path_agrees_with_the_line_by_line_reference(
    stream: bytes, max_size: int, data: st.DataObject
) -> None:
    chunks = split_at(stream, data.draw(_cuts(stream)))
    expected = reference(stream, max_size)
    proto, transport, delivery = open_data(max_size)
    for chunk in chunks:
        proto.dataReceived(chunk)
        # Never more than one chunk and one line held.
        assert len(proto._buffer) <= len(chunk) + LINE_MAX + 2
    [message] = delivery.messages
    written = b"".join(message.writes)
    got = replies(transport)
    if expected.result == "closed":
        assert got == [b"500 5.5.2 Line too long, closing connection"]
        assert transport.disconnecting
        assert message.state == "aborted"
    elif expected.result == "open":
        assert got == []
        assert message.state == "open"
        if expected.bad:  # the protocol stopped writing at the first refused block
            assert expected.text.startswith(written)
        else:
            assert written == expected.text
    elif expected.result == "stored":
        assert got[0] == b"250 2.0.0 Ok: queued as Q1"
        assert message.state == "committed"
        assert written == expected.text
    else:
        code = expected.result.split()[1].encode()
        assert got[0].startswith(code + b" "), got
        assert message.state == "aborted"
    assert len(delivery.messages) == 1  # nothing after the dot ever became a message


@settings(max_examples=150, deadline=None)
@given(stream=STREAMS, data=st.data())
def test_block_path_stores_the_reference_text_in_the_spool(
    stream: bytes, data: st.DataObject
) -> None:
    """Through the real delivery, header completer and spool: the stored body is our Received
    header and then exactly the reference's text (Date and Message-ID are present already)."""
    stream = b"Date: x\r\nMessage-ID: <m@x>\r\n" + stream
    chunks = split_at(stream, data.draw(_cuts(stream)))
    expected = reference(stream, BIG)
    with tempfile.TemporaryDirectory() as tmp:
        s = open_session(Path(tmp))
        s.replies()
        s.start_data()
        delivery = s.proto._delivery
        assert isinstance(delivery, RelayDelivery)
        for chunk in chunks:
            s.send(chunk)
        got = s.replies()
        if expected.result == "stored":
            assert got[0].startswith("250 2.0.0 Ok: queued as ")
            [stored] = s.stored()
            assert stored.body == delivery._received_header + expected.text
            # What the queue's first attempt is handed instead of reading the file.
            assert s.factory.bodies == [stored.body]
        else:
            assert s.queue_files() == []
            if expected.result == "refused 550":
                assert got[0].startswith("550 5.5.2 ")
            elif expected.result == "closed":
                assert got == ["500 5.5.2 Line too long, closing connection"]
                assert s.tmp_files() == []


# -- cases worth naming ----------------------------------------------------------------------------


def test_lines_starting_with_a_dot_are_unstuffed_anywhere_in_a_block() -> None:
    proto, transport, delivery = open_data(BIG)
    proto.dataReceived(b"..first\r\nplain\r\n..\r\n...x\r\n.y\r\n\r\n.\r\n")
    assert replies(transport) == [b"250 2.0.0 Ok: queued as Q1"]
    assert b"".join(delivery.messages[0].writes) == b".first\r\nplain\r\n.\r\n..x\r\ny\r\n\r\n"


@pytest.mark.parametrize("bad", [b"\r", b"\n", b"\x00", b"\r\r\n", b"\n\n"], ids=repr)
@pytest.mark.parametrize("where", [0, 40, 80])
def test_one_bad_octet_anywhere_in_a_block_refuses_the_message(bad: bytes, where: int) -> None:
    proto, transport, delivery = open_data(BIG)
    body = b"".join(b"line %02d of a message\r\n" % n for n in range(5))
    proto.dataReceived(body[:where] + bad + body[where:] + b".\r\nNOOP\r\n")
    assert replies(transport) == [
        b"550 5.5.2 Bare CR or LF, or NUL, in message text (RFC 5321 2.3.8)",
        b"250 2.0.0 OK",
    ]
    assert delivery.messages[0].state == "aborted"


def test_a_999_octet_stuffed_line_inside_a_block_is_allowed_and_1000_is_not() -> None:
    proto, transport, delivery = open_data(BIG)
    proto.dataReceived(b"a\r\n." + b"y" * 998 + b"\r\nb\r\n.\r\n")
    assert replies(transport) == [b"250 2.0.0 Ok: queued as Q1"]
    assert b"".join(delivery.messages[0].writes) == b"a\r\n" + b"y" * 998 + b"\r\nb\r\n"
    proto, transport, delivery = open_data(BIG)
    proto.dataReceived(b"a\r\n" + b"y" * 999 + b"\r\nb\r\n.\r\n")
    assert replies(transport) == [b"500 5.5.2 Line too long, closing connection"]
    assert delivery.messages[0].state == "aborted"


def test_the_end_marker_split_across_chunks_is_found() -> None:
    for cut in range(1, 5):
        proto, transport, delivery = open_data(BIG)
        stream = b"hello\r\n.\r\nNOOP\r\n"
        proto.dataReceived(stream[: 5 + cut])
        assert replies(transport) == []
        proto.dataReceived(stream[5 + cut :])
        assert replies(transport) == [b"250 2.0.0 Ok: queued as Q1", b"250 2.0.0 OK"]
        assert b"".join(delivery.messages[0].writes) == b"hello\r\n"


def test_what_follows_the_dot_is_answered_after_the_message() -> None:
    """An over-long command line right behind the dot closes the session only after the
    message it ends has been answered, as if the lines had come one by one."""
    proto, transport, delivery = open_data(BIG)
    proto.dataReceived(b"hello\r\n.\r\n" + b"N" * 600)
    assert replies(transport) == [
        b"250 2.0.0 Ok: queued as Q1",
        b"500 5.5.2 Line too long, closing connection",
    ]
    assert delivery.messages[0].state == "committed"


def test_a_large_message_streams_in_blocks_with_a_bounded_buffer(tmp_path: Path) -> None:
    s = open_session(tmp_path, smtp_config(max_message_size=BIG))
    s.replies()
    s.start_data()
    line = b"z" * 76 + b"\r\n"
    chunk = (line * 900)[:65536]  # ends in the middle of a line, as TCP reads do
    sent = 0
    for n in range(128):  # 8 MiB
        s.send(chunk)
        sent += len(chunk)
        assert len(s.proto._buffer) < len(line)
        if n >= 4:  # past the spool's in-memory threshold: written to tmp/ as it arrives
            assert s.tmp_files()
    s.send(b"\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    [stored] = s.stored()
    assert stored.body.endswith(chunk[-100:] + b"\r\n")
    assert len(stored.body) > sent
    assert s.factory.bodies == [None]  # spilled to its file: the queue reads it back
