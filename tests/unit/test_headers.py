"""Date:/Message-ID: added when missing, the HELO in the Received header made safe.

First the pure parts (``HeaderScanner``, ``HeaderCompleter``, ``sanitize_host``), then
``RelayDelivery``/``IncomingMessage`` writing into a real spool, then the whole protocol.
"""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mailrelay.inbound.delivery import RelayDelivery, Transaction
from mailrelay.inbound.headers import (
    MAX_PARTIAL_LINE,
    HeaderCompleter,
    HeaderEnd,
    HeaderScanner,
    message_date,
    sanitize_host,
)
from mailrelay.metrics import Metrics
from mailrelay.spool.format import Envelope, decode_message

from .fakes import make_spool, result_of
from .helpers_inbound import HOSTNAME, LOCAL_V4, open_session, smtp_config

DATE = "Thu, 01 Jan 1970 00:00:00 -0000"
MSGID = "<QID@relay.test>"
ADDED = f"Date: {DATE}\r\nMessage-ID: {MSGID}\r\n".encode()
ADDED_DATE = f"Date: {DATE}\r\n".encode()
ADDED_MSGID = f"Message-ID: {MSGID}\r\n".encode()


def scan(text: bytes) -> HeaderScanner:
    scanner = HeaderScanner()
    for line in text.split(b"\r\n")[:-1]:
        scanner.feed(line)
    scanner.finish()
    return scanner


def complete(*chunks: bytes) -> bytes:
    completer = HeaderCompleter(DATE, MSGID)
    return b"".join(completer.feed(c) for c in chunks) + completer.finish()


# -- HeaderScanner ---------------------------------------------------------------------------------


def test_scanner_sees_both_fields_present() -> None:
    s = scan(b"Date: x\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n")
    assert s.missing == () and s.end is HeaderEnd.EMPTY_LINE and s.has_fields


def test_scanner_reports_both_missing() -> None:
    assert scan(b"Subject: x\r\n\r\nbody\r\n").missing == ("date", "message-id")


@pytest.mark.parametrize("name", [b"DATE", b"date", b"dAtE", b"Date ", b"Date\t"])
def test_scanner_matches_names_case_insensitively_and_with_space_before_the_colon(
    name: bytes,
) -> None:
    assert scan(name + b": x\r\nmessage-id: <a@b>\r\n\r\n").missing == ()


def test_scanner_ignores_names_in_continuation_lines() -> None:
    s = scan(b"Subject: x\r\n Date: not a field\r\n\tMessage-ID: nor this\r\n\r\n")
    assert s.missing == ("date", "message-id") and s.end is HeaderEnd.EMPTY_LINE


def test_scanner_ignores_names_in_the_body() -> None:
    s = scan(b"Subject: x\r\n\r\nDate: in the body\r\nMessage-ID: <a@b>\r\n")
    assert s.missing == ("date", "message-id")


def test_scanner_ignores_lookalike_names() -> None:
    s = scan(b"Resent-Date: x\r\nX-Message-ID: y\r\nDates: z\r\nMessage-IDs: w\r\n\r\n")
    assert s.missing == ("date", "message-id")


def test_scanner_ends_at_the_first_line_that_is_not_a_field() -> None:
    s = HeaderScanner()
    assert s.feed(b"Subject: x") is None
    assert s.feed(b" folded") is None
    assert s.feed(b"not a header") is HeaderEnd.BODY_LINE
    assert s.feed(b"Date: now body") is None  # after the end nothing is looked at
    assert s.missing == ("date", "message-id") and s.has_fields


@pytest.mark.parametrize(
    "first", [b"hello", b" starts with a space", b"\tstarts with a tab", b"From a@b Mon", b":x"]
)
def test_scanner_a_first_line_that_is_not_a_field_makes_it_all_body(first: bytes) -> None:
    s = HeaderScanner()
    assert s.feed(first) is HeaderEnd.BODY_LINE
    assert not s.has_fields


def test_scanner_header_only_and_empty_messages_end_at_end_of_message() -> None:
    s = scan(b"Subject: x\r\nDate: y\r\n")
    assert s.end is HeaderEnd.END_OF_MESSAGE and s.missing == ("message-id",)
    s = scan(b"")
    assert s.end is HeaderEnd.END_OF_MESSAGE and not s.has_fields


# -- HeaderCompleter -----------------------------------------------------------------------------


def test_missing_fields_go_before_the_empty_line() -> None:
    message = b"From: a@b\r\nSubject: x\r\n\r\nbody\r\n"
    assert complete(message) == b"From: a@b\r\nSubject: x\r\n" + ADDED + b"\r\nbody\r\n"


def test_nothing_is_added_when_both_are_present() -> None:
    message = b"message-id: <x@y>\r\nDATE: whenever\r\n\r\nbody\r\n"
    assert complete(message) == message


def test_only_the_missing_one_is_added() -> None:
    assert complete(b"Date: d\r\n\r\nb\r\n") == b"Date: d\r\n" + ADDED_MSGID + b"\r\nb\r\n"
    assert complete(b"Message-Id: <m>\r\n\r\n") == b"Message-Id: <m>\r\n" + ADDED_DATE + b"\r\n"


def test_folded_fields_and_body_lookalikes_pass_unchanged() -> None:
    head = b"Subject: a\r\n folded\r\n\tDate: continuation\r\nTo: x@y,\r\n  z@w\r\n"
    body = b"Date: in the body\r\nMessage-ID: <in@body>\r\n\r\n\r\n"
    assert complete(head + b"\r\n" + body) == head + ADDED + b"\r\n" + body


def test_message_without_a_header_gets_the_fields_on_top_and_an_empty_line() -> None:
    assert complete(b"hello\r\nworld\r\n") == ADDED + b"\r\nhello\r\nworld\r\n"
    # A leading space must not make the first body line a continuation of our Message-ID.
    assert complete(b" indented\r\n") == ADDED + b"\r\n indented\r\n"


def test_a_non_field_line_after_fields_gets_the_fields_before_it_without_an_empty_line() -> None:
    message = b"Subject: x\r\nnot a header\r\nDate: too late\r\n"
    assert complete(message) == b"Subject: x\r\n" + ADDED + b"not a header\r\nDate: too late\r\n"


def test_header_only_message_gets_the_fields_appended() -> None:
    assert complete(b"Subject: x\r\n") == b"Subject: x\r\n" + ADDED


def test_empty_message_gets_only_the_fields() -> None:
    assert complete() == ADDED
    assert complete(b"") == ADDED


def test_empty_body_keeps_its_empty_line() -> None:
    assert complete(b"Subject: x\r\n\r\n") == b"Subject: x\r\n" + ADDED + b"\r\n"


def test_lines_split_across_writes_anywhere() -> None:
    message = b"Subject: x\r\nMessage-ID: <m>\r\n\r\nbody\r\n"
    expected = b"Subject: x\r\nMessage-ID: <m>\r\n" + ADDED_DATE + b"\r\nbody\r\n"
    for cut in range(len(message) + 1):
        assert complete(message[:cut], message[cut:]) == expected, cut
    assert complete(*[message[i : i + 1] for i in range(len(message))]) == expected


def test_after_the_header_the_body_passes_through_without_copying() -> None:
    completer = HeaderCompleter(DATE, MSGID)
    assert completer.feed(b"Subject: x\r\n") == b"Subject: x\r\n"
    assert completer.feed(b"\r\n") == ADDED + b"\r\n"
    chunk = b"z" * 100_000 + b"\r\n"
    assert completer.feed(chunk) is chunk
    assert completer.finish() == b""
    assert completer.added == ADDED


def test_a_very_long_header_section_is_streamed_and_still_completed() -> None:
    """2 MB of header fields: each write is passed on at once (nothing held back)."""
    completer = HeaderCompleter(DATE, MSGID)
    field = b"X-Filler: " + b"f" * 60 + b"\r\n"
    for _ in range(30_000):
        assert completer.feed(field) == field
    assert completer.feed(b"Date: late but present\r\n\r\nbody\r\n") == (
        b"Date: late but present\r\n" + ADDED_MSGID + b"\r\nbody\r\n"
    )


def test_a_huge_unfinished_line_makes_it_give_up_unchanged() -> None:
    completer = HeaderCompleter(DATE, MSGID)
    out = completer.feed(b"Subject: x\r\n") + completer.feed(b"y" * (MAX_PARTIAL_LINE + 1))
    out += completer.feed(b"\r\n\r\nbody\r\n") + completer.finish()
    assert out == b"Subject: x\r\n" + b"y" * (MAX_PARTIAL_LINE + 1) + b"\r\n\r\nbody\r\n"
    assert completer.added == b""


def test_an_unfinished_last_line_passes_unchanged_with_nothing_added() -> None:
    assert complete(b"Subject: x\r\nTo: y") == b"Subject: x\r\nTo: y"


_LINES = st.lists(
    st.one_of(
        st.sampled_from(
            [b"", b"Date: d", b"Message-ID: <m>", b"date:x", b" cont", b"\tcont", b"Subject: s"]
        ),
        st.binary(max_size=20).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r")),
    ),
    max_size=12,
)


@given(lines=_LINES, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_output_is_the_input_plus_the_added_fields_whatever_the_chunking(
    lines: list[bytes], cuts: list[int]
) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    points = sorted({min(c, len(message)) for c in cuts})
    chunks = [message[a:b] for a, b in zip([0, *points], [*points, len(message)], strict=True)]
    completer = HeaderCompleter(DATE, MSGID)
    out = b"".join(completer.feed(c) for c in chunks) + completer.finish()
    assert out == complete(message)  # chunking changes nothing
    scanner = scan(message)
    added = completer.added
    assert added == b"".join(
        {"date": ADDED_DATE, "message-id": ADDED_MSGID}[name] for name in scanner.missing
    )
    separator = b"\r\n" if scanner.end is HeaderEnd.BODY_LINE and not scanner.has_fields else b""
    at = out.find(added + separator) if added else 0
    assert out[:at] + out[at + len(added + separator) :] == message


# -- the HELO and client in the Received header ---------------------------------------------------


@pytest.mark.parametrize(
    "helo, shown",
    [
        ("client.example.com", "client.example.com"),
        ("host_1-a.example:25", "host_1-a.example:25"),
        ("[127.0.0.1]", "[127.0.0.1]"),
        ("[IPv6:::1]", "[IPv6:::1]"),
        ("evil)(by", "evil??by"),
        ("a;b\\c\"d'e", "a?b?c?d?e"),
        ("x[1.2.3.4", "x?1.2.3.4"),
        ("[a]b]", "?a?b?"),
        ("", "unknown"),
        ("h" * 300, "h" * 255),
    ],
)
def test_sanitize_host(helo: str, shown: str) -> None:
    assert sanitize_host(helo) == shown


# -- RelayDelivery and IncomingMessage with a real spool -------------------------------------------


def deliver(
    tmp_path: Path, chunks: list[bytes], helo: str = "client.test"
) -> tuple[bytes, str, bytes]:
    """(the stored body after our Received header, the queue ID, that Received header)"""
    spool = make_spool(tmp_path / "spool")
    clock = Clock()
    clock.advance(86400 * 365 * 30)
    accepted: list[Envelope] = []
    delivery = RelayDelivery(
        peer=LOCAL_V4,
        hostname=HOSTNAME,
        spool=spool,
        clock=clock,
        on_accepted=lambda envelope, body: accepted.append(envelope),
        metrics=Metrics(),
    )
    transaction = Transaction(
        helo=helo, sender="s@example.com", recipients=("r@example.org",), body_8bit=False
    )
    message = delivery.openMessage(transaction)
    for chunk in chunks:
        message.write(chunk)
    queue_id = result_of(message.commit())
    [path] = spool.queue.iterdir()
    stored = decode_message(path.read_bytes())
    assert stored.envelope.queue_id == queue_id and accepted == [stored.envelope]
    received = delivery.receivedHeader(None, None, None)
    assert stored.body.startswith(received)
    return stored.body[len(received) :], queue_id, received


def added_by_delivery(queue_id: str) -> bytes:
    date = email.utils.formatdate(86400 * 365 * 30, localtime=True)
    return f"Date: {date}\r\nMessage-ID: <{queue_id}@{HOSTNAME}>\r\n".encode()


def test_stored_message_has_exactly_the_added_fields(tmp_path: Path) -> None:
    head = b"From: a@example.com\r\nSubject: folded\r\n subject\r\n"
    body = b"Date: body text\r\n\r\n.\r\nend\r\n"
    stored, queue_id, _ = deliver(tmp_path, [head, b"\r\n" + body])
    assert stored == head + added_by_delivery(queue_id) + b"\r\n" + body


def test_stored_message_with_both_fields_is_byte_identical(tmp_path: Path) -> None:
    message = b"Message-ID: <own@example.com>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n"
    stored, _, _ = deliver(tmp_path, [message])
    assert stored == message


def test_stored_body_only_message_gets_the_fields_and_an_empty_line(tmp_path: Path) -> None:
    stored, queue_id, _ = deliver(tmp_path, [b"hello\r\n"])
    assert stored == added_by_delivery(queue_id) + b"\r\nhello\r\n"


def test_stored_empty_message_gets_the_fields(tmp_path: Path) -> None:
    stored, queue_id, _ = deliver(tmp_path, [])
    assert stored == added_by_delivery(queue_id)


def test_line_received_goes_through_the_same_path(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    delivery = RelayDelivery(LOCAL_V4, HOSTNAME, spool, Clock(), lambda e, body: None, Metrics())
    message = delivery.openMessage(Transaction("c", "s@x", ("r@y",), False))
    message.lineReceived(b"Subject: x")
    message.lineReceived(b"")
    message.lineReceived(b"body")
    queue_id = result_of(message.commit())
    body = decode_message((spool.queue / queue_id).read_bytes()).body
    assert b"\r\nSubject: x\r\nDate: " in body
    assert body.endswith(f"Message-ID: <{queue_id}@{HOSTNAME}>\r\n\r\nbody\r\n".encode())


def test_received_header_shows_a_sanitised_helo(tmp_path: Path) -> None:
    _, _, received = deliver(tmp_path, [b"Subject: x\r\n\r\n"], helo="a(b);c\\d")
    assert received.startswith(b"Received: from a?b??c?d ([127.0.0.1])\r\n\tby relay.test ")


# -- through the protocol --------------------------------------------------------------------------


def test_helo_with_header_specials_is_sanitised_in_the_stored_message(tmp_path: Path) -> None:
    s = open_session(tmp_path)
    s.send(b"EHLO x);for<a@b>(\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    s.send(b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    assert s.codes()[-1] == "250 2.0.0"
    [stored] = s.stored()
    assert stored.envelope.helo == "x);for<a@b>("  # the envelope keeps what was said
    assert stored.body.startswith(b"Received: from x??for?a?b?? ([127.0.0.1])\r\n")


def test_message_at_the_size_limit_is_accepted_although_fields_are_added(tmp_path: Path) -> None:
    head = b"Subject: at the limit\r\n\r\n"
    line = b"x" * 98 + b"\r\n"
    limit = len(head) + 10 * len(line)
    s = open_session(tmp_path, config=smtp_config(max_message_size=limit))
    s.start_data()
    s.send(head + line * 10 + b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    [stored] = s.stored()
    queue_id = stored.envelope.queue_id
    assert stored.body.endswith(
        f"\r\nMessage-ID: <{queue_id}@{HOSTNAME}>\r\n\r\n".encode() + line * 10
    )
    s.start_data()
    s.send(head + line * 10 + b"y\r\n.\r\n")
    assert s.codes() == ["552 5.3.4"]


@pytest.mark.parametrize("now", [0.0, 86400 * 365 * 30 + 0.25, 1_800_000_000.999, 1_800_000_001.0])
def test_the_date_of_a_second_is_formatdates(now: float) -> None:
    assert message_date(now) == email.utils.formatdate(int(now), localtime=True)
    assert message_date(now) == message_date(int(now) + 0.5)  # one string for the whole second
